"""Two gloo processes (torchrun + Accelerator(cpu=True)) train like one process at the same global batch, and
a 2-process run killed after a checkpoint resumes exactly."""

import pytest
import torch
from train_helpers import assert_bitwise_equal, check_ok, losses, make_assets, overrides, run_training, weight_tensors

from refvllm.checkpoint import list_checkpoints
from refvllm.train.loop import KILL_AFTER_SAVE_ENV

pytestmark = pytest.mark.slow

# Dropout (LoRA and region) off: the two layouts draw their dropout masks from different per-process RNG streams.
# Resume with dropout on (RNG states checkpointed) is covered by test_train.py.
COMMON = dict(model__lora__dropout=0.0, model__region__dropout=0.0, train__max_steps=4, train__save_steps=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), num_train=16)


def test_two_processes_match_one_process_and_resume_exactly(assets, tmp_path):
    one = tmp_path / "one"
    check_ok(run_training(overrides(assets, one, train__grad_accum=2, **COMMON)))
    two = tmp_path / "two"
    proc = run_training(overrides(assets, two, train__grad_accum=1, **COMMON), nproc=2)
    check_ok(proc)
    assert "resolved config" in proc.stdout and proc.stdout.count("resolved config") == 1  # main process only

    one_losses, two_losses = losses(one), losses(two)
    assert [s for s, _ in two_losses] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one_losses, two_losses, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    w_one, w_two = weight_tensors(one / "checkpoint-4"), weight_tensors(two / "checkpoint-4")
    assert sorted(w_one) == sorted(w_two)
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert sorted(p.name for p in two.glob("checkpoint-4/rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]

    killed = tmp_path / "killed"
    args = overrides(assets, killed, train__grad_accum=1, **COMMON)
    proc = run_training(args, nproc=2, env={KILL_AFTER_SAVE_ENV: "2"})
    assert proc.returncode != 0 and "SIGKILL" in proc.stdout, proc.stdout[-4000:]  # torchrun reports the signal
    assert [s for s, _ in list_checkpoints(killed)] == [2]
    check_ok(run_training(args, nproc=2))
    assert losses(killed) == two_losses
    assert_bitwise_equal(weight_tensors(killed / "checkpoint-4"), w_two)
