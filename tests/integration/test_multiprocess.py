"""Two gloo processes (torchrun + Accelerator(cpu=True): DDP; accelerate launch with configs/accelerate/fsdp.yaml:
FSDP2) train like one process at the same global batch, a 2-process run killed after a checkpoint resumes
exactly, checkpoints resume on the other process count (elastic: 2 -> 1 and 1 -> 2, train.grad_accum
recomputed), and ranks whose batches differ in kind (no region, no media, all skipped) do not hang."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import (
    assert_bitwise_equal,
    check_ok,
    losses,
    make_assets,
    overrides,
    run_training,
    run_training_nodes,
    weight_tensors,
)

from refvllm.checkpoint import list_checkpoints
from refvllm.train.loop import KILL_AFTER_SAVE_ENV

pytestmark = pytest.mark.slow

# Dropout (LoRA and region) off: the two layouts draw their dropout masks from different per-process RNG streams.
# Resume with dropout on (RNG states checkpointed) is covered by test_train.py.
COMMON = dict(model__lora__dropout=0.0, model__region__dropout=0.0, train__max_steps=4, train__save_steps=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), num_train=16)


@pytest.fixture(scope="module")
def one(assets, tmp_path_factory):
    """The reference: one process, train.grad_accum=2 (the global batch of 2 processes x 1)."""
    out = tmp_path_factory.mktemp("one") / "run"
    check_ok(run_training(overrides(assets, out, train__grad_accum=2, **COMMON)))
    return out


def _assert_same_training(run: Path, reference: Path) -> None:
    """Losses and trained weights of ``run`` equal the reference's to float tolerance (other reductions)."""
    for (step, a), (step_b, b) in zip(losses(reference), losses(run), strict=True):
        assert step == step_b and b == pytest.approx(a, rel=1e-5, abs=1e-6), step
    w_ref, w_run = weight_tensors(reference / "checkpoint-4"), weight_tensors(run / "checkpoint-4")
    assert sorted(w_ref) == sorted(w_run)
    for name in w_ref:
        torch.testing.assert_close(w_run[name], w_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_match_one_process_and_resume_exactly(assets, one, tmp_path):
    two = tmp_path / "two"
    proc = run_training(overrides(assets, two, train__grad_accum=1, **COMMON), nproc=2)
    check_ok(proc)
    assert "resolved config" in proc.stdout and proc.stdout.count("resolved config") == 1  # main process only

    assert "distributed: MULTI_CPU over 2 processes" in proc.stdout
    one_losses, two_losses = losses(one), losses(two)
    assert [s for s, _ in two_losses] == [1, 2, 3, 4]
    _assert_same_training(two, one)
    w_two = weight_tensors(two / "checkpoint-4")
    assert sorted(p.name for p in two.glob("checkpoint-4/rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]

    # Two "nodes" of one process each (a launcher per node, rendezvous on localhost): the 2-process run again.
    nodes = tmp_path / "nodes"
    for proc in run_training_nodes(overrides(assets, nodes, train__grad_accum=1, **COMMON), nodes=2):
        check_ok(proc)
    assert losses(nodes) == two_losses
    assert_bitwise_equal(weight_tensors(nodes / "checkpoint-4"), w_two)

    killed = tmp_path / "killed"
    args = overrides(assets, killed, train__grad_accum=1, **COMMON)
    proc = run_training(args, nproc=2, env={KILL_AFTER_SAVE_ENV: "2"})
    assert proc.returncode != 0 and "SIGKILL" in proc.stdout, proc.stdout[-4000:]  # torchrun reports the signal
    assert [s for s, _ in list_checkpoints(killed)] == [2]
    check_ok(run_training(args, nproc=2))
    assert losses(killed) == two_losses
    assert_bitwise_equal(weight_tensors(killed / "checkpoint-4"), w_two)

    # Elastic: each run's step-2 checkpoint resumed on the other process count, with its own config (so
    # train.grad_accum is recomputed): the same samples per step, so the same losses to float tolerance.
    for source, nproc, accum, reference, message in (
            (two, 1, 1, two_losses, "elastic resume: 2 -> 1 processes, train.grad_accum 1 -> 2"),
            (one, 2, 2, one_losses, "elastic resume: 1 -> 2 processes, train.grad_accum 2 -> 1")):
        elastic = tmp_path / f"elastic-to-{nproc}"
        elastic.mkdir()
        shutil.copytree(source / "checkpoint-2", elastic / "checkpoint-2")
        proc = run_training(overrides(assets, elastic, train__grad_accum=accum, **COMMON), nproc=nproc)
        check_ok(proc)
        assert message in proc.stdout
        resumed = dict(losses(elastic))
        assert sorted(resumed) == [3, 4]
        for step, loss in reference[2:]:
            assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        state = json.loads((elastic / "checkpoint-4" / "trainer_state.json").read_text())
        assert state["sampler"]["position"] == 8 and state["world_size"] == nproc  # 4 steps x 2 micro-batches


def _split_by_rank(assets: dict, out: Path, steps: int, bad_step: int) -> Path:
    """A 16-sample train file laid out so that, with 2 processes and micro-batches of 2, rank 0 only ever gets
    samples without a region (counting questions) and rank 1 only referring ones, and rank 1's whole
    micro-batch of step ``bad_step`` has missing media (skipped: the dummy batch, no video, no region)."""
    from refvllm.data.dataset import ResumableSampler

    records = json.loads(Path(assets["data.train_file"]).read_text())
    plain = [r for r in records if not r.get("annotation")]
    referring = [r for r in records if r.get("annotation")]
    sampler = ResumableSampler(16, seed=0, micro_batch_size=2)
    layout: list = [None] * 16
    taken = [0, 0]
    for g in range(2 * steps):  # one epoch: each sample index once
        pool = referring if g % 2 else plain
        for i in sampler.global_microbatch(g):
            layout[i] = dict(pool[taken[g % 2] % len(pool)])  # a few plain samples appear twice
            taken[g % 2] += 1
            if g == 2 * (bad_step - 1) + 1:
                layout[i]["video" if "video" in layout[i] else "image"] = "missing/nowhere.mp4"
    out.write_text(json.dumps(layout))
    return out


@pytest.mark.parametrize("modules", ["trained", "frozen"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_with_different_kinds_of_batches_do_not_hang(tmp_path, modules, strategy):
    """DDP waits for every trainable parameter's gradient on every rank, FSDP2 gathers each unit's parameters
    and reduces its gradients collectively: a rank whose batches hold no region (or, all skipped, no media at
    all) must still run every module. Every run finishes within the timeout."""
    assets = make_assets(tmp_path / "assets", num_train=24)
    train_file = _split_by_rank(assets, tmp_path / "split.json", steps=4, bad_step=3)
    frozen = {"model__train_vision": "frozen", "model__train_region": "frozen"} if modules == "frozen" else {}
    out = tmp_path / "run"
    proc = run_training(overrides({**assets, "data.train_file": str(train_file)}, out, train__grad_accum=1,
                                  data__max_bad_samples=2, **COMMON, **frozen), nproc=2, timeout=120,
                        accelerate_config="fsdp.yaml" if strategy == "fsdp" else None)
    check_ok(proc)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["num_skipped"] for r in records] == [0, 0, 2, 2]  # rank 1's step-3 micro-batch, both samples
    assert all(r["loss"] > 0 for r in records)


def test_fsdp_matches_one_process_resumes_exactly_and_on_one_process(assets, one, tmp_path):
    """FSDP2 as a user starts it (accelerate launch, configs/accelerate/fsdp.yaml): the LLM's decoder layers and
    the vision tower's encoder layers are their own units, LoRA trains beside the frozen base in them;
    checkpoints hold the files of any other run, gathered from the shards, and resume exactly (SIGKILL) and on
    one process (the full optimizer state by name loads on any process count)."""
    fsdp = tmp_path / "fsdp"
    args = overrides(assets, fsdp, train__grad_accum=1, **COMMON)
    proc = run_training(args, nproc=2, accelerate_config="fsdp.yaml")
    check_ok(proc)
    assert ("distributed: FSDP2 over 2 processes: own units Qwen2DecoderLayer x2, SiglipEncoderLayer x2"
            in proc.stdout)
    _assert_same_training(fsdp, one)
    assert _files(fsdp / "checkpoint-4") == _files(one / "checkpoint-4") | {"rng_state_1.pt"}

    killed = tmp_path / "killed"
    args = overrides(assets, killed, train__grad_accum=1, **COMMON)
    proc = run_training(args, nproc=2, env={KILL_AFTER_SAVE_ENV: "2"}, accelerate_config="fsdp.yaml")
    assert proc.returncode != 0 and [s for s, _ in list_checkpoints(killed)] == [2], proc.stdout[-4000:]
    check_ok(run_training(args, nproc=2, accelerate_config="fsdp.yaml"))
    assert losses(killed) == losses(fsdp)
    assert_bitwise_equal(weight_tensors(killed / "checkpoint-4"), weight_tensors(fsdp / "checkpoint-4"))

    elastic = tmp_path / "elastic"
    elastic.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", elastic / "checkpoint-2")
    proc = run_training(overrides(assets, elastic, train__grad_accum=2, **COMMON), nproc=1,
                        accelerate_config="fsdp.yaml")
    check_ok(proc)
    assert "elastic resume: 2 -> 1 processes" in proc.stdout and "FSDP2 over 1 process:" in proc.stdout
    resumed = dict(losses(elastic))
    assert sorted(resumed) == [3, 4]
    for step, loss in losses(fsdp)[2:]:
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)


def _files(checkpoint: Path) -> set[str]:
    return {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
