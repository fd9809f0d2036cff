"""The seed / Bench-Q / Bench-D readers on generated files: prompts, references, modes, bad entries."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refvllm.errors import DataError
from refvllm.eval.formats import (
    CHOICE_INSTRUCTION,
    BadEntry,
    EvalEntry,
    load_records,
    read_eval_file,
)


def _rle(h=8, w=8, box=(1, 1, 4, 4)):
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[box[1]:box[3], box[0]:box[2]] = 1
    rle = mask_utils.encode(m)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _object(frames):
    return {str(f): {"segmentation": _rle()} for f in frames}


def _bench_q(n_objects=2, frames=(0, 2, 4), frame_idx=2, **over):
    entry = {
        "video": "clip_0",
        "Question": "What is <object0><region> doing next to <object1><region>?",
        "type": "Relationship Question",
        "options": ["(A) waving", "(B) running", "(C) sitting", "(D) jumping"],
        "Answer": "(B) running",
        "frame_idx": frame_idx,
        "annotation": [_object(frames) for _ in range(n_objects)],
    }
    entry.update(over)
    return entry


def _write(path, records, jsonl=False):
    text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


def test_bench_q_multi_and_single_modes(tmp_path):
    path = _write(tmp_path / "q.json", [_bench_q()])
    (multi,) = read_eval_file(path, "bench-q", "multi")
    (single,) = read_eval_file(path, "bench-q", "single")
    assert isinstance(multi, EvalEntry)
    assert multi.type == "Relationship Question" and multi.id == "0"
    assert multi.reference == "(B) running" and multi.options[1] == "(B) running"
    assert multi.chance == 0.25 and multi.needs_region is True
    human, gpt = multi.raw["conversations"]
    assert human["from"] == "human" and gpt == {"from": "gpt", "value": "(B) running"}
    assert human["value"].startswith("<video>\n") and human["value"].count("<region>") == 2
    assert human["value"].splitlines()[2:] == ["(A) waving", "(B) running", "(C) sitting", "(D) jumping",
                                               CHOICE_INSTRUCTION]
    assert [sorted(o) for o in multi.raw["annotation"]] == [["0", "2", "4"], ["0", "2", "4"]]
    assert [list(o) for o in single.raw["annotation"]] == [["2"], ["2"]]
    assert multi.raw["video"] == "clip_0" and multi.extra["Answer"] == "(B) running"


def test_bench_q_single_mode_bad_entries_are_reported(tmp_path):
    no_mask = _bench_q()
    no_mask["annotation"][1]["2"] = {"segmentation": None}
    records = [
        _bench_q(frame_idx=3),  # no object has a mask at frame 3
        no_mask,
        _bench_q(frame_idx="x"),
        {k: v for k, v in _bench_q().items() if k != "frame_idx"},
        {k: v for k, v in _bench_q(id="q7").items() if k != "Answer"},
        _bench_q(options="(A) x"),
        ["not", "an", "object"],
        _bench_q(frame_idx="02"),  # "02" names frame 2: fine
    ]
    out = read_eval_file(_write(tmp_path / "q.jsonl", records, jsonl=True), "bench-q", "single")
    assert [type(e).__name__ for e in out] == ["BadEntry"] * 7 + ["EvalEntry"]
    reasons = [e.reason for e in out[:7]]
    assert "object 0 has no mask at frame_idx 3" in reasons[0]
    assert "object 1 has no mask at frame_idx 2" in reasons[1]
    assert "'frame_idx' must be a non-negative integer" in reasons[2]
    assert "needs 'frame_idx'" in reasons[3]
    assert "'Answer'" in reasons[4] and out[4].id == "q7" and out[4].type == "Relationship Question"
    assert "'options'" in reasons[5]
    assert "JSON object" in reasons[6] and out[6].index == 6
    assert out[0].as_dict() == {"index": 0, "id": "0", "type": "Relationship Question", "reason": reasons[0]}
    # multi-frame mode does not need frame_idx
    multi = read_eval_file(_write(tmp_path / "q2.json", records[:4]), "bench-q", "multi")
    assert [type(e) for e in multi] == [EvalEntry, EvalEntry, EvalEntry, EvalEntry]


def test_bench_d_entries(tmp_path):
    entries = [
        {"video": "v1", "caption": "A man in a red coat walks to the left.", "frame_idx": 4,
         "annotation": [_object(range(0, 32))]},
        {"video": "v2", "caption": "Two dogs.", "frame_idx": "0", "annotation": [_object([0, 1]), _object([0])]},
        {"video": "v3", "frame_idx": 0, "annotation": [_object([0])]},
    ]
    path = _write(tmp_path / "d.json", entries)
    one, two, bad = read_eval_file(path, "bench-d", "multi")
    assert one.type == "description" and one.reference == entries[0]["caption"] and one.options is None
    assert one.raw["conversations"][0]["value"].count("<region>") == 1
    assert len(one.raw["annotation"][0]) == 32
    assert two.raw["conversations"][0]["value"].count("<region>") == 2
    assert isinstance(bad, BadEntry) and "'caption'" in bad.reason and bad.type == "description"
    single = read_eval_file(path, "bench-d", "single")
    assert list(single[0].raw["annotation"][0]) == ["4"]
    assert one.extra["caption"] == entries[0]["caption"]


def _seed(qtype="color", **over):
    sample = {
        "id": "s1",
        "video": "videos/a.mp4",
        "conversations": [{"from": "human", "value": "<video>\nWhat colour is <region>?"},
                          {"from": "gpt", "value": "red"}],
        "annotation": [_object([0, 3])],
        "type": qtype,
        "chance": 0.25,
        "needs_region": True,
        "frame_idx": 3,
    }
    sample.update(over)
    return sample


def test_seed_entries_keep_the_sample_and_its_facts(tmp_path):
    records = [
        _seed(),
        _seed(id="s2", type=None, chance=None, needs_region=None, options=["(A) up", "(B) down"]),
        _seed(id="s3", conversations=[{"from": "human", "value": "<video>\nWhat colour is <region>?"}]),
        _seed(id="s4", chance=2),
        _seed(id="s5", needs_region="yes"),
    ]
    out = read_eval_file(_write(tmp_path / "e.json", records), "seed", "multi")
    first, second = out[:2]
    assert first.type == "color" and first.reference == "red" and first.chance == 0.25
    assert first.needs_region is True and first.raw["conversations"] == records[0]["conversations"]
    assert second.type == "all"
    assert second.options == ["(A) up", "(B) down"] and second.chance == 0.5 and second.needs_region is None
    assert [e.reason for e in out[2:]] == [
        "an evaluation sample's last turn must be the assistant's ('gpt') reference answer",
        "'chance' must be a number in [0, 1], got 2",
        "'needs_region' must be true or false, got 'yes'",
    ]
    (single, *_) = read_eval_file(tmp_path / "e.json", "seed", "single")
    assert list(single.raw["annotation"][0]) == ["3"]


def test_load_records_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.json")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="unknown evaluation format"):
        read_eval_file(tmp_path / "bad.jsonl", "mvbench", "multi")
