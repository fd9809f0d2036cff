"""Per-sample token-length estimates of a training file, for the token-budget batcher and length grouping.

    lengths = sample_lengths(dataset)      # int64 [N]: Processor.estimate_tokens of every sample

Computed once from the samples' JSON (no media opened: text tokens exact, visual and region tokens at the
planned frame count) and cached beside the file's offset index, keyed by the index and everything in the
processor that changes a count (tokenizer, chat template, frame budget, token layout, pixel range), so a
second run, and every other process, reads it back instead of tokenising the file again.

A sample that fails to parse or render gets length 1 here: it is still sampled, and the dataset skips it with
its reason when it is loaded (the bad-sample policy of refvllm.data.dataset), so the data order is the same
whether or not a sample is bad.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

from refvllm.errors import ConfigError

logger = logging.getLogger(__name__)

LENGTHS_VERSION = 1
_PROGRESS_EVERY_S = 30.0


def processor_signature(processor) -> str:
    """A digest of what decides a sample's token count under ``processor``."""
    tok = processor.tokenizer
    parts = [f"v{LENGTHS_VERSION}", type(processor).__name__, tok.name_or_path, str(len(tok)),
             str(getattr(tok, "chat_template", "")), str(processor.num_frames), repr(asdict(processor.layout)),
             processor.region_format]
    pre = getattr(processor, "pre", None)
    if pre is not None and is_dataclass(pre):
        parts.append(repr(asdict(pre)))
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:16]


def sample_lengths(dataset, log=print) -> np.ndarray:
    """Estimated token length of every sample of ``dataset`` (a RefDataset): int64 [N], each >= 1."""
    index = dataset.index
    cache = _cache_file(index, dataset.processor)
    if cache is not None and cache.is_file():
        try:
            lengths = np.load(cache)
            if lengths.shape == (len(index),):
                return lengths
        except (OSError, ValueError):
            pass
        logger.warning("length cache %s is unreadable or stale; recomputing it", cache)
    lengths = _compute(dataset, log)
    if cache is not None:
        from refvllm.data.index import _save_atomic

        try:
            _save_atomic(cache, lengths)
        except OSError as e:
            logger.warning("cannot write the length cache %s (%s); keeping the lengths in memory", cache, e)
    return lengths


def _cache_file(index, processor) -> Path | None:
    offsets = getattr(index, "_offsets_file", None)
    if offsets is None:
        return None
    path = Path(offsets)
    return path.with_name(f"{path.stem}-lengths-{processor_signature(processor)}.npy")


def _compute(dataset, log) -> np.ndarray:
    n, processor = len(dataset.index), dataset.processor
    lengths = np.ones(n, dtype=np.int64)
    start = last = time.perf_counter()
    for i in range(n):
        try:
            lengths[i] = max(1, processor.estimate_tokens(dataset.index.sample(i)))
        except ConfigError:
            raise  # a template or tokenizer problem holds for every sample
        except Exception:  # noqa: BLE001 (any sample error: skipped with its reason when loaded, module docstring)
            pass
        now = time.perf_counter()
        if now - last > _PROGRESS_EVERY_S:
            log(f"token lengths of {dataset.data_file}: {i + 1}/{n} samples ({now - start:.0f} s)")
            last = now
    return lengths
