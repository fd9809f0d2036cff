"""Process-group plumbing for the training loop: the Accelerator, DeepSpeed config filling, collectives.

Launches (docs/training.md):
    python scripts/train.py ...                                    one process (CPU or one GPU)
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py ...     GPUs, DDP
    accelerate launch --config_file configs/accelerate/zero{2,3}.yaml scripts/train.py ... GPUs, DeepSpeed
    torchrun --nproc_per_node N scripts/train.py ...               N processes (CPU: gloo)

On a machine without CUDA the Accelerator is made with ``cpu=True``: that is what makes torchrun's (or
``accelerate launch --multi_gpu``'s) processes join one gloo group; without it each would train alone. The
exception is a DeepSpeed launch, which runs on DeepSpeed's CPU accelerator (gloo) there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from refvllm.config import Config
from refvllm.errors import ConfigError


def make_accelerator(cfg: Config):
    """The Accelerator for this run: mixed precision and gradient accumulation from ``cfg.train``."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    if cfg.model.attn_implementation == "flex_attention" and not cuda:
        raise ConfigError("model.attn_implementation=flex_attention trains on CUDA only (torch has no CPU backward "
                          "for it); use sdpa on CPU (packing keeps samples apart with an exact mask there)")
    # cpu=True is what makes CPU processes join one gloo group, but it also turns DeepSpeed off; a DeepSpeed
    # launch on CPU (DeepSpeed's CPU accelerator, e.g. to test ZeRO without GPUs) must keep it off.
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Accelerator(cpu=not cuda and not deepspeed_launch, mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.grad_accum)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def fill_deepspeed_config(ds_config: dict, cfg: Config, world_size: int) -> dict:
    """Fill the ``"auto"`` batch, accumulation and clipping values of a DeepSpeed config from ``cfg.train``.

    Values set explicitly in the JSON must agree with the training config (ConfigError otherwise): the
    training config is the one source of truth for them.
    """
    t = cfg.train
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(t.max_grad_norm) if t.max_grad_norm > 0 else 0.0,
    }
    for key, value in wanted.items():
        current = ds_config.get(key, "auto")
        if current == "auto":
            ds_config[key] = value
        elif float(current) != float(value):
            raise ConfigError(f"DeepSpeed config sets {key}={current} but the training config implies {value} "
                              f"(train.micro_batch_size/grad_accum/max_grad_norm); set it to \"auto\"")
    return ds_config


def prepare_deepspeed_plugin(accelerator, cfg: Config) -> None:
    """Before ``accelerator.prepare``: fill the plugin's DeepSpeed config (no data loader is prepared)."""
    if is_deepspeed(accelerator):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator.num_processes != world:
            # Seen on CPU (accelerate 1.15): each DeepSpeed process's Accelerator reports itself alone, and the
            # batch size filled for 1 process fails DeepSpeed's own check with an assertion traceback.
            raise ConfigError(f"DeepSpeed was launched with {world} processes but accelerate reports "
                              f"{accelerator.num_processes} (accelerate does not join DeepSpeed processes on CPU); "
                              "run DeepSpeed on GPUs, or 1 process on CPU, or use DDP (torchrun) on CPU")
        fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes)


@contextlib.contextmanager
def gathered(accelerator, params: list[torch.nn.Parameter], write: bool = False) -> Iterator[None]:
    """Inside the block, ``params`` hold their full values on every rank (ZeRO-3 gathers them; elsewhere a no-op).
    ``write``: what rank 0 writes into them is partitioned back on exit (loading weights into a ZeRO-3 model);
    otherwise read-only. Collective under ZeRO-3: every rank must enter it."""
    if is_deepspeed(accelerator) and any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if write else None):
            yield
    else:
        yield


def all_reduce_sum(accelerator, values: list[float]) -> list[float]:
    """Sum a few numbers over processes (float64 so token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        tensor = accelerator.reduce(tensor, reduction="sum")
    return tensor.tolist()


def gather_lists(accelerator, items: list) -> list:
    """Concatenate a picklable list from every process, in rank order (collective)."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(items))
