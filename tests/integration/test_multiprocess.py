"""Two gloo processes (torchrun + Accelerator(cpu=True): DDP) train like one process at the same global batch, as
do 2 "nodes" of one process, which killed after a checkpoint resume exactly; checkpoints resume on
the other process count (elastic: 2 -> 1 and 1 -> 2, train.grad_accum recomputed); ranks whose batches differ
in kind (no region, no media, all skipped) do not hang, under DDP and FSDP2. FSDP2 and DeepSpeed otherwise:
test_sharded.py."""

import json
import shutil
from pathlib import Path

import pytest
from train_helpers import (
    COMMON,
    assert_bitwise_equal,
    assert_same_training,
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


def test_two_processes_match_one_process_and_resume_exactly(small_assets, one, tmp_path):
    two = tmp_path / "two"
    proc = run_training(overrides(small_assets, two, train__grad_accum=1, **COMMON), nproc=2)
    check_ok(proc)
    assert "resolved config" in proc.stdout and proc.stdout.count("resolved config") == 1  # main process only

    assert "distributed: MULTI_CPU over 2 processes" in proc.stdout
    one_losses, two_losses = losses(one), losses(two)
    assert [s for s, _ in two_losses] == [1, 2, 3, 4]
    assert_same_training(two, one)
    w_two = weight_tensors(two / "checkpoint-4")
    assert sorted(p.name for p in two.glob("checkpoint-4/rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]

    # Two "nodes" of one process each (a launcher per node, rendezvous on localhost), killed (SIGKILL) after
    # checkpoint 2 and started again: the single-launcher 2-process run, exactly.
    nodes = tmp_path / "nodes"
    args = overrides(small_assets, nodes, train__grad_accum=1, **COMMON)
    killed = run_training_nodes(args, nodes=2, env={KILL_AFTER_SAVE_ENV: "2"})
    assert all(proc.returncode != 0 for proc in killed) and "SIGKILL" in killed[0].stdout, killed[0].stdout[-4000:]
    assert [s for s, _ in list_checkpoints(nodes)] == [2]
    assert_bitwise_equal(weight_tensors(nodes / "checkpoint-2"), weight_tensors(two / "checkpoint-2"))
    resumed = run_training_nodes(args, nodes=2)
    for proc in resumed:
        check_ok(proc)
    assert "resuming from" in resumed[0].stdout  # the main process is node 0's
    assert losses(nodes) == two_losses
    assert_bitwise_equal(weight_tensors(nodes / "checkpoint-4"), w_two)

    # Elastic: each run's step-2 checkpoint resumed on the other process count, with its own config (so
    # train.grad_accum is recomputed): the same samples per step, so the same losses to float tolerance.
    for source, nproc, accum, reference, message in (
            (two, 1, 1, two_losses, "elastic resume: 2 -> 1 processes, train.grad_accum 1 -> 2"),
            (one, 2, 2, one_losses, "elastic resume: 1 -> 2 processes, train.grad_accum 2 -> 1")):
        elastic = tmp_path / f"elastic-to-{nproc}"
        elastic.mkdir()
        shutil.copytree(source / "checkpoint-2", elastic / "checkpoint-2")
        proc = run_training(overrides(small_assets, elastic, train__grad_accum=accum, **COMMON), nproc=nproc)
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

