"""Checkpoint files, discovery, rotation, RNG round trips, the LR schedule and DeepSpeed config filling."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from refvllm import checkpoint as fmt
from refvllm.config import load_config
from refvllm.errors import ConfigError
from refvllm.train import checkpoint as ckpt
from refvllm.train.distributed import fill_deepspeed_config
from refvllm.train.metrics import MetricsWriter, plot_loss_curve, read_metrics
from refvllm.train.schedule import build_optimizer, build_scheduler, lr_factor, param_groups


def _fake_checkpoint(root, step, complete=True):
    tmp = ckpt.tmp_checkpoint_dir(root, step)
    tmp.mkdir(parents=True)
    ckpt.TrainerState(step=step).save(tmp / fmt.TRAINER_STATE_FILE)
    if complete:
        return ckpt.finalize_checkpoint(tmp, fmt.checkpoint_dir(root, step))
    return tmp


def test_finalize_lists_and_rotates(tmp_path):
    for step in (10, 2, 30):
        _fake_checkpoint(tmp_path, step)
    # a crash while saving: a temporary dir, and a checkpoint-like dir without the marker
    _fake_checkpoint(tmp_path, 40, complete=False)
    (tmp_path / "checkpoint-50").mkdir()
    assert [s for s, _ in fmt.list_checkpoints(tmp_path)] == [2, 10, 30]
    assert fmt.latest_checkpoint(tmp_path).name == "checkpoint-30"
    assert ckpt.remove_stale_tmp(tmp_path) == [".tmp-checkpoint-40"]
    removed = ckpt.rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert [s for s, _ in fmt.list_checkpoints(tmp_path)] == [10, 30]
    assert ckpt.rotate_checkpoints(tmp_path, keep=0) == []


def test_finalize_replaces_same_step(tmp_path):
    first = _fake_checkpoint(tmp_path, 5)
    (first / "old.txt").write_text("old")
    second = _fake_checkpoint(tmp_path, 5)
    assert second == first and not (second / "old.txt").exists() and fmt.is_complete(second)
    assert not (tmp_path / "checkpoint-5.old").exists()


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    path = _fake_checkpoint(tmp_path, 3)
    assert ckpt.resolve_resume("auto", tmp_path) == path
    assert ckpt.resolve_resume(str(path), tmp_path) == path
    with pytest.raises(ConfigError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    partial = _fake_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(partial), tmp_path)


def test_trainer_state_round_trip(tmp_path):
    state = ckpt.TrainerState(step=7, micro_batches=14, samples=56, tokens=999, num_skipped=2, world_size=2,
                              losses=[3.5, 3.25], sampler={"position": 28, "seed": 0})
    state.save(tmp_path / "s.json")
    assert ckpt.TrainerState.load(tmp_path / "s.json") == state


def test_rng_round_trip_is_weights_only_and_exact(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    ckpt.save_rng(tmp_path, rank=1)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.load_rng(tmp_path, rank=1)  # torch.load(weights_only=True) inside
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
    with pytest.raises(ConfigError, match="no RNG state for process 0"):
        ckpt.load_rng(tmp_path, rank=0)


def test_lr_factor_warmup_then_cosine():
    f = [lr_factor(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[9] == pytest.approx(0.55) and f[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))  # non-increasing after warm-up
    assert f[15] == pytest.approx(0.1)  # clamped past the end
    assert lr_factor(0, 0, 10, 0.0) == 1.0


def test_optimizer_groups_and_scheduler():
    cfg = load_config(None, ["train.lr=0.1", "train.projector_lr=0.2", "train.weight_decay=0.01",
                             "train.warmup_steps=2", "train.max_steps=10"])
    proj = torch.nn.Linear(3, 3)
    llm = torch.nn.Linear(3, 3, bias=False)
    groups = param_groups({"llm": list(llm.parameters()), "projector": list(proj.parameters()), "vision": []}, cfg)
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("llm", 0.1, 0.01, 1), ("projector", 0.2, 0.01, 1), ("projector.no_decay", 0.2, 0.0, 1)]
    opt = build_optimizer({"llm": list(llm.parameters()), "projector": list(proj.parameters())}, cfg)
    sched = build_scheduler(opt, cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.1, 0.1])  # warm-up step 0: 1/2
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.2, 0.2])
    with pytest.raises(ConfigError, match="nothing to train"):
        param_groups({"llm": []}, cfg)


def test_fill_deepspeed_config():
    cfg = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=4", "train.max_grad_norm=0.5"])
    ds = json.loads((Path(__file__).parents[2] / "configs/accelerate/ds_zero2.json").read_text())
    fill_deepspeed_config(ds, cfg, world_size=8)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (2, 4, 64, 0.5)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2"):
        fill_deepspeed_config({"gradient_accumulation_steps": 2}, cfg, world_size=8)


def test_a_deepspeed_launch_accelerate_did_not_join_is_one_clear_error(monkeypatch):
    """accelerate 1.15 on CPU: every DeepSpeed process's Accelerator reports 1 process under a 2-process launch
    (found running ZeRO-3 on CPU); refvllm says so instead of DeepSpeed's batch-size assertion."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from refvllm.train.distributed import prepare_deepspeed_plugin

    plugin = SimpleNamespace(deepspeed_config={})
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched with 2 processes but accelerate reports 1"):
        prepare_deepspeed_plugin(accelerator, load_config(None, []))
    monkeypatch.setenv("WORLD_SIZE", "1")
    prepare_deepspeed_plugin(accelerator, load_config(None, []))
    assert plugin.deepspeed_config["train_batch_size"] == 1


@pytest.mark.parametrize("setting, value, message", [
    ("FSDP_VERSION", "1", "FSDP2 only"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "true", "does not support yet"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "model.gradient_checkpointing"),
])
def test_fsdp_launch_options_refvllm_does_not_support_are_clear_errors(monkeypatch, setting, value, message):
    from refvllm.train.distributed import fsdp_plugin_from_launch

    assert fsdp_plugin_from_launch() is None  # not an FSDP launch
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_plugin_from_launch().fsdp_version == 2
    monkeypatch.setenv(setting, value)
    with pytest.raises(ConfigError, match=message):
        fsdp_plugin_from_launch()


def test_fsdp_mixed_precision_reduces_in_float32_and_leaves_outputs(monkeypatch):
    """bf16 compute over float32 masters; gradients reduced (and accumulated) in float32, the loss not cast."""
    from refvllm.train.distributed import fsdp_plugin_from_launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_plugin_from_launch("no").mixed_precision_policy is None
    policy = fsdp_plugin_from_launch("bf16").mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)


def test_fsdp_wraps_the_models_own_blocks_and_checks_named_ones():
    """Without named classes the units are the Hugging Face blocks (_no_split_modules) the model has."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from refvllm.train.distributed import prepare_fsdp_plugin

    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    model = torch.nn.ModuleDict({"llm": llm, "projector": torch.nn.Linear(4, 16)})
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=None)
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    prepare_fsdp_plugin(accelerator, model)
    assert model._no_split_modules == ["Qwen2DecoderLayer"]
    plugin.transformer_cls_names_to_wrap = ["LlamaDecoderLayer"]
    with pytest.raises(ConfigError, match="names LlamaDecoderLayer, which this model does not have"):
        prepare_fsdp_plugin(accelerator, model)


def test_an_optimizer_file_of_another_strategy_is_a_clear_error():
    """optimizer.pt holds parameters by index (DDP, one process) or by name (FSDP's full state dict)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from refvllm.train.distributed import load_optimizer_state

    by_index = {"state": {}, "param_groups": [{"params": [0, 1]}]}
    by_name = {"state": {}, "param_groups": [{"params": ["llm.a", "llm.b"]}]}
    plain = SimpleNamespace(distributed_type=DistributedType.NO)
    with pytest.raises(ConfigError, match="written under FSDP; resume it under FSDP"):
        load_optimizer_state(plain, None, None, by_name, "ckpt")
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError, match="written without FSDP; resume it without FSDP"):
        load_optimizer_state(fsdp, None, None, by_index, "ckpt")


def test_metrics_writer_truncates_on_resume_and_plots(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    for step in range(1, 6):
        writer.log({"step": step, "loss": 5.0 - step, "lr": 1e-3, "tokens_per_s": 10.0, "num_skipped": 0})
    writer.close()
    assert (tmp_path / "tensorboard").is_dir()
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=3)  # steps 4, 5 were lost
    writer.log({"step": 4, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 10.0, "num_skipped": 0})
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 0.5)]
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert MetricsWriter(tmp_path / "other", enabled=False, tensorboard=True).path.parent == tmp_path / "other"
    assert not (tmp_path / "other").exists()  # other processes write nothing


def test_inference_export_and_eval_do_not_import_the_trainer():
    """The checkpoint format has one home (refvllm/checkpoint.py): loading for inference, exporting and
    evaluating never import refvllm.train."""
    import subprocess
    import sys

    code = ("import sys, refvllm.checkpoint, refvllm.export, refvllm.infer, refvllm.eval.run; "
            "bad = sorted(m for m in sys.modules if m.startswith('refvllm.train')); print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
