"""Evaluation work units: fixed batches of the questions, shared over processes, each written as it finishes.

    ctx = process_context()                        # rank, world, device, barrier (torchrun/accelerate env)
    plan = batch_plan(num_questions, batch_size)   # batch k = questions [k*bs, (k+1)*bs) in file order
    parts = PartFiles(out, key)                    # <out stem>.part-<rank>.jsonl beside METRICS.json
    done = parts.read()                            # {k: results} from every part file, any earlier world size
    mine = [k for k in range(len(plan)) if k % world == rank and k not in done]
    parts.append(rank, k, results)                 # one JSON line per batch, flushed and fsynced
    parts.remove()                                 # once METRICS.json and the predictions are written

Batches are cut from the file order alone, never from the process count, so a question is generated in the
same batch (the same left padding, the same neighbours) by 1 process, by N, and after a resume: the answers
are the same whichever way the work was shared or interrupted. Batch k goes to rank ``k % world``.

A part line carries ``key``, a digest of everything that decides the answers (model, data, format, mode,
generation settings, batch size, prompt and frame settings): a resume from lines of another evaluation is
refused with the files to delete, never mixed in. A line cut short by a crash (the last of a file) is
ignored: its batch is generated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refvllm.errors import ConfigError

# Tests: SIGKILL this process right after it wrote this many batches (an interrupted evaluation).
KILL_AFTER_BATCHES_ENV = "REFVLLM_TEST_EVAL_KILL_AFTER_BATCHES"


@dataclass
class ProcessContext:
    """This process's place in a multi-process evaluation (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1
    device: Any = None  # the device a launcher gives this process (None: the caller's choice)
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()


def process_context() -> ProcessContext:
    """The launcher's processes (``WORLD_SIZE`` > 1, as torchrun and accelerate launch set it) through
    accelerate's PartialState (gloo on CPU, nccl on CUDA, one GPU per process); else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ProcessContext()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return ProcessContext(state.process_index, state.num_processes, state.device, state)


def batch_plan(num_questions: int, batch_size: int) -> list[range]:
    """Question positions of each batch: ``[k * batch_size, (k + 1) * batch_size)``, the last one shorter."""
    return [range(k, min(k + batch_size, num_questions)) for k in range(0, num_questions, batch_size)]


def run_key(settings: dict[str, Any]) -> str:
    """The digest of an evaluation's settings that part lines carry (module docstring)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PartFiles:
    """The part files of the evaluation writing ``metrics_path`` (module docstring)."""

    def __init__(self, metrics_path: str | os.PathLike, key: str):
        path = Path(metrics_path)
        self.folder = path.parent
        self.stem = path.name[: -len(path.suffix)] if path.suffix else path.name
        self.key = key
        self._written = 0

    def path(self, rank: int) -> Path:
        return self.folder / f"{self.stem}.part-{rank}.jsonl"

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.stem}.part-*.jsonl"))

    def read(self) -> dict[int, list[dict]]:
        """``{batch: results}`` of every complete line of every part file; ConfigError for another run's lines."""
        done: dict[int, list[dict]] = {}
        for file in self.files():
            lines = file.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(lines) - 1:
                        continue  # cut short by a crash: that batch runs again
                    raise ConfigError(f"{file} line {n + 1} is not JSON: delete the part files "
                                      f"{self.stem}.part-*.jsonl to start the evaluation afresh") from None
                if record.get("key") != self.key:
                    raise ConfigError(
                        f"{file} holds answers of another evaluation (other model, data, format, mode, generation, "
                        f"batch, prompt or frame settings): delete {self.folder}/{self.stem}.part-*.jsonl, or "
                        f"write this one elsewhere (--out)")
                done[int(record["batch"])] = record["results"]
        return done

    def append(self, rank: int, batch: int, results: list[dict]) -> None:
        """Write one finished batch as one line, flushed to disk before returning."""
        line = json.dumps({"key": self.key, "batch": batch, "results": results}, ensure_ascii=False) + "\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path(rank), "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._written += 1
        if os.environ.get(KILL_AFTER_BATCHES_ENV) == str(self._written):
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(self) -> None:
        for file in self.files():
            file.unlink(missing_ok=True)
