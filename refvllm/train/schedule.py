"""Optimizer and learning-rate schedule: AdamW over per-module parameter groups, linear warm-up + cosine decay.

Each trainable module of the model (``llm``, ``vision``, ``projector``, ``region``) gets its own learning rate
from ``train.*lr``; inside a module, matrices get ``train.weight_decay`` and vectors (biases, norms) none.
The schedule multiplies every group's base learning rate by the same factor, so the ratios between modules
stay fixed over the run.
"""

from __future__ import annotations

import math

import torch

from refvllm.config import Config
from refvllm.errors import ConfigError


def module_lrs(cfg: Config) -> dict[str, float]:
    """Base learning rate of each module's parameter group."""
    t = cfg.train
    return {"llm": t.lr, "vision": t.vision_lr, "projector": t.projector_lr, "region": t.region_lr}


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer update ``step`` (0-based).

    Linear warm-up over the first ``warmup_steps`` updates ((step + 1) / warmup, so the first update already
    moves the weights), then a cosine from 1 down to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(groups_by_module: dict[str, list[torch.nn.Parameter]], cfg: Config) -> list[dict]:
    """AdamW groups from ``{module: [param, ...]}`` (``refvllm.model.build.parameter_groups``): one group per
    (module, decay / no decay).

    Every group carries ``name`` (e.g. ``projector`` or ``projector.no_decay``) so logs and checkpoints can
    tell them apart. Modules with no trainable parameter make no group.
    """
    lrs = module_lrs(cfg)
    groups = []
    for module, params in groups_by_module.items():
        if module not in lrs:
            raise ConfigError(f"no learning rate for trainable module '{module}' (known: {', '.join(lrs)})")
        decay = [p for p in params if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
        if decay:
            groups.append({"name": module, "params": decay, "lr": lrs[module], "weight_decay": cfg.train.weight_decay})
        if no_decay:
            groups.append({"name": f"{module}.no_decay", "params": no_decay, "lr": lrs[module], "weight_decay": 0.0})
    if not groups:
        raise ConfigError("nothing to train: every module is frozen (see model.train_* in the config)")
    return groups


def build_optimizer(groups_by_module: dict[str, list[torch.nn.Parameter]], cfg: Config) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(groups_by_module, cfg), betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine over ``train.max_steps`` optimizer updates, stepped once per update."""
    t = cfg.train

    def factor(step: int) -> float:
        return lr_factor(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
