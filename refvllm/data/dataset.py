"""The training dataset (lazy, index-backed, bad-sample policy) and its deterministic, resumable sampler.

Contract:

    ds = RefDataset(data_file, data_root, processor, num_frames, image_size, mask_resize, cache_dir=None,
                    limits=DataLimits())
    ds[i]                   # Processor.encode(...) dict, or Skipped(index, id, reason) for a bad sample
    sampler = ResumableSampler(len(ds), seed, micro_batch_size, num_replicas=world, rank=rank)
    sampler.load_state_dict(state)                                      # resume: jump, decode nothing before
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=processor.collator(), num_workers=n)
    ...
    state = sampler.state_dict(consumed=k)      # k = micro-batches this rank took from the loader so far

Bad-sample policy: a sample whose reading, parsing, decoding or processing fails, whatever the exception,
becomes a :class:`Skipped` record (never an exception, never another sample in its place), logged at WARNING
once per sample and process; ``collate`` drops it and reports it in ``num_skipped``/``skipped``.
:class:`BadSampleCounter` stops training with a DataError after ``data.max_bad_samples`` skips. A DataError keeps
its category; any other exception (one the data checks did not foresee, or a bug) is category ``internal``, its
reason names the exception type, and its traceback is logged once, so one odd sample cannot end a run while a
bug that hits every sample still stops it at ``max_bad_samples``. Only what cannot be caught (a crash inside
native code) is out of reach: inputs that reach pycocotools, decord or PIL are checked first (masks.py,
media.py, limits.py). KeyboardInterrupt and SystemExit are not caught.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from refvllm.config import Config
from refvllm.data.decode import FrameSize, as_frame_size, decode_sample
from refvllm.data.index import SampleIndex
from refvllm.data.limits import DEFAULT_LIMITS, DataLimits
from refvllm.data.processor import Processor
from refvllm.data.schema import parse_sample, raw_sample_id
from refvllm.data.types import Skipped
from refvllm.errors import ConfigError, DataError, unexpected_error

__all__ = ["BadSampleCounter", "RefDataset", "ResumableSampler", "Skipped"]

logger = logging.getLogger(__name__)


class RefDataset(torch.utils.data.Dataset):
    """Samples of a JSON/JSONL file, read one at a time through a :class:`SampleIndex`.

    Holds the index (byte offsets) and the processor, never the samples: ``ds[i]`` reads raw sample i, parses,
    decodes its planned frames and masks, and encodes it. Picklable, so DataLoader workers get a copy.
    """

    def __init__(self, data_file: str | os.PathLike, data_root: str | os.PathLike, processor: Processor,
                 num_frames: int, image_size: int | FrameSize, mask_resize: str,
                 cache_dir: str | os.PathLike | None = None, limits: DataLimits = DEFAULT_LIMITS):
        if as_frame_size(image_size) != processor.frame_size:
            raise ConfigError(f"frame size {image_size} differs from the processor's {processor.frame_size}")
        self.data_file = str(data_file)
        self.data_root = str(data_root)
        self.processor = processor
        self.num_frames = num_frames
        self.image_size = image_size
        self.mask_resize = mask_resize
        self.limits = limits
        self.index = SampleIndex(self.data_file, cache_dir=cache_dir, limits=limits)
        self._warned: set[int] = set()  # samples already logged by this process

    @classmethod
    def from_config(cls, cfg: Config, processor: Processor, data_file: str | None = None) -> RefDataset:
        """The dataset of ``data_file`` (default ``data.train_file``); ``data.data_root`` empty = the file's folder."""
        data_file = data_file or cfg.data.train_file
        if not data_file:
            raise ConfigError("config key 'data.train_file' is empty")
        root = cfg.data.data_root or str(Path(data_file).parent)
        return cls(data_file, root, processor, cfg.data.num_frames, processor.frame_size,
                   cfg.data.mask_resize, cfg.data.index_cache_dir or None, cfg.data.limits)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict | Skipped:
        """The processed sample i, or a :class:`Skipped` record when it is bad (module docstring)."""
        raw = None
        try:
            raw = self.index.raw(i)
            sample = parse_sample(raw, i, self.limits)
            decoded = decode_sample(sample, self.data_root, self.num_frames, self.image_size, self.mask_resize,
                                    self.limits)
            return self.processor.encode(decoded)
        except DataError as e:
            return self._skip(i, raw, e)
        except Exception as e:  # noqa: BLE001 (the policy: no sample may end the run, whatever it raises)
            return self._skip(i, raw, unexpected_error(e), exc=e)

    def _skip(self, i: int, raw, error: DataError, exc: Exception | None = None) -> Skipped:
        sample_id = error.sample_id if error.sample_id is not None else raw_sample_id(raw)
        if i not in self._warned:
            self._warned.add(i)
            logger.warning("skipping sample %d (id %s) of %s: %s", i, sample_id, self.data_file, error.reason,
                           exc_info=exc)
        return Skipped(index=i, id=sample_id, reason=error.reason, category=error.category)


class BadSampleCounter:
    """Counts skipped samples against ``data.max_bad_samples`` (-1 = no limit).

    Under several processes, pass every rank's ``skipped`` lists (gathered) to :meth:`add` on every rank, so
    that all ranks stop at the same step. Its state goes into the checkpoint.
    """

    def __init__(self, max_bad_samples: int):
        self.max_bad_samples = max_bad_samples
        self.count = 0

    def add(self, skipped: list[dict]) -> None:
        """Count ``skipped`` (collate's ``{"index", "id", "reason"}`` dicts); DataError past the maximum."""
        self.count += len(skipped)
        if 0 <= self.max_bad_samples < self.count:
            last = skipped[-1]
            raise DataError(f"{self.count} bad samples skipped, more than data.max_bad_samples="
                            f"{self.max_bad_samples}; the last: {last['reason']}", last["index"], last["id"])

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


class ResumableSampler:
    """Deterministic, resumable, infinite batch sampler (yields lists of sample indices, one micro-batch each).

    **The stream.** Epoch e is the permutation ``numpy.random.default_rng([seed, e]).permutation(N)`` (identity
    when ``shuffle=False``); epochs are concatenated into one endless stream of sample indices, so nothing is
    dropped or padded at an epoch's end (a micro-batch may straddle two epochs). The stream is cut into
    *global micro-batches* of ``micro_batch_size`` consecutive indices: global micro-batch g holds stream
    positions ``[g * mb, (g + 1) * mb)``, i.e. epoch ``(g * mb) // N``.

    **Ranks and steps.** Global micro-batch g goes to rank ``g % world`` as that rank's local micro-batch
    ``g // world``. With gradient accumulation A, optimizer step s, micro-step m (0..A-1), rank r uses

        g = (s * A + m) * world + r          (see :meth:`microbatch_indices`)

    so step s consumes global micro-batches ``[s*A*world, (s+1)*A*world)``: the same samples in the same
    micro-batches for every (world, A) with the same ``A * world`` (e.g. 2 processes with A=1 == 1 process with
    A=2), only spread differently over processes. With the loss normalised by the label tokens of the whole
    window, per-step losses match to float tolerance.

    **Resume.** ``position`` is the global micro-batch where iteration starts; rank r yields g = position + r,
    position + world + r, ... Jumping there computes one permutation and touches no sample before it.
    ``state_dict(consumed=k)`` (k = micro-batches this rank took from the loader since iteration began) records
    ``position + k * world``; ``load_state_dict`` restores it (it must be a multiple of ``world``, which holds
    whenever every rank consumed the same number of micro-batches). Prefetching workers may run ahead of the
    trainer; only ``consumed`` counts.

    **Token budget** (``max_tokens`` > 0, with ``lengths``, the estimates of refvllm.data.lengths): each epoch's
    order is cut greedily into micro-batches of consecutive samples whose lengths sum to at most ``max_tokens``
    and that hold at most ``micro_batch_size`` samples (a sample longer than the budget is a micro-batch of its
    own); epochs are not straddled. Global micro-batch g is then the g-th of those cuts, counted over the
    epochs in order; everything above (ranks, steps, resume) holds unchanged.

    **Length grouping** (``group_by_length``): each epoch's permutation is sorted by length (longest first)
    within windows of ``GROUP_WINDOW`` micro-batches' worth of samples, so that padded micro-batches hold
    similar lengths (Hugging Face's ``group_by_length``); still random across windows and epochs.
    """

    GROUP_WINDOW = 64  # micro-batches per sorted window (group_by_length)

    def __init__(self, num_samples: int, seed: int, micro_batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, lengths: np.ndarray | None = None, max_tokens: int = 0,
                 group_by_length: bool = False):
        if num_samples < 1:
            raise ConfigError("the training data has no samples")
        if micro_batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or max_tokens < 0:
            raise ValueError(f"bad sampler setup: micro_batch_size={micro_batch_size}, "
                             f"num_replicas={num_replicas}, rank={rank}, max_tokens={max_tokens}")
        if (max_tokens or group_by_length) and (lengths is None or len(lengths) != num_samples):
            raise ValueError("max_tokens and group_by_length need one length per sample")
        self.num_samples = num_samples
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.max_tokens = max_tokens
        self.group_by_length = group_by_length
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.position = 0
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, order): one epoch in memory
        self._cuts: tuple[int, np.ndarray] | None = None  # (epoch, micro-batch starts) under a token budget
        self._first_batch: list[int] = [0]  # token budget: global index of each epoch's first micro-batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch``: int64 [N], a permutation of 0..N-1."""
        if self._cached is None or self._cached[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle
                     else np.arange(self.num_samples)).astype(np.int64)
            if self.group_by_length:
                order = _grouped(order, self.lengths, self.GROUP_WINDOW * self.micro_batch_size)
            self._cached = (epoch, order)
        return self._cached[1]

    def global_microbatch(self, g: int) -> list[int]:
        """Sample indices of global micro-batch ``g`` (stream positions ``[g*mb, (g+1)*mb)``, or the g-th
        cut under a token budget)."""
        if self.max_tokens:
            epoch, k = self._budget_position(g)
            starts = self._epoch_cuts(epoch)
            return self.epoch_order(epoch)[starts[k]:starts[k + 1]].tolist()
        out = []
        for pos in range(g * self.micro_batch_size, (g + 1) * self.micro_batch_size):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(int(self.epoch_order(epoch)[offset]))
        return out

    def _epoch_cuts(self, epoch: int) -> np.ndarray:
        """Token budget: starts of the micro-batches of ``epoch`` in its order, int64 [B + 1] (last = N)."""
        if self._cuts is None or self._cuts[0] != epoch:
            self._cuts = (epoch, budget_cuts(self.lengths[self.epoch_order(epoch)], self.micro_batch_size,
                                             self.max_tokens))
        return self._cuts[1]

    def _budget_position(self, g: int) -> tuple[int, int]:
        """Token budget: (epoch, micro-batch within it) of global micro-batch ``g``."""
        while self._first_batch[-1] <= g:  # count the cuts of one more epoch
            epoch = len(self._first_batch) - 1
            self._first_batch.append(self._first_batch[-1] + len(self._epoch_cuts(epoch)) - 1)
        epoch = int(np.searchsorted(self._first_batch, g, side="right")) - 1
        return epoch, g - self._first_batch[epoch]

    def microbatch_indices(self, step: int, micro_step: int, grad_accum: int, rank: int | None = None) -> list[int]:
        """Sample indices for optimizer step ``step``, micro-step ``micro_step``, ``rank`` (default: this rank)."""
        rank = self.rank if rank is None else rank
        return self.global_microbatch((step * grad_accum + micro_step) * self.num_replicas + rank)

    def epoch_of(self, g: int) -> int:
        """Epoch of the first sample of global micro-batch ``g`` (for logging)."""
        if self.max_tokens:
            return self._budget_position(g)[0]
        return g * self.micro_batch_size // self.num_samples

    def __iter__(self):
        """Endless: yields this rank's micro-batches from ``position`` on (the trainer stops at max_steps)."""
        g = self.position + self.rank
        while True:
            yield self.global_microbatch(g)
            g += self.num_replicas

    def state_dict(self, consumed: int = 0) -> dict:
        """Position after this rank consumed ``consumed`` micro-batches since iteration began at ``position``."""
        return {"position": self.position + consumed * self.num_replicas, **self._order_settings()}

    def _order_settings(self) -> dict:
        """What decides the data order besides the position (checked on resume)."""
        lengths = "" if self.lengths is None or not (self.max_tokens or self.group_by_length) else \
            hashlib.sha1(self.lengths.tobytes()).hexdigest()[:16]
        return {"seed": self.seed, "num_samples": self.num_samples, "micro_batch_size": self.micro_batch_size,
                "shuffle": self.shuffle, "max_tokens": self.max_tokens, "group_by_length": self.group_by_length,
                "lengths": lengths}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["position"]``; the data and sampling settings must be those of the checkpoint
        (a checkpoint from before the token budget existed had neither budget nor grouping)."""
        defaults = {"max_tokens": 0, "group_by_length": False, "lengths": ""}
        for key, value in self._order_settings().items():
            have = state.get(key, defaults.get(key))
            if have != value:
                what = "token-length estimates (the data file or the processor changed)" if key == "lengths" else \
                    f"{key}={have}, this run {key}={value}"
                raise ConfigError(f"cannot resume the data order exactly: the checkpoint has {what}")
        if state["position"] % self.num_replicas:
            raise ConfigError(f"cannot resume at global micro-batch {state['position']} with "
                              f"{self.num_replicas} processes: it is not a multiple of the process count")
        self.position = int(state["position"])


def budget_cuts(lengths: np.ndarray, max_samples: int, max_tokens: int) -> np.ndarray:
    """Greedy cut of ``lengths`` (int [N], in order) into runs of at most ``max_samples`` items summing to at
    most ``max_tokens`` (an item longer than that alone): the starts, int64 [B + 1], last = N."""
    starts, total, count = [0], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if count and (count == max_samples or total + n > max_tokens):
            starts.append(i)
            total, count = 0, 0
        total += n
        count += 1
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


def _grouped(order: np.ndarray, lengths: np.ndarray, window: int) -> np.ndarray:
    """``order`` with each window of ``window`` positions sorted by length, longest first (stable)."""
    out = order.copy()
    for start in range(0, len(order), window):
        part = order[start:start + window]
        out[start:start + window] = part[np.argsort(-lengths[part], kind="stable")]
    return out
