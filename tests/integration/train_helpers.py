"""Shared by the training/export integration tests: tiny assets made once, training runs in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"


def make_assets(root: Path, num_train: int = 32) -> dict[str, str]:
    """Synthetic data and tiny checkpoints under ``root``; returns the config overrides that point at them, and
    ``eval_file`` (not a config key: the eval split's path, for ``refvllm eval --data``)."""
    from refvllm.data.synthetic import generate
    from refvllm.model.tiny import write_tiny_checkpoints

    files = generate(root / "data", num_train=num_train, num_eval=4, seed=0)
    paths = write_tiny_checkpoints(root / "tiny", seed=0)
    return {
        "data.train_file": str(files.train_file),
        "eval_file": str(files.eval_file),
        "data.data_root": str(root / "data"),
        "data.index_cache_dir": str(root / "index-cache"),
        "data.synth.enabled": "false",
        "model.tiny": "false",
        "model.vision_path": paths["vision"],
        "model.llm_path": paths["llm"],
    }


def overrides(assets: dict[str, str], output_dir: Path, **extra) -> list[str]:
    """``key=value`` arguments: the demo config shrunk to a few fast steps on the tiny assets."""
    values = {**{k: v for k, v in assets.items() if "." in k}, "model.train_llm": "lora", "data.num_frames": 4,
              "data.num_workers": 0, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.max_steps": 6,
              "train.save_steps": 3,
              "train.save_total_limit": 0, "train.warmup_steps": 2, "train.output_dir": str(output_dir),
              "train.tensorboard": "false", "train.resume": "auto"}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def run_training(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300,
                 config: str = "demo.yaml", accelerate_config: str | None = None):
    """Run scripts/train.py (torchrun with ``nproc`` > 1) with ``configs/CONFIG`` (the demo's by default) and
    ``args``; returns the CompletedProcess (stdout and stderr merged). ``accelerate_config`` (e.g. "fsdp.yaml"):
    started as a user starts it, ``accelerate launch --config_file configs/accelerate/FILE --num_processes
    NPROC`` (also with one process)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    if accelerate_config:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / accelerate_config), "--num_processes", str(nproc),
               "--main_process_port", str(free_port())]  # two test workers may launch at once
    elif nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    cmd += [str(TRAIN_SCRIPT), "--config", str(ROOT / "configs" / config), *args]
    return _finish(_start(cmd, full_env), timeout)


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for ``proc``; past ``timeout`` kill it and every process under it, then fail. torchrun starts its
    workers in sessions of their own, so killing the launcher's process group would leave them running (a hung
    collective spins forever) and holding the output pipe open (this wait would never end)."""
    import psutil

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            child.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s (a hang?): {proc.args}\n{out[-6000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


# Dropout (LoRA and region) off: the two layouts draw their dropout masks from different per-process RNG streams.
# Resume with dropout on (RNG states checkpointed) is covered by test_train.py.
COMMON = dict(model__lora__dropout=0.0, model__region__dropout=0.0, train__max_steps=4, train__save_steps=2)


def one_process_reference(assets: dict[str, str], out: Path) -> Path:
    """The reference of the multi-process tests: one process, train.grad_accum=2 (the global batch of 2
    processes x 1), 4 steps, checkpoints 2 and 4."""
    check_ok(run_training(overrides(assets, out, train__grad_accum=2, **COMMON)))
    return out


def assert_same_training(run: Path, reference: Path) -> None:
    """Losses and trained weights of ``run`` equal the reference's to float tolerance (other reductions)."""
    for (step, a), (step_b, b) in zip(losses(reference), losses(run), strict=True):
        assert step == step_b and b == pytest.approx(a, rel=1e-5, abs=1e-6), step
    w_ref, w_run = weight_tensors(reference / "checkpoint-4"), weight_tensors(run / "checkpoint-4")
    assert sorted(w_ref) == sorted(w_run)
    for name in w_ref:
        torch.testing.assert_close(w_run[name], w_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def free_port() -> int:
    """A TCP port free on localhost now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-6000:]


def losses(output_dir: Path) -> list[tuple[int, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def weight_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a checkpoint (extra trainables + LoRA adapter), by name."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / "extra_trainables.safetensors"))
    adapter = checkpoint / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        tensors.update({f"adapter.{k}": v for k, v in load_file(str(adapter)).items()})
    return tensors


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes and bit patterns (safetensors' header metadata order is not deterministic, so the
    files themselves are not compared byte for byte)."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), f"{name} differs"


def run_training_nodes(args: list[str], nodes: int, timeout: int = 300,
                       env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Run scripts/train.py as ``nodes`` "nodes" of 1 process on this machine: one torchrun launcher per node
    (``--nnodes``, ``--node_rank``, a static rendezvous on 127.0.0.1), started together, as a multi-node job
    starts one launcher per node. Returns each launcher's CompletedProcess (output merged)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", **(env or {})}
    procs = [_start([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
                     f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", str(TRAIN_SCRIPT),
                     "--config", str(ROOT / "configs" / "demo.yaml"), *args], env)
             for rank in range(nodes)]
    results = [_finish(proc, timeout) for proc in procs]
    return results
