"""Evaluation work units (refvllm.eval.shards): batches from the file order, part files, resume checks."""

import pytest

from refvllm.errors import ConfigError
from refvllm.eval.shards import PartFiles, batch_plan, run_key


def test_batches_follow_the_file_order_whatever_the_process_count():
    plan = batch_plan(7, 3)
    assert [list(b) for b in plan] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batch_plan(0, 3) == []
    assert run_key({"a": 1, "b": [2]}) == run_key({"b": [2], "a": 1}) != run_key({"a": 2, "b": [2]})


def test_part_files_resume_from_complete_lines_of_any_rank(tmp_path):
    parts = PartFiles(tmp_path / "metrics.json", key="k1")
    parts.append(0, 0, [{"index": 0, "id": "a", "text": "x", "num_tokens": 1}])
    parts.append(1, 1, [{"index": 1, "id": "b", "skipped": "no media"}])
    with open(parts.path(1), "a") as f:
        f.write('{"key": "k1", "batch": 2, "resu')  # cut short by a crash: batch 2 runs again
    assert sorted(PartFiles(tmp_path / "metrics.json", key="k1").read()) == [0, 1]
    assert [p.name for p in parts.files()] == ["metrics.part-0.jsonl", "metrics.part-1.jsonl"]
    with pytest.raises(ConfigError, match="another evaluation"):
        PartFiles(tmp_path / "metrics.json", key="k2").read()
    assert PartFiles(tmp_path / "other.json", key="k2").read() == {}  # another --out: its own part files
    parts.remove()
    assert parts.files() == []
