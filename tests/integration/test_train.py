"""Training end to end on tiny assets: the loss falls, checkpoints are complete, and a run killed with SIGKILL
right after a checkpoint resumes exactly (same per-step losses, bitwise the same trained weights) without
decoding the batches it had already consumed."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import assert_bitwise_equal, check_ok, losses, make_assets, overrides, run_training, weight_tensors

from refvllm.checkpoint import list_checkpoints
from refvllm.data.dataset import ResumableSampler
from refvllm.train.loop import KILL_AFTER_SAVE_ENV

pytestmark = pytest.mark.slow


def _delete_media_of_first_samples(assets: dict, micro_batches: int) -> int:
    """Remove the media of every sample in the first ``micro_batches`` global micro-batches (the ones the
    checkpoint has consumed): a resume that decoded them again would skip them and fail (max_bad_samples=0)."""
    records = json.loads(Path(assets["data.train_file"]).read_text())
    sampler = ResumableSampler(len(records), seed=0, micro_batch_size=2)
    consumed = {i for g in range(micro_batches) for i in sampler.global_microbatch(g)}
    for i in consumed:
        media = records[i].get("video") or records[i].get("image")
        path = f"{assets['data.data_root']}/{media}"
        if os.path.isdir(path):  # a video stored as a folder of frames
            shutil.rmtree(path)
        else:
            os.remove(path)
    return len(consumed)


def test_kill_after_checkpoint_then_resume_is_exact(tmp_path):
    assets = make_assets(tmp_path / "assets")  # its own: the test deletes media
    # LoRA dropout on (and region dropout, from the demo config): exact resume needs the RNG states restored.
    common = dict(model__lora__dropout=0.1, data__max_bad_samples=0, data__num_workers=1)
    full = tmp_path / "full"
    proc = run_training(overrides(assets, full, **common))
    check_ok(proc)
    assert [s for s, _ in list_checkpoints(full)] == [3, 6]
    full_losses = losses(full)
    assert [s for s, _ in full_losses] == [1, 2, 3, 4, 5, 6]
    assert full_losses[-1][1] < full_losses[0][1] - 0.05  # it learns
    record = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["tokens_per_s"] > 0 and record["lr"] > 0 and record["num_skipped"] == 0
    assert "resolved config:" in proc.stdout and "train:" in proc.stdout
    assert (full / "loss_curve.png").is_file()

    killed = tmp_path / "killed"
    proc = run_training(overrides(assets, killed, **common), env={KILL_AFTER_SAVE_ENV: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-4000:]
    assert [s for s, _ in list_checkpoints(killed)] == [3]
    assert losses(killed) == full_losses[:3]

    # The checkpoint is at global micro-batch 6 (3 steps x grad_accum 2): its samples are gone now.
    assert _delete_media_of_first_samples(assets, micro_batches=6) >= 6
    proc = run_training(overrides(assets, killed, **common))
    check_ok(proc)
    assert "resuming from" in proc.stdout and "checkpoint-3" in proc.stdout
    assert losses(killed) == full_losses  # same floats, same steps, no duplicate lines
    trained = weight_tensors(full / "checkpoint-6")
    assert any(k.startswith("adapter.") for k in trained) and any(k.startswith("region.") for k in trained)
    assert_bitwise_equal(weight_tensors(killed / "checkpoint-6"), trained)
    opt_a = torch.load(full / "checkpoint-6" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(killed / "checkpoint-6" / "optimizer.pt", weights_only=True)
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[k], opt_b["state"][key][k]) for k in state)
    trainer = json.loads((killed / "checkpoint-6" / "trainer_state.json").read_text())
    assert trainer["step"] == 6 and trainer["sampler"]["position"] == 12 and trainer["num_skipped"] == 0


def test_bad_samples_are_counted_then_stop_training(tmp_path):
    """Both samples of step 1 have no media: step 1 runs the dummy batch (loss 0) and counts 2 skips; one more
    bad sample at step 3 passes data.max_bad_samples=2 and training stops with one clear line (no traceback)."""
    assets = make_assets(tmp_path / "assets", num_train=16)
    records = json.loads(Path(assets["data.train_file"]).read_text())
    sampler = ResumableSampler(len(records), seed=0, micro_batch_size=2)
    bad = [*sampler.global_microbatch(0), sampler.global_microbatch(2)[0]]
    for i in bad:
        records[i]["video" if "video" in records[i] else "image"] = "missing/nowhere.mp4"
    Path(assets["data.train_file"]).write_text(json.dumps(records))
    out = tmp_path / "run"
    proc = run_training(overrides(assets, out, data__max_bad_samples=2, train__grad_accum=1, train__max_steps=4))
    assert proc.returncode == 1, proc.stdout[-3000:]
    (error,) = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert "data.max_bad_samples=2" in error and f"sample {bad[-1]}" in error
    assert "Traceback" not in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["num_skipped"], r["samples"]) for r in records] == [(1, 2, 0), (2, 2, 2)]
    assert records[0]["loss"] == 0.0 and records[1]["loss"] > 1.0


def test_token_budget_micro_batches_train_and_checkpoint_their_order(tmp_path):
    """``train.max_tokens`` from the command line: the lengths are estimated once and cached, each step's
    micro-batch is the sampler's budget cut (so the samples per step vary) and its estimated tokens are the
    tokens it trained on, and the checkpoint records the budget and the lengths' digest a resume checks."""
    import numpy as np

    assets = make_assets(tmp_path / "assets", num_train=24)
    out = tmp_path / "run"
    proc = run_training(overrides(assets, out, train__micro_batch_size=6, train__max_tokens=250,
                                  train__grad_accum=1, train__max_steps=3, train__save_steps=3))
    check_ok(proc)
    (cache,) = Path(assets["data.index_cache_dir"]).glob("*-lengths-*.npy")
    lengths = np.load(cache)
    sampler = ResumableSampler(24, seed=0, micro_batch_size=6, lengths=lengths, max_tokens=250)
    batches = [sampler.global_microbatch(g) for g in range(3)]
    assert len({len(b) for b in batches}) > 1 and all(lengths[b].sum() <= 250 for b in batches)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.diff([0] + [r["samples"] for r in records]).tolist() == [len(b) for b in batches]
    # The estimate is exact on this data (every video has at least data.num_frames frames).
    assert np.diff([0] + [r["tokens"] for r in records]).tolist() == [int(lengths[b].sum()) for b in batches]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["sampler"]
    assert state["max_tokens"] == 250 and state["position"] == 3 and len(state["lengths"]) == 16


def _deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.gpu
@pytest.mark.parametrize("launch, extra", [("zero3.yaml", {}), ("fsdp.yaml", {"train__mixed_precision": "bf16"})])
def test_sharded_checkpoints_gather_full_weights_and_resume_exactly(tmp_path, launch, extra):
    """ZeRO-3 (weights partitioned from from_pretrained on) and FSDP2 in bf16 through accelerate on one GPU: the
    checkpoint holds every trained weight at full shape, and a run killed after it resumes with the same losses
    and the same weights. On CPU, 2 processes of each: tests/integration/test_sharded.py."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if launch == "zero3.yaml" and not _deepspeed_available():
        pytest.skip("needs deepspeed")
    assets = make_assets(tmp_path / "assets", num_train=16)
    common = dict(model__lora__dropout=0.0, model__region__dropout=0.0, train__max_steps=4, train__save_steps=2,
                  **extra)
    full, killed = tmp_path / "full", tmp_path / "killed"
    check_ok(run_training(overrides(assets, full, **common), accelerate_config=launch, timeout=900))
    args = overrides(assets, killed, **common)
    assert run_training(args, env={KILL_AFTER_SAVE_ENV: "2"}, accelerate_config=launch, timeout=900).returncode != 0
    check_ok(run_training(args, accelerate_config=launch, timeout=900))
    # Bitwise on CPU (measured); CUDA kernels may reorder sums, hence the float tolerance.
    assert [s for s, _ in losses(killed)] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(losses(full), losses(killed), strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    trained, resumed = weight_tensors(full / "checkpoint-4"), weight_tensors(killed / "checkpoint-4")
    assert any(k.startswith("adapter.") for k in trained) and all(t.numel() > 0 for t in trained.values())
    assert sorted(trained) == sorted(resumed)
    for name, tensor in trained.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
