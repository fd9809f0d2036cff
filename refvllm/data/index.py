"""Byte-offset index of a JSON-array or JSONL data file, cached on disk, cheap to send to loader workers.

Contract:

    idx = SampleIndex("train.jsonl", cache_dir=None)   # builds or loads the offsets
    len(idx)                                           # number of samples
    idx.raw(i)                                         # sample i as decoded JSON (json.loads of its bytes)
    idx.sample(i)                                      # parse_sample(idx.raw(i), i, limits)
    pickle.dumps(idx)                                  # a few hundred bytes when the offsets are cached

The offsets are an int64 [N, 2] array of (start, end) byte offsets, stored as ``<cache>/<key>.npy`` where the
key hashes the file's absolute path, size, mtime, inode, ctime and a fingerprint of its content (64 KiB at its
start, middle and end), so an edited file is re-indexed even when a copy kept its size and mtime
(``cp -p``, ``rsync -a``, tar), and read back with
``np.load(mmap_mode='r')``: a worker holds no per-sample Python objects, and pages of the offsets it never
touches are never read. The data file is opened lazily once per process and read with ``os.pread``, so a
forked worker never shares a file position with its parent.

Formats: a file whose first non-blank byte is ``[`` is a JSON array (indexed by walking it with
``json.JSONDecoder.raw_decode`` over its bytes decoded as latin-1, so character offsets are byte offsets; a
syntax error is a file-level DataError naming the byte offset, raised as soon as it is met; an element whose
syntax is valid but whose content Python's decoder refuses (nested too deep, a 5,000-digit number) or that is
larger than ``max_sample_bytes`` is indexed by a bracket-matching scan, so only that sample fails); a file that
holds one JSON object spread over several lines (a pretty-printed object, not an array) is a file-level
DataError; anything else is JSONL, one sample per non-blank line (a line with a syntax error is a DataError for
that sample only, raised by ``raw``).

What ``raw`` hands on is checked (:func:`check_json_value`): at most ``limits.max_json_depth`` deep, every
integer within int64, every float finite, every string valid Unicode (JSON's ``\ud83d`` escapes can make lone
UTF-16 surrogates, which no tokenizer, file system or UTF-8 writer accepts). A sample over
``limits.max_sample_bytes`` is rejected without being read.
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

from refvllm.data.limits import DEFAULT_LIMITS, DataLimits
from refvllm.errors import DataError

logger = logging.getLogger(__name__)

INDEX_VERSION = 2  # part of the cache key: bump when the offsets' meaning or the key changes
_FINGERPRINT_BLOCK = 1 << 16  # bytes hashed at the start, middle and end of the file for the cache key
_TRUNCATION_SLACK = 64  # a decode error this close to the end of the loaded text may be a cut-off token
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

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 limits: DataLimits = DEFAULT_LIMITS):
        self.path = os.path.abspath(path)
        self.limits = limits
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
        key = "\0".join(map(str, (f"v{INDEX_VERSION}", self.path, stat.st_size, stat.st_mtime_ns, stat.st_ino,
                                   stat.st_dev, stat.st_ctime_ns, _fingerprint(self.path, stat.st_size))))
        cache_file = cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.npy"
        if cache_file.is_file():
            try:
                offsets = np.load(cache_file, mmap_mode="r")
                self._offsets_file = str(cache_file)
                return offsets
            except (OSError, ValueError):
                logger.warning("index cache %s is unreadable; rebuilding it", cache_file)
        offsets = build_offsets(self.path, self.format, self.limits)
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
        """Sample ``i`` as decoded, checked JSON (module docstring); DataError naming sample i otherwise."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range: the file has {len(self)} samples")
        start, end = (int(v) for v in self._offsets[i])
        if end - start > self.limits.max_sample_bytes:
            raise DataError(f"the sample's JSON text is {end - start} bytes, more than data.limits.max_sample_bytes"
                            f"={self.limits.max_sample_bytes}", i, None, "limit")
        return decode_sample_json(self._read(start, end - start), i, start, self.limits)

    def sample(self, i: int):
        """``parse_sample(self.raw(i), i, self.limits)``."""
        from refvllm.data.schema import parse_sample

        return parse_sample(self.raw(i), i, self.limits)

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        parts, done = [], 0
        while done < length:  # one pread returns at most ~2 GiB on Linux
            part = os.pread(self._fd, length - done, offset + done)
            if not part:
                raise DataError(f"data file '{self.path}' changed while in use (it ends before byte "
                                f"{offset + length})", category="data_file")
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    # ------------------------------------------------------------------ pickling (DataLoader workers)

    def __getstate__(self) -> dict:
        state = {"path": self.path, "format": self.format, "offsets_file": self._offsets_file, "limits": self.limits}
        if self._offsets_file is None:
            state["offsets"] = np.asarray(self._offsets)
        return state

    def __setstate__(self, state: dict) -> None:
        self.path, self.format, self.limits = state["path"], state["format"], state["limits"]
        self._offsets_file = state["offsets_file"]
        self._offsets = (np.load(self._offsets_file, mmap_mode="r") if self._offsets_file is not None
                         else state["offsets"])
        self._fd, self._pid = None, None


def decode_sample_json(data: bytes, index: int, offset: int = 0, limits: DataLimits = DEFAULT_LIMITS) -> Any:
    """The JSON value of one sample's bytes (``offset``: where they start in the file, for messages).

    DataError naming sample ``index`` for bytes that are not UTF-8 (``json_syntax``), not JSON
    (``json_syntax``), or JSON that Python's decoder refuses: nested too deep for its recursion, a number of
    thousands of digits (``limit``). What the value holds is checked by ``parse_sample``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {offset + e.start} of the file)", index, None,
                        "json_syntax") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (byte {offset + e.pos} of the file)", index, None,
                        "json_syntax") from None
    except RecursionError:
        raise DataError(f"the sample's JSON is nested too deeply to decode (data.limits.max_json_depth="
                        f"{limits.max_json_depth})", index, None, "limit") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"the sample's JSON has a value Python cannot decode: {e}", index, None, "limit") from None


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


def _fingerprint(path: str, size: int) -> str:
    """sha1 of 64 KiB at the start, the middle and the end of the file (part of the cache key)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _FINGERPRINT_BLOCK // 2), max(0, size - _FINGERPRINT_BLOCK)}):
            f.seek(offset)
            digest.update(f.read(_FINGERPRINT_BLOCK))
    return digest.hexdigest()


def _detect_format(path: str) -> str:
    """'json' when the first non-blank byte (after a UTF-8 BOM) is '[', else 'jsonl'.

    DataError when the file holds one JSON value spread over several lines that is not an array (a
    pretty-printed object): read as JSONL it would give one "invalid JSON" per line.
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        while head and not head.lstrip(b" \t\r\n" + _BOM):
            more = f.read(1 << 16)
            if not more:
                break
            head = head[-3:] + more
        stripped = head.removeprefix(_BOM).lstrip(b" \t\r\n")
        if stripped.startswith(b"["):
            return "json"
        if stripped.startswith(b"{") and _spans_lines(f, head):
            raise DataError(f"data file '{path}' holds one JSON object written over several lines; a data file "
                            "is a JSON array of samples ([{...}, {...}]) or JSONL (one sample per line)",
                            category="json_syntax")
    return "jsonl"


def _spans_lines(f, head: bytes) -> bool:
    """True when the JSON value at the start of the file ends on a later line than its first (``f`` is the
    open file, positioned after ``head``). A first line that is valid JSON is JSONL; so is a start that is not
    valid JSON (the lines are then reported one by one). Reads more only while the value may be cut by what is
    loaded, doubling, and at most 64 MiB."""
    text = head.decode("latin-1")
    start = len(text) - len(text.removeprefix(_BOM.decode("latin-1")).lstrip(" \t\r\n"))
    first_newline = text.find("\n", start)
    if first_newline < 0 and len(head) < (1 << 16):
        return False  # a single line
    while True:
        try:
            _, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError as e:
            if not _may_be_cut(e, text):
                return False  # a real syntax error: not one valid multi-line value
            more = f.read(len(text)) if len(text) < (64 << 20) else b""
            if not more:
                return False
            text += more.decode("latin-1")
            continue
        except (RecursionError, ValueError):
            return False
        return 0 <= first_newline < end


def _may_be_cut(e: json.JSONDecodeError, text: str) -> bool:
    """Whether a decode error of ``text`` may come from the value being cut at its end (a string running to the
    end, or an error within a token's length of it) rather than from a real syntax error."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(text) - _TRUNCATION_SLACK


def build_offsets(path: str, fmt: str, limits: DataLimits = DEFAULT_LIMITS) -> np.ndarray:
    """int64 [N, 2] (start, end) byte offsets of the samples of ``path`` (format 'json' or 'jsonl')."""
    if fmt == "json":
        return _JsonArrayScanner(path, limits.max_sample_bytes).offsets()
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
    """Walks a JSON array element by element over a sliding latin-1 window of the file (bounded memory).

    Each element is found by ``raw_decode`` (C speed). A decode error far from the end of the loaded text is a
    syntax error of the file, raised at once; one near the end may be an element cut by the window, so more
    is loaded (doubling, so a large element costs linear time) and the decode retried. Elements that are valid
    JSON but that the decoder refuses (too deep, huge integers) or that grow past ``max_sample_bytes`` are
    skipped by :meth:`_skip_element`, which matches brackets outside strings and keeps only the unread text.
    """

    def __init__(self, path: str, max_sample_bytes: int):
        self.path = path
        self.max_sample_bytes = max_sample_bytes
        self._file = open(path, "rb")  # noqa: SIM115 (closed in offsets())
        self.text, self.base, self.p, self.eof = "", 0, 0, False
        self.decoder = json.JSONDecoder()

    def _load_more(self, size: int = 0) -> bool:
        """Append the next ``max(size, _CHUNK)`` bytes (dropping what was consumed); False at end of file."""
        if self.eof:
            return False
        chunk = self._file.read(max(size, _CHUNK))
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
                cut = _may_be_cut(e, self.text)
                if cut and len(self.text) - self.p > self.max_sample_bytes:  # too large to decode: its end only
                    return self._skip_element()
                if cut and self._load_more(len(self.text) - self.p):  # maybe the element continues
                    continue
                raise self._error(e.msg, self.base + e.pos) from None
            except (RecursionError, ValueError):  # valid syntax the decoder refuses: raw() reports it
                return self._skip_element()
            if end == len(self.text) and self._load_more():  # a number may continue in the next chunk
                continue
            start, self.p = self.p, end
            return self.base + start, self.base + end

    def _skip_element(self) -> tuple[int, int]:
        """(start, end) of the element at the current position, found by matching brackets outside strings
        (no decoding, no recursion, memory bounded by one chunk); advances past it."""
        start, depth, in_string = self.base + self.p, 0, False
        if _SCALAR.match(self.text, self.p):  # a bare number or literal: its end is the next separator
            return self._skip_scalar(start)
        while True:
            pattern = _STRING_STOP if in_string else _STRUCTURE
            m = pattern.search(self.text, self.p)
            if m is None or m.end() >= len(self.text) and m.group() == "\\":
                self.p = len(self.text) if m is None else m.start()
                if not self._load_more():
                    raise self._error("unterminated element", start)
                continue
            self.p = m.end()
            c = m.group()
            if c == "\\":
                self.p += 1  # the escaped character
            elif c == '"':
                in_string = not in_string
            else:
                depth += 1 if c in "[{" else -1
            if depth == 0 and not in_string:
                return start, self.base + self.p

    def _skip_scalar(self, start: int) -> tuple[int, int]:
        while True:
            m = _SCALAR_END.search(self.text, self.p)
            if m is not None:
                self.p = m.start()
                return start, self.base + self.p
            self.p = len(self.text)
            if not self._load_more():
                return start, self.base + self.p


_STRUCTURE = re.compile(r'["\[\]{}]')  # outside strings: what changes the bracket depth
_STRING_STOP = re.compile(r'["\\]')  # inside a string: its end or an escape
_SCALAR = re.compile(r"[-0-9A-Za-z]")
_SCALAR_END = re.compile(r"[\s,\]]")
