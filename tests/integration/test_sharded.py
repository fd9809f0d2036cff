"""FSDP2 and DeepSpeed ZeRO-2/3 on 2 gloo processes, each started as a user starts it (accelerate launch with
configs/accelerate/{fsdp,zero2,zero3}.yaml): the losses and trained weights of one process at the same global
batch, exact resume after SIGKILL, FSDP also on another process count. The hang tests with FSDP are in
test_multiprocess.py beside DDP's."""


import shutil
from pathlib import Path

import pytest
from train_helpers import (
    COMMON,
    assert_bitwise_equal,
    assert_same_training,
    check_ok,
    losses,
    overrides,
    run_training,
    weight_tensors,
)

from refvllm.checkpoint import list_checkpoints
from refvllm.train.loop import KILL_AFTER_SAVE_ENV

pytestmark = pytest.mark.slow


def test_fsdp_matches_one_process_resumes_exactly_and_on_one_process(small_assets, one, tmp_path):
    """FSDP2 as a user starts it (accelerate launch, configs/accelerate/fsdp.yaml): the LLM's decoder layers and
    the vision tower's encoder layers are their own units, LoRA trains beside the frozen base in them;
    checkpoints hold the files of any other run, gathered from the shards, and resume exactly (SIGKILL) and on
    one process (the full optimizer state by name loads on any process count). One sample a micro-batch and 2
    micro-batches a step on each process: the reference's 4 samples a step, with FSDP's accumulation (no
    reduce-scatter until the last micro-batch) in the path."""
    per_process = dict(train__micro_batch_size=1, train__grad_accum=2, **COMMON)
    fsdp = tmp_path / "fsdp"
    args = overrides(small_assets, fsdp, **per_process)
    proc = run_training(args, nproc=2, accelerate_config="fsdp.yaml")
    check_ok(proc)
    assert ("distributed: FSDP2 over 2 processes: own units Qwen2DecoderLayer x2, SiglipEncoderLayer x2"
            in proc.stdout)
    assert_same_training(fsdp, one)
    assert _files(fsdp / "checkpoint-4") == _files(one / "checkpoint-4") | {"rng_state_1.pt"}

    killed = tmp_path / "killed"
    args = overrides(small_assets, killed, **per_process)
    proc = run_training(args, nproc=2, env={KILL_AFTER_SAVE_ENV: "2"}, accelerate_config="fsdp.yaml")
    assert proc.returncode != 0 and [s for s, _ in list_checkpoints(killed)] == [2], proc.stdout[-4000:]
    check_ok(run_training(args, nproc=2, accelerate_config="fsdp.yaml"))
    assert losses(killed) == losses(fsdp)
    assert_bitwise_equal(weight_tensors(killed / "checkpoint-4"), weight_tensors(fsdp / "checkpoint-4"))

    elastic = tmp_path / "elastic"
    elastic.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", elastic / "checkpoint-2")
    proc = run_training(overrides(small_assets, elastic, **{**per_process, "train__grad_accum": 4}), nproc=1,
                        accelerate_config="fsdp.yaml")
    check_ok(proc)
    assert "elastic resume: 2 -> 1 processes, train.grad_accum 2 -> 4" in proc.stdout
    assert "FSDP2 over 1 process:" in proc.stdout
    resumed = dict(losses(elastic))
    assert sorted(resumed) == [3, 4]
    for step, loss in losses(fsdp)[2:]:
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)


def _files(checkpoint: Path) -> set[str]:
    return {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_matches_one_process_and_resumes_after_sigkill(small_assets, one, tmp_path, stage):
    """DeepSpeed on 2 gloo processes as a user starts it (accelerate launch, configs/accelerate/STAGE.yaml):
    the losses and the trained weights (under ZeRO-3 gathered from the partitions) of one process at the same
    global batch. ZeRO-3 also killed after checkpoint 2 and resumed: bitwise the uninterrupted run (ZeRO-2
    resumes through the same DeepSpeed checkpoint calls; one launch less in the suite). The first DeepSpeed run
    on a machine compiles DeepSpeed's CPU communication op (about a minute)."""
    pytest.importorskip("deepspeed")
    config = f"{stage}.yaml"
    full = tmp_path / "full"
    proc = run_training(overrides(small_assets, full, train__grad_accum=1, **COMMON), nproc=2, accelerate_config=config,
                        timeout=600)
    check_ok(proc)
    assert "distributed: DEEPSPEED over 2 processes" in proc.stdout
    assert_same_training(full, one)
    if stage == "zero2":
        return
    killed = tmp_path / "killed"
    args = overrides(small_assets, killed, train__grad_accum=1, **COMMON)
    proc = run_training(args, nproc=2, env={KILL_AFTER_SAVE_ENV: "2"}, accelerate_config=config)
    assert proc.returncode != 0 and [s for s, _ in list_checkpoints(killed)] == [2], proc.stdout[-4000:]
    proc = run_training(args, nproc=2, accelerate_config=config)
    check_ok(proc)
    assert "resuming from" in proc.stdout
    assert losses(killed) == losses(full)
    assert_bitwise_equal(weight_tensors(killed / "checkpoint-4"), weight_tensors(full / "checkpoint-4"))
