"""Every shipped YAML loads, starts with the command that runs it, and says what it promises."""

import json
from pathlib import Path

import pytest
import yaml

from refvllm.config import load_config

ROOT = Path(__file__).parents[2]
TRAIN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def _header(path: Path) -> str:
    """The leading comment block of a YAML file."""
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{path.name} must start with a comment giving its launch command"
    return "\n".join(line for line in lines if line.startswith("#"))


def test_every_shipped_yaml_is_covered():
    names = {p.name for p in TRAIN_CONFIGS} | {f"accelerate/{p.name}" for p in ACCELERATE_CONFIGS}
    assert {"sft.yaml", "demo.yaml", "accelerate/ddp.yaml", "accelerate/zero2.yaml",
            "accelerate/zero3.yaml", "accelerate/fsdp.yaml"} <= names
    every = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert every == names  # no YAML hides in another folder


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_training_config_loads_with_launch_command(path):
    header = _header(path)
    assert f"scripts/train.py --config configs/{path.name}" in header
    cfg = load_config(path)
    assert cfg.train.output_dir and cfg.data.train_file


def test_sft_recipe():
    cfg = load_config(ROOT / "configs" / "sft.yaml")
    assert "siglip-so400m" in cfg.model.vision_path and "Qwen2.5-7B-Instruct" in cfg.model.llm_path
    assert (cfg.model.train_llm, cfg.model.train_vision, cfg.model.train_projector, cfg.model.train_region) == (
        "lora", "frozen", "full", "full")
    assert cfg.data.num_frames == 16 and cfg.model.gradient_checkpointing
    assert cfg.train.mixed_precision == "bf16" and cfg.model.dtype == "bfloat16"
    assert not cfg.model.tiny and not cfg.data.synth.enabled
    assert cfg.train.packing and cfg.train.micro_batch_size > 1  # packing has samples to lay end to end
    assert "accelerate launch --config_file configs/accelerate/ddp.yaml" in _header(ROOT / "configs" / "sft.yaml")


def test_demo_makes_its_own_assets():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.model.tiny and cfg.data.synth.enabled
    synth = Path(cfg.data.synth.out_dir)
    assert Path(cfg.data.train_file) == synth / "train.json"
    assert cfg.train.resume == "auto" and cfg.train.mixed_precision == "no"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config(path):
    from accelerate.commands.config.config_args import load_config_from_file

    header = _header(path)
    assert f"accelerate launch --config_file configs/accelerate/{path.name} scripts/train.py" in header
    cluster = load_config_from_file(str(path))  # accelerate's own parser accepts every key
    data = yaml.safe_load(path.read_text())
    if data["distributed_type"] == "DEEPSPEED":
        ds_file = ROOT / data["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file(), f"{path.name} names a DeepSpeed config that is not in the repository"
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == int(path.stem[-1])
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto", f"{ds_file.name}: {key} must be 'auto' (filled from the training config)"
    elif data["distributed_type"] == "FSDP":
        # refvllm's own checks of the launch accept it (FSDP2, options it supports), read as accelerate reads it.
        from refvllm.train.distributed import fsdp_plugin_from_launch

        env = {"ACCELERATE_USE_FSDP": "true", **{f"FSDP_{k.removeprefix('fsdp_').upper()}": str(v).lower()
                                                 for k, v in data["fsdp_config"].items()}}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            plugin = fsdp_plugin_from_launch()
        assert plugin.fsdp_version == 2 and not plugin.cpu_ram_efficient_loading
    else:
        assert cluster.distributed_type.value == "MULTI_GPU"


def test_scientific_notation_is_a_float():
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; learning rates are written that way all the time."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.lr=5e-3", "train.region_lr=1E-2"])
    assert (cfg.train.lr, cfg.train.region_lr) == (5e-3, 1e-2)
