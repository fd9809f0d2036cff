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


# ---------------------------------------------------------------------------------------------- hostile inputs

HOSTILE_LINES = {  # JSON text of one sample -> (category, words of the reason)
    '{"id": 1, "text": "cut \\ud83d"}': ("text_encoding", "text at text holds a lone UTF-16 surrogate"),
    '{"id": 1, "c": [{"value": "\\udc00 x"}]}': ("text_encoding", "c[0].value"),
    '{"id": 1, "\\ud800": 2}': ("text_encoding", "a key at"),
    '{"id": ' + "9" * 5000 + "}": ("limit", "cannot decode"),
    '{"id": ' + "9" * 300 + "}": ("limit", "300 digits; integers must fit in 64 bits"),
    '{"height": 1e400}': ("limit", "the number at height is inf"),
    '{"x": NaN}': ("limit", "must be finite"),
    "[" * 100_000 + "]" * 100_000: ("limit", "nested"),
    '{"a": ' + "[" * 40 + "]" * 40 + "}": ("limit", "nested more than data.limits.max_json_depth=32 deep (at a"),
}


@pytest.mark.parametrize("line", list(HOSTILE_LINES), ids=range(len(HOSTILE_LINES)))
def test_hostile_json_values_fail_only_their_sample(tmp_path, cache, line):
    category, words = HOSTILE_LINES[line]
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(SAMPLES[0]) + "\n" + line + "\n" + json.dumps(SAMPLES[2]) + "\n")
    idx = SampleIndex(path, cache_dir=cache)
    assert len(idx) == 3 and idx.raw(0) == SAMPLES[0] and idx.raw(2) == SAMPLES[2]
    with pytest.raises(DataError) as info:
        idx.sample(1)  # raw() refuses what json cannot decode, parse_sample the rest
    assert (info.value.index, info.value.category) == (1, category) and words in info.value.reason


@pytest.mark.parametrize("line", list(HOSTILE_LINES)[3:], ids=range(len(HOSTILE_LINES) - 3))
def test_hostile_elements_of_a_json_array_fail_only_their_sample(tmp_path, cache, chunk, line):
    """Valid syntax the decoder refuses (deep nesting, 5,000 digits) is indexed by bracket matching."""
    category, words = HOSTILE_LINES[line]
    path = tmp_path / "a.json"
    path.write_text("[" + json.dumps(SAMPLES[0]) + ",\n" + line + ",\n" + json.dumps(SAMPLES[2]) + "]")
    idx = SampleIndex(path, cache_dir=cache)
    assert len(idx) == 3 and idx.raw(0) == SAMPLES[0] and idx.raw(2) == SAMPLES[2]
    with pytest.raises(DataError) as info:
        idx.sample(1)
    assert (info.value.index, info.value.category) == (1, category) and words in info.value.reason


def test_oversized_sample_is_rejected_without_reading_it(tmp_path, cache, chunk):
    from refvllm.data.limits import DataLimits

    big = {"id": "big", "text": 'x"\\' * 400}
    for name, text in (("a.jsonl", "\n".join(json.dumps(s) for s in (SAMPLES[0], big, SAMPLES[2]))),
                       ("a.json", json.dumps([SAMPLES[0], big, SAMPLES[2]]))):
        path = tmp_path / name
        path.write_text(text)
        idx = SampleIndex(path, cache_dir=cache, limits=DataLimits(max_sample_bytes=1000))
        assert len(idx) == 3 and idx.raw(2) == SAMPLES[2]
        with pytest.raises(DataError, match="more than data.limits.max_sample_bytes=1000") as info:
            idx.raw(1)
        assert info.value.category == "limit"


def test_early_syntax_error_in_a_large_array_is_reported_at_once(tmp_path, cache, monkeypatch):
    """A typo at byte 21 of a big array must not make the scanner read the rest of the file."""
    monkeypatch.setattr(index_module, "_CHUNK", 1 << 12)
    path = tmp_path / "big.json"
    body = ",".join(json.dumps(s) for s in SAMPLES * 200)  # ~400 KB after the typo
    path.write_text('[{"id": 0, "text": "a" "b"},' + body + "]")
    loads = []
    real_load = index_module._JsonArrayScanner._load_more
    monkeypatch.setattr(index_module._JsonArrayScanner, "_load_more",
                        lambda self, size=0: loads.append(size) or real_load(self, size))
    with pytest.raises(DataError, match="at byte 23"):
        SampleIndex(path, cache_dir=cache)
    assert len(loads) == 1  # the first chunk only, not the ~100 of the file


def test_pretty_printed_object_is_one_clear_file_error(tmp_path, cache):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": SAMPLES[:3]}, indent=2))
    with pytest.raises(DataError, match="one JSON object written over several lines") as info:
        SampleIndex(path, cache_dir=cache)
    assert info.value.category == "json_syntax"
    one_line = _write_jsonl(tmp_path / "one.jsonl", SAMPLES[:1])  # a one-line object is a 1-sample JSONL
    assert len(SampleIndex(one_line, cache_dir=cache)) == 1


def test_cache_notices_a_rewrite_that_keeps_size_and_mtime(tmp_path, cache):
    """cp -p / rsync -a / tar keep size and mtime: the key also covers inode, ctime and the content."""
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"id": i, "t": "aa"}) for i in range(4)]
    path.write_text("\n".join(lines) + "\n")
    stat = path.stat()
    assert len(SampleIndex(path, cache_dir=cache)) == 4
    shifted = [json.dumps({"id": i, "t": "a"}) for i in range(4)]  # each line 1 byte shorter ...
    path.write_text("\n".join(shifted) + "\n" + "\n" * 4)  # ... same size: 4 more blank lines
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    idx = SampleIndex(path, cache_dir=cache)
    assert [idx.raw(i) for i in range(4)] == [json.loads(t) for t in shifted]


def test_jsonl_whose_first_line_is_broken_is_still_jsonl(tmp_path, cache, monkeypatch):
    """The pretty-printed-object check must not re-decode a large JSONL file whose first line is cut."""
    decodes = []
    real = index_module.json.JSONDecoder.raw_decode
    monkeypatch.setattr(index_module.json.JSONDecoder, "raw_decode",
                        lambda self, s, idx=0: decodes.append(len(s)) or real(self, s, idx))
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 0, "broken": \n' + "\n".join(json.dumps(s) for s in SAMPLES * 100) + "\n")
    idx = SampleIndex(path, cache_dir=cache)
    assert len(idx) == 1 + len(SAMPLES) * 100 and idx.raw(1) == SAMPLES[0]
    with pytest.raises(DataError, match="invalid JSON"):
        idx.raw(0)
    assert sum(n > 1000 for n in decodes) == 1  # one look at the start, not one per 64 KiB of the file
