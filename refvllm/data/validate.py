"""``refvllm validate DATA [--data-root ROOT] [--report REPORT.jsonl] [--workers N] [--config CFG]``.

Checks every sample the way training reads it (parse, open the media, plan and decode the frames, decode the
masks; with ``--config`` also the processor's length check), prints a summary (counts per kind and per error
category, with examples) and exits 0 when every sample is valid, 1 when any is not, 2 on a usage error.

``--report`` writes one JSON object per sample, in file order::

    {"index": 3, "id": "a7", "ok": false, "error": "object 0 frame 12: RLE counts ...", "category": "rle_malformed",
     "kind": "video_referring", "num_regions": 2, "mask_frames": [[12, 40], [3]],
     "mask_area": [{"12": 5120, "40": 4800}, {"3": 77}], "warnings": []}

``mask_frames``: per object, the sorted frames with a non-null segmentation; ``mask_area``: per object, pixel
count of each of those masks at the media's resolution (null when the sample failed before its masks were
decoded); ``kind``/``num_regions``/``mask_frames`` are null when the sample could not be parsed.

Samples are checked in chunks by a pool of worker processes (``--workers``, default: all CPUs). A worker that
dies (a decoder crash, out of memory) does not stop the run: the chunks it may have been working on are re-run
one sample at a time in a separate process, and the sample that kills it is reported (category
``worker_crash``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from refvllm.config import Config, DataConfig, load_config
from refvllm.constants import SAMPLE_KINDS
from refvllm.data.decode import FrameSize, decode_sample_report
from refvllm.data.index import SampleIndex
from refvllm.data.limits import DataLimits
from refvllm.data.masks import MaskRescaleWarning
from refvllm.data.schema import parse_sample, raw_sample_id
from refvllm.errors import ConfigError, DataError, unexpected_error
from refvllm.fileio import output_file_problem

DEFAULT_IMAGE_SIZE = 384  # frame size used without --config (SigLIP's); only the final resize depends on it
EXAMPLES_PER_CATEGORY = 3


@dataclass
class Settings:
    """What a worker needs to check a sample."""

    data_root: str
    num_frames: int
    image_size: int | FrameSize
    mask_resize: str
    limits: DataLimits


def _cpu_count() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. under a job scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parser() -> argparse.ArgumentParser:
    defaults = DataConfig()
    p = argparse.ArgumentParser(prog="refvllm validate", description="Check every sample of a data file.")
    p.add_argument("data", help="JSON array or JSONL file in the seed's format")
    p.add_argument("--data-root", help="folder that media paths are relative to (default: data.data_root from "
                                       "--config, else the data file's folder)")
    p.add_argument("--report", help="write one JSON object per sample to this JSONL file")
    p.add_argument("--workers", type=int, default=_cpu_count(), help="worker processes (default: usable CPUs)")
    p.add_argument("--config", help="training config: its data settings are used and, when the processor is "
                                    "available, every sample's length is checked against data.max_length")
    p.add_argument("--num-frames", type=int, help=f"frame budget T (default: data.num_frames, {defaults.num_frames})")
    p.add_argument("--mask-resize", choices=("rescale", "error"),
                   help=f"masks at another resolution with the same aspect (default: {defaults.mask_resize})")
    p.add_argument("--cache-dir", help="offset index cache (default: data.index_cache_dir or ~/.cache/refvllm)")
    return p


class UsageError(Exception):
    """A command-line problem (exit code 2)."""


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage
        return int(e.code or 0)
    try:
        processor, settings, cache_dir = _setup(args)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        index = SampleIndex(args.data, cache_dir=cache_dir, limits=settings.limits)
    except DataError as e:  # the file itself is not readable JSON/JSONL
        print(f"error: {e}", file=sys.stderr)
        return 1
    if len(index) == 0:  # "0 samples, 0 invalid" would read as a pass
        print(f"error: data file '{args.data}' has no samples", file=sys.stderr)
        return 1
    summary = Summary()
    start = time.perf_counter()
    rows = tqdm(validate_rows(index, settings, args.workers, processor), total=len(index), unit="sample",
                file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)  # progress only on a terminal
    with _report_file(args.report) as report:
        for row in rows:
            summary.add(row)
            if report is not None:
                report.write(json.dumps(row) + "\n")
    summary.print(args.data, settings.data_root, args.workers, time.perf_counter() - start, args.report)
    return 0 if summary.num_invalid == 0 else 1


def _setup(args: argparse.Namespace) -> tuple[Any, Settings, str | None]:
    """Check the arguments; load the config and the processor. Raises UsageError / ConfigError."""
    if not Path(args.data).is_file():
        raise UsageError(f"data file '{args.data}' not found")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    cfg = load_config(args.config) if args.config else None
    data_cfg = cfg.data if cfg is not None else DataConfig()
    data_root = args.data_root or data_cfg.data_root or str(Path(args.data).parent)
    if not Path(data_root).is_dir():
        raise UsageError(f"data root '{data_root}' is not a folder")
    num_frames = args.num_frames if args.num_frames is not None else data_cfg.num_frames
    if num_frames < 1:
        raise UsageError(f"--num-frames must be >= 1, got {num_frames}")
    if args.report:
        _check_writable(args.report)
    processor = _load_processor(cfg) if cfg is not None else None
    image_size = processor.frame_size if processor is not None else DEFAULT_IMAGE_SIZE
    settings = Settings(data_root, num_frames, image_size, args.mask_resize or data_cfg.mask_resize,
                        data_cfg.limits)
    return processor, settings, args.cache_dir or data_cfg.index_cache_dir or None


def _check_writable(report: str) -> None:
    """UsageError unless ``report`` names a file that can be written (checked before any work is done)."""
    if (problem := output_file_problem("--report", report)) is not None:
        raise UsageError(problem)


def _load_processor(cfg: Config):
    """The training processor (for the max_length check), or None with a note when it is not available."""
    try:
        from refvllm.families import make_processor
    except ImportError as e:
        print(f"note: the processor is not available ({e}); sample lengths are not checked", file=sys.stderr)
        return None
    return make_processor(cfg)


class _report_file:
    """Context manager: the open report file, or None."""

    def __init__(self, path: str | None):
        self.path, self.file = path, None

    def __enter__(self):
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        return self.file

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------------------------- one sample


def check_sample(index: SampleIndex, i: int, settings: Settings, processor=None) -> dict[str, Any]:
    """The report row of sample ``i`` (module docstring). Never raises for bad data."""
    row: dict[str, Any] = {"index": i, "id": None, "ok": False, "error": None, "category": None, "kind": None,
                           "num_regions": None, "mask_frames": None, "mask_area": None, "warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MaskRescaleWarning)
        try:
            _check_into(row, index, i, settings, processor)
            row["ok"] = True
        except DataError as e:
            row["error"], row["category"] = e.reason, error_category(e)
        except Exception as e:  # noqa: BLE001 (a bug or an unforeseen failure: report it, validate the rest)
            row["error"], row["category"] = unexpected_error(e).reason, "internal"
    row["warnings"] = sorted({str(w.message) for w in caught
                              if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))})
    return row


def _check_into(row: dict, index: SampleIndex, i: int, settings: Settings, processor) -> None:
    raw = index.raw(i)
    row["id"] = raw_sample_id(raw)
    sample = parse_sample(raw, i, settings.limits)
    row.update(id=sample.id, kind=sample.kind, num_regions=sample.num_regions,
               mask_frames=[sorted(obj) for obj in sample.objects])
    decoded, areas = decode_sample_report(sample, settings.data_root, settings.num_frames, settings.image_size,
                                          settings.mask_resize, settings.limits)
    row["mask_area"] = [{str(f): a for f, a in obj.items()} for obj in areas]
    if processor is not None:
        processor.encode(decoded)


def error_category(e: DataError) -> str:
    """The summary key of an error: its category; processor errors have none ('too_long' or 'text')."""
    if e.category:
        return e.category
    return "too_long" if "max_length" in e.reason else "text"


# ---------------------------------------------------------------------------------------------- many samples

_WORKER: dict[str, Any] = {}


def _init_worker(index: SampleIndex, settings: Settings, processor) -> None:
    _WORKER.update(index=index, settings=settings, processor=processor)


def _check_chunk(start: int, stop: int) -> list[dict]:
    return [check_sample(_WORKER["index"], i, _WORKER["settings"], _WORKER["processor"]) for i in range(start, stop)]


def validate_rows(index: SampleIndex, settings: Settings, workers: int, processor=None,
                  chunk_size: int | None = None) -> Iterator[dict]:
    """Report rows of every sample of ``index``, in file order."""
    n = len(index)
    chunk_size = chunk_size or max(1, min(64, n // (workers * 4) or 1))
    chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    if workers == 1 or len(chunks) <= 1:
        for i in range(n):
            yield check_sample(index, i, settings, processor)
        return
    for rows in _pool_chunks(index, settings, processor, workers, chunks):
        yield from rows


def _executor(index: SampleIndex, settings: Settings, processor, workers: int) -> ProcessPoolExecutor:
    # fork: workers inherit the loaded processor and index without pickling them (spawn elsewhere)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_init_worker, initargs=(index, settings, processor))


def _pool_chunks(index, settings, processor, workers: int, chunks: list[tuple[int, int]]) -> Iterator[list[dict]]:
    """Rows of each chunk, in order, from a pool with at most 2 x workers chunks in flight."""
    pending, in_flight = deque(chunks), deque()
    pool = _executor(index, settings, processor, workers)
    try:
        while pending or in_flight:
            while pending and len(in_flight) < 2 * workers:
                chunk = pending.popleft()
                in_flight.append((chunk, pool.submit(_check_chunk, *chunk)))
            chunk, future = in_flight.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                suspects = [chunk] + [c for c, _ in in_flight]
                in_flight.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                for suspect in suspects:
                    yield list(_isolated(index, settings, processor, *suspect))
                pool = _executor(index, settings, processor, workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _isolated(index, settings, processor, start: int, stop: int) -> Iterator[dict]:
    """Rows of samples start..stop-1, one at a time in a single worker; a sample that kills it is reported."""
    pool = _executor(index, settings, processor, 1)
    try:
        for i in range(start, stop):
            try:
                yield pool.submit(_check_chunk, i, i + 1).result()[0]
            except BrokenProcessPool:
                yield _crash_row(index, i)
                pool.shutdown(wait=True)
                pool = _executor(index, settings, processor, 1)
    finally:
        pool.shutdown(wait=True)


def _crash_row(index: SampleIndex, i: int) -> dict:
    try:
        sample_id = raw_sample_id(index.raw(i))
    except DataError:
        sample_id = None
    return {"index": i, "id": sample_id, "ok": False, "category": "worker_crash",
            "error": "the worker process died while checking this sample (a crash in the media decoder or out of "
                     "memory)", "kind": None, "num_regions": None, "mask_frames": None, "mask_area": None,
            "warnings": []}


# ---------------------------------------------------------------------------------------------- summary


class Summary:
    """Counts per kind and per error category, with a few example errors per category."""

    def __init__(self):
        self.total = 0
        self.num_invalid = 0
        self.kinds: Counter = Counter()
        self.invalid_kinds: Counter = Counter()
        self.categories: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.with_warnings = 0

    def add(self, row: dict) -> None:
        self.total += 1
        kind = row["kind"] or "unparsed"
        self.kinds[kind] += 1
        self.with_warnings += bool(row["warnings"])
        if row["ok"]:
            return
        self.num_invalid += 1
        self.invalid_kinds[kind] += 1
        self.categories[row["category"]] += 1
        if len(self.examples[row["category"]]) < EXAMPLES_PER_CATEGORY:
            name = f" (id {row['id']!r})" if row["id"] is not None else ""
            self.examples[row["category"]].append(f"sample {row['index']}{name}: {row['error']}")

    def print(self, data: str, data_root: str, workers: int, seconds: float, report: str | None) -> None:
        out = sys.stdout
        print(f"validated {self.total} samples of {data} (data root {data_root}) in {seconds:.1f} s with "
              f"{workers} worker(s): {self.total - self.num_invalid} valid, {self.num_invalid} invalid", file=out)
        order = [k for k in SAMPLE_KINDS if k in self.kinds] + sorted(set(self.kinds) - set(SAMPLE_KINDS))
        for kind in order:
            bad = f" ({self.invalid_kinds[kind]} invalid)" if self.invalid_kinds[kind] else ""
            print(f"  {kind:<16} {self.kinds[kind]}{bad}", file=out)
        if self.categories:
            print("errors:", file=out)
            for category, count in self.categories.most_common():
                print(f"  {category:<18} {count}", file=out)
                for example in self.examples[category]:
                    print(f"      {example}", file=out)
        if self.with_warnings:
            print(f"warnings: {self.with_warnings} sample(s) had warnings (e.g. masks rescaled); see the report",
                  file=out)
        if report:
            print(f"report: {report}", file=out)
