"""Byte-offset index of a JSON-array or JSONL data file, cached on disk, cheap to send to loader workers.

Contract:

    idx = SampleIndex("train.jsonl", cache_dir=None)   # builds or loads the offsets
    len(idx)                                           # number of samples
    idx.raw(i)                                         # sample i as decoded JSON (json.loads of its bytes)
    idx.sample(i)                                      # parse_sample(idx.raw(i), i)
    pickle.dumps(idx)                                  # a few hundred bytes when the offsets are cached

The offsets are an int64 [N, 2] array of (start, end) byte offsets, stored as ``<cache>/<key>.npy`` where the
key hashes the file's absolute path, size and mtime_ns (so an edited file is re-indexed) and read back with
``np.load(mmap_mode='r')``: a worker holds no per-sample Python objects, and pages of the offsets it never
touches are never read. The data file is opened lazily once per process and read with ``os.pread``, so a
forked worker never shares a file position with its parent.

Formats: a file whose first non-blank byte is ``[`` is a JSON array (indexed by walking it with
``json.JSONDecoder.raw_decode`` over its bytes decoded as latin-1, so character offsets are byte offsets; a
syntax error is a file-level DataError naming the byte offset); anything else is JSONL, one sample per
non-blank line (a line with a syntax error is a DataError for that sample only, raised by ``raw``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from refvllm.errors import DataError

logger = logging.getLogger(__name__)

INDEX_VERSION = 1  # part of the cache key: bump when the offsets' meaning changes
_CHUNK = 1 << 24  # bytes read at a time while indexing
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 13, 32]] = True
_WS = re.compile(r"[ \t\n\r]*")
_BOM = b"\xef\xbb\xbf"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/refvllm/index`` (default ``~/.cache/refvllm/index``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refvllm" / "index"


class SampleIndex:
    """Offsets of the samples of one data file (module docstring)."""

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.path = os.path.abspath(path)
        try:
            stat = os.stat(self.path)
        except OSError:
            raise DataError(f"data file '{path}' not found", category="data_file") from None
        if not os.path.isfile(self.path):
            raise DataError(f"data file '{path}' is not a file", category="data_file")
        self.format = _detect_format(self.path)
        self._offsets_file: str | None = None
        self._offsets = self._load_or_build(stat, Path(cache_dir) if cache_dir else default_cache_dir())
        self._fd: int | None = None
        self._pid: int | None = None

    # ------------------------------------------------------------------ building and caching

    def _load_or_build(self, stat: os.stat_result, cache_dir: Path) -> np.ndarray:
        key = f"v{INDEX_VERSION}\0{self.path}\0{stat.st_size}\0{stat.st_mtime_ns}"
        cache_file = cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.npy"
        if cache_file.is_file():
            try:
                offsets = np.load(cache_file, mmap_mode="r")
                self._offsets_file = str(cache_file)
                return offsets
            except (OSError, ValueError):
                logger.warning("index cache %s is unreadable; rebuilding it", cache_file)
        offsets = build_offsets(self.path, self.format)
        try:
            _save_atomic(cache_file, offsets)
        except OSError as e:
            logger.warning("cannot write the index cache %s (%s); keeping the offsets in memory", cache_file, e)
            return offsets
        self._offsets_file = str(cache_file)
        return np.load(cache_file, mmap_mode="r")

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return int(self._offsets.shape[0])

    def raw(self, i: int) -> Any:
        """Sample ``i`` as decoded JSON; DataError (naming sample i) if its bytes are not valid UTF-8 JSON."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range: the file has {len(self)} samples")
        start, end = (int(v) for v in self._offsets[i])
        data = self._read(start, end - start)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 (byte {start + e.start} of the file)", i, None,
                            "json_syntax") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (byte {start + e.pos} of the file)", i, None,
                            "json_syntax") from None

    def sample(self, i: int):
        """``parse_sample(self.raw(i), i)``."""
        from refvllm.data.schema import parse_sample

        return parse_sample(self.raw(i), i)

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise DataError(f"data file '{self.path}' changed while in use (short read at byte {offset})",
                            category="data_file")
        return data

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    # ------------------------------------------------------------------ pickling (DataLoader workers)

    def __getstate__(self) -> dict:
        state = {"path": self.path, "format": self.format, "offsets_file": self._offsets_file}
        if self._offsets_file is None:
            state["offsets"] = np.asarray(self._offsets)
        return state

    def __setstate__(self, state: dict) -> None:
        self.path, self.format = state["path"], state["format"]
        self._offsets_file = state["offsets_file"]
        self._offsets = (np.load(self._offsets_file, mmap_mode="r") if self._offsets_file is not None
                         else state["offsets"])
        self._fd, self._pid = None, None


def _save_atomic(path: Path, offsets: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, offsets)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _detect_format(path: str) -> str:
    """'json' when the first non-blank byte (after a UTF-8 BOM) is '[', else 'jsonl'."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        while head and not head.lstrip(b" \t\r\n" + _BOM):
            more = f.read(1 << 16)
            if not more:
                break
            head = head[-3:] + more
    stripped = head.removeprefix(_BOM).lstrip(b" \t\r\n")
    return "json" if stripped.startswith(b"[") else "jsonl"


def build_offsets(path: str, fmt: str) -> np.ndarray:
    """int64 [N, 2] (start, end) byte offsets of the samples of ``path`` (format 'json' or 'jsonl')."""
    if fmt == "json":
        return _JsonArrayScanner(path).offsets()
    return _jsonl_offsets(path)


# ---------------------------------------------------------------------------------------------- JSONL


def _jsonl_offsets(path: str) -> np.ndarray:
    """Offsets of the non-blank lines (whitespace-only lines are not samples).

    One numpy pass finds the newlines and each line's first byte; only the rare lines that are empty or start
    with whitespace are looked at again, so the cost is one read of the file plus O(lines) numpy work.
    """
    starts, ends, firsts = array("q"), array("q"), array("B")  # per line: start, end, first byte
    with open(path, "rb") as f:
        line_start = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
        f.seek(0)
        first: int | None = None  # first byte of the line being read, once seen
        pos = 0
        while chunk := f.read(_CHUNK):
            data = np.frombuffer(chunk, np.uint8)
            if first is None and line_start - pos < data.size:
                first = int(data[line_start - pos])
            newlines = np.flatnonzero(data == 10)
            if newlines.size:
                starts.extend([line_start, *(newlines[:-1] + 1 + pos).tolist()])
                ends.extend((newlines + pos).tolist())
                firsts.extend([10 if first is None else first, *data[newlines[:-1] + 1].tolist()])
                line_start = pos + int(newlines[-1]) + 1
                first = int(data[newlines[-1] + 1]) if newlines[-1] + 1 < data.size else None
            pos += data.size
    if line_start < pos:
        starts.append(line_start)
        ends.append(pos)
        firsts.append(10 if first is None else first)
    offsets = np.stack([np.frombuffer(starts, np.int64), np.frombuffer(ends, np.int64)], axis=1) if starts \
        else np.zeros((0, 2), np.int64)
    return offsets[~_blank_lines(path, offsets, np.frombuffer(firsts, np.uint8))]


def _blank_lines(path: str, offsets: np.ndarray, firsts: np.ndarray) -> np.ndarray:
    """bool [N]: the line is empty or whitespace only (only lines starting with whitespace are re-read)."""
    blank = offsets[:, 1] == offsets[:, 0]
    candidates = np.flatnonzero(~blank & _WHITESPACE[firsts])
    if candidates.size:
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in candidates.tolist():
                start, end = int(offsets[i, 0]), int(offsets[i, 1])
                blank[i] = not os.pread(fd, end - start, start).strip()
        finally:
            os.close(fd)
    return blank


# ---------------------------------------------------------------------------------------------- JSON array


class _JsonArrayScanner:
    """Walks a JSON array element by element over a sliding latin-1 window of the file (bounded memory)."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed in offsets())
        self.text, self.base, self.p, self.eof = "", 0, 0, False
        self.decoder = json.JSONDecoder()

    def _load_more(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at end of file."""
        if self.eof:
            return False
        chunk = self._file.read(_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.base += self.p
        self.text = self.text[self.p:] + chunk.decode("latin-1")
        self.p = 0
        return True

    def _skip_ws(self) -> str:
        """Skip whitespace; the next character ('' at end of file)."""
        while True:
            self.p = _WS.match(self.text, self.p).end()
            if self.p < len(self.text) or not self._load_more():
                return self.text[self.p: self.p + 1]

    def _error(self, message: str, offset: int) -> DataError:
        return DataError(f"data file '{self.path}' is not a valid JSON array: {message} at byte {offset}",
                         category="json_syntax")

    def offsets(self) -> np.ndarray:
        try:
            return self._scan()
        finally:
            self._file.close()

    def _scan(self) -> np.ndarray:
        starts, ends = array("q"), array("q")
        self._load_more()
        if self.text.startswith(_BOM.decode("latin-1")):
            self.p = len(_BOM)
        if self._skip_ws() != "[":
            raise self._error("expected '['", self.base + self.p)
        self.p += 1
        if self._skip_ws() == "]":
            self.p += 1
        else:
            while True:
                start, end = self._element()
                starts.append(start)
                ends.append(end)
                sep = self._skip_ws()
                if sep not in (",", "]"):
                    raise self._error(f"expected ',' or ']' after element {len(starts) - 1}, found {sep!r}",
                                      self.base + self.p)
                self.p += 1
                if sep == "]":
                    break
        if self._skip_ws() != "":
            raise self._error("extra data after the closing ']'", self.base + self.p)
        return np.stack([np.frombuffer(starts, np.int64), np.frombuffer(ends, np.int64)], axis=1) if starts \
            else np.zeros((0, 2), np.int64)

    def _element(self) -> tuple[int, int]:
        """(start, end) byte offsets of the element at the current position; advances past it."""
        self._skip_ws()
        while True:
            try:
                _, end = self.decoder.raw_decode(self.text, self.p)
            except json.JSONDecodeError as e:
                if self._load_more():  # maybe the element continues in the next chunk
                    continue
                raise self._error(e.msg, self.base + e.pos) from None
            if end == len(self.text) and self._load_more():  # a number may continue in the next chunk
                continue
            start, self.p = self.p, end
            return self.base + start, self.base + end
