"""The trainer's side of checkpoints: its state, RNG, optimizer and scheduler files, atomic writing, rotation,
and finding the one to resume from. The format itself (layout, trained weights, loading for inference) is
refvllm/checkpoint.py, which export, inference and evaluation use without importing the trainer.

Layout of ``OUTPUT_DIR/checkpoint-STEP/`` (see docs/training.md):

    config.yaml              the resolved config of the run
    adapter/                 the LLM's LoRA adapter in PEFT layout (adapter_config.json names the base model,
                             adapter_model.safetensors); absent when the LLM is not LoRA-trained
    trainables.safetensors   every other trainable weight (projector, region encoder, full-trained modules)
    optimizer.pt             optimizer state (torch.save; loaded with weights_only=True)
    scheduler.pt             LR scheduler state (weights_only)
    rng_state_{rank}.pt      per process: python, numpy, torch CPU and CUDA generator states (weights_only)
    trainer_state.json       step, data-loader position, token / sample / skipped counters, per-step losses
    COMPLETE                 written last; a directory without it is never resumed from

A checkpoint is written into ``OUTPUT_DIR/.tmp-checkpoint-STEP`` and renamed when complete, so a crash while
saving leaves at most a temporary directory (removed at the next start), never a checkpoint that resume
would pick.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refvllm.checkpoint import (
    COMPLETE_MARKER,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
)
from refvllm.errors import ConfigError

TMP_PREFIX = ".tmp-checkpoint-"


@dataclass
class TrainerState:
    """Counters of a run, saved as ``trainer_state.json``.

    step: optimizer updates done. micro_batches: data-loader batches each process has consumed (the loader's
    position: resume starts the sampler right after them, decoding nothing before). samples / tokens: global
    totals seen (tokens = non-padding input tokens, label_tokens = tokens in the loss). num_skipped: bad
    samples skipped so far (all processes). losses: the per-step loss history.
    """

    step: int = 0
    micro_batches: int = 0
    samples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    num_skipped: int = 0
    world_size: int = 1
    micro_batch_size: int = 1
    grad_accum: int = 1
    losses: list[float] = field(default_factory=list)
    sampler: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainerState:
        data = json.loads(Path(path).read_text())
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``train.resume`` names: ``none`` -> None, ``auto`` -> newest complete one (or None
    when there is none yet), else a path that must be a complete checkpoint (ConfigError otherwise)."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume: checkpoint directory '{path}' does not exist")
    if not is_complete(path):
        raise ConfigError(f"train.resume: '{path}' is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return path


def remove_stale_tmp(output_dir: str | os.PathLike) -> list[str]:
    """Delete temporary checkpoint directories left by a crash while saving; returns their names."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child)
                removed.append(child.name)
    return removed


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain (``keep <= 0``: keep all)."""
    if keep <= 0:
        return []
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[: max(0, len(found) - keep)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def tmp_checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{TMP_PREFIX}{step}"


def finalize_checkpoint(tmp: Path, final: Path) -> Path:
    """Mark ``tmp`` complete and rename it to ``final`` (replacing an older checkpoint of the same step)."""
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    _fsync_tree(tmp)
    if final.exists():
        # Same step saved again (e.g. a re-run after resume from an earlier checkpoint): swap atomically
        # enough that either the old or the new complete checkpoint exists at every instant.
        old = final.with_name(final.name + ".old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final


def _fsync_tree(root: Path) -> None:
    """Flush every file of ``root`` to disk before the rename makes the checkpoint visible."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's generator states as tensors / plain Python values (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(ckpt: str | os.PathLike, rank: int) -> Path:
    return Path(ckpt) / f"rng_state_{rank}.pt"


def save_rng(ckpt: str | os.PathLike, rank: int) -> None:
    torch.save(rng_state(), rng_file(ckpt, rank))


def load_rng(ckpt: str | os.PathLike, rank: int) -> None:
    path = rng_file(ckpt, rank)
    if not path.is_file():
        raise ConfigError(f"train.resume: '{ckpt}' has no RNG state for process {rank} ({path.name}); resume with "
                          "the number of processes that wrote it")
    set_rng_state(torch.load(path, weights_only=True))


def save_torch_state(obj: Any, path: str | os.PathLike) -> None:
    torch.save(obj, path)


def load_torch_state(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers (never arbitrary pickles); ``mmap``: tensors
    mapped from the file, read when used."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
