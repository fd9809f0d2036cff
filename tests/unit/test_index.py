"""SampleIndex: JSON arrays and JSONL, byte offsets, bad lines, caching, pickling into worker processes."""

import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest

import refvllm.data.index as index_module
from refvllm.data.index import SampleIndex
from refvllm.errors import DataError

SAMPLES = [{"id": i, "text": "é ü 漢字 🎥"[: i % 9], "nested": {"a": [i, None, 1.5]}} for i in range(50)]


def _write_jsonl(path, samples, sep="\n"):
    path.write_text(sep.join(json.dumps(s, ensure_ascii=False) for s in samples) + sep, encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(params=[1 << 24, 23], ids=["one-chunk", "tiny-chunks"])
def chunk(request, monkeypatch):
    """Index with the real chunk size and with a tiny one, so samples straddle chunk boundaries."""
    monkeypatch.setattr(index_module, "_CHUNK", request.param)


def test_json_array(tmp_path, cache, chunk):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(SAMPLES, ensure_ascii=False, indent=2), encoding="utf-8")
    idx = SampleIndex(path, cache_dir=cache)
    assert idx.format == "json" and len(idx) == 50
    assert [idx.raw(i) for i in range(50)] == SAMPLES
    offsets = np.load(next(cache.iterdir()))
    data = path.read_bytes()
    assert json.loads(data[offsets[7, 0]:offsets[7, 1]]) == SAMPLES[7]  # byte offsets, not character offsets


def test_jsonl_with_blank_lines_crlf_and_bom(tmp_path, cache, chunk):
    path = tmp_path / "a.jsonl"
    body = "\r\n".join(json.dumps(s, ensure_ascii=False) for s in SAMPLES[:5])
    tail = "\r\n\r\n   \n\t\n  " + json.dumps(SAMPLES[5]) + "\n" + json.dumps(SAMPLES[6])  # no final newline
    path.write_bytes(b"\xef\xbb\xbf" + (body + tail).encode())
    idx = SampleIndex(path, cache_dir=cache)
    assert idx.format == "jsonl" and len(idx) == 7
    assert [idx.raw(i) for i in range(7)] == SAMPLES[:7]


def test_bad_jsonl_line_fails_only_that_sample(tmp_path, cache):
    lines = [json.dumps(SAMPLES[0]), '{"id": 1, "broken": ', json.dumps(SAMPLES[2])]
    path = tmp_path / "a.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "\xff\xfe"}\n')
    idx = SampleIndex(path, cache_dir=cache)
    assert len(idx) == 4
    assert idx.raw(0) == SAMPLES[0] and idx.raw(2) == SAMPLES[2]
    with pytest.raises(DataError) as info:
        idx.raw(1)
    assert (info.value.index, info.value.category) == (1, "json_syntax") and "invalid JSON" in info.value.reason
    with pytest.raises(DataError, match="not valid UTF-8") as info:
        idx.raw(3)
    assert info.value.index == 3


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1}, {"b": 2,}]', "at byte 19"),
    ('[{"a": 1} {"b": 2}]', "expected ',' or ']' after element 0"),
    ('[{"a": 1}, {"b": 2}', "expected ',' or ']'"),
    ('[{"a": 1}] [2]', "extra data after the closing ']'"),
    ('[{"a": "unterminated}]', "at byte 7"),
])
def test_json_array_syntax_errors_name_file_and_offset(tmp_path, cache, chunk, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        SampleIndex(path, cache_dir=cache)
    assert "bad.json" in info.value.reason and message in info.value.reason
    assert info.value.category == "json_syntax"


def test_empty_files_and_out_of_range(tmp_path, cache):
    (tmp_path / "e.json").write_text(" [ ] \n")
    (tmp_path / "e.jsonl").write_text("\n\n")
    assert len(SampleIndex(tmp_path / "e.json", cache_dir=cache)) == 0
    idx = SampleIndex(tmp_path / "e.jsonl", cache_dir=cache)
    assert len(idx) == 0
    with pytest.raises(IndexError):
        idx.raw(0)
    with pytest.raises(DataError, match="not found") as info:
        SampleIndex(tmp_path / "missing.json", cache_dir=cache)
    assert info.value.category == "data_file"


def test_cache_is_reused_and_invalidated_by_edits(tmp_path, cache, monkeypatch):
    path = _write_jsonl(tmp_path / "a.jsonl", SAMPLES[:3])
    SampleIndex(path, cache_dir=cache)
    calls = []
    real = index_module.build_offsets
    monkeypatch.setattr(index_module, "build_offsets", lambda *a: calls.append(a) or real(*a))
    assert len(SampleIndex(path, cache_dir=cache)) == 3 and calls == []  # loaded from the cache
    _write_jsonl(path, SAMPLES[:4])
    os.utime(path, ns=(1, 1))  # mtime changes even on coarse file systems
    idx = SampleIndex(path, cache_dir=cache)
    assert len(idx) == 4 and len(calls) == 1 and idx.raw(3) == SAMPLES[3]


def test_unwritable_cache_keeps_offsets_in_memory(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "a.jsonl", SAMPLES[:3])
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    idx = SampleIndex(path, cache_dir=blocker / "cache")
    assert "cannot write the index cache" in caplog.text
    clone = pickle.loads(pickle.dumps(idx))
    assert clone.raw(2) == SAMPLES[2]


def _read_in_worker(args):
    idx, i = args
    return idx.raw(i)


def test_pickles_small_and_reads_in_worker_processes(tmp_path, cache):
    path = _write_jsonl(tmp_path / "a.jsonl", SAMPLES)
    idx = SampleIndex(path, cache_dir=cache)
    idx.raw(0)  # opens the file in this process: forked workers must not share its position
    assert len(pickle.dumps(idx)) < 1000
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(_read_in_worker, [(idx, i) for i in range(50)])
    assert got == SAMPLES
    clone = pickle.loads(pickle.dumps(idx))
    assert isinstance(clone._offsets, np.memmap) and clone.raw(49) == SAMPLES[49]


def test_sample_parses(tmp_path, cache):
    raw = {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": "yo"}]}
    idx = SampleIndex(_write_jsonl(tmp_path / "a.jsonl", [raw]), cache_dir=cache)
    assert idx.sample(0).kind == "image"
