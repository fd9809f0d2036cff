"""Process-group plumbing for the training loop: the Accelerator, DeepSpeed config filling, collectives.

Launches (docs/training.md):
    python scripts/train.py ...                                    one process (CPU or one GPU)
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train.py ...     GPUs, DDP
    accelerate launch --config_file configs/accelerate/zero{2,3}.yaml scripts/train.py ... GPUs, DeepSpeed
    accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/train.py ...    GPUs (or CPU), FSDP2
    torchrun --nproc_per_node N scripts/train.py ...               N processes (CPU: gloo)

On a machine without CUDA the Accelerator is made with ``cpu=True``: that is what makes torchrun's (or
``accelerate launch --multi_gpu``'s) processes join one gloo group; without it each would train alone. The
exception is a DeepSpeed launch, which runs on DeepSpeed's CPU accelerator (gloo) there.

FSDP2 is accelerate's own (``fully_shard`` per layer, then the root). accelerate 1.15 applies it only on
accelerator devices: with ``cpu=True`` it keeps the plugin aside and wraps the model in DDP. On a machine without
CUDA (tests, CI) :func:`make_accelerator` therefore switches the joined gloo group to FSDP itself, with the plugin
accelerate read from the launch; everything after that (sharding, clipping, reduce-scatter) is accelerate's and
torch's FSDP2 code, the same as on GPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

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
    plugin = fsdp_plugin_from_launch(cfg.train.mixed_precision)
    handlers = []
    if deepspeed_launch and not cuda:  # accelerate picks no backend without CUDA: its processes would not join
        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(cpu=not cuda and not deepspeed_launch, mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum, fsdp_plugin=plugin,
                              kwargs_handlers=handlers)
    if plugin is not None and not cuda:
        _fsdp_on_cpu(accelerator, plugin)
    return accelerator


def fsdp_plugin_from_launch(mixed_precision: str = "no"):
    """The FSDP plugin of an FSDP launch (``accelerate launch --config_file configs/accelerate/fsdp.yaml``, which
    sets ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables the plugin reads), else None. FSDP2 only; the
    options refvllm does not support are refused here, before any model is built.

    ``mixed_precision`` (``train.mixed_precision``) bf16/fp16: parameters gathered and computed in that dtype
    over the float32 masters, gradients reduced in float32, outputs not cast. accelerate's own policy for
    "bf16" reduces (and, under accumulation, sums micro-batch gradients) in bf16 and casts the model's outputs,
    the loss too, to bf16: a logged loss to 3 digits and gradients coarser than under DDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(f"the accelerate config sets fsdp_version: {plugin.fsdp_version}; refvllm trains with "
                          "FSDP2 only (fsdp_version: 2, as in configs/accelerate/fsdp.yaml)")
    if plugin.cpu_ram_efficient_loading:
        raise ConfigError("the accelerate config sets fsdp_cpu_ram_efficient_loading: true, which refvllm does not "
                          "support yet (every process loads the base checkpoints, then FSDP shards them); set it "
                          "to false")
    if plugin.activation_checkpointing:
        raise ConfigError("the accelerate config sets fsdp_activation_checkpointing: true; use the training "
                          "config's model.gradient_checkpointing instead (one place that turns it on)")
    if mixed_precision in ("bf16", "fp16"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        compute = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    return plugin


def _fsdp_on_cpu(accelerator, plugin) -> None:
    """Switch a joined CPU (gloo) group to FSDP2, as accelerate does for GPUs (module docstring); also a group of
    one (``accelerate launch --num_processes 1``), as on one GPU. Without a process group (a plain ``python``
    start) there is nothing to shard with: it trains unsharded, and says so."""
    from accelerate.utils import DistributedType

    if not torch.distributed.is_initialized():
        print("warning: FSDP config without a process group (start it with accelerate launch or torchrun): "
              "training unsharded", flush=True)
        return
    from accelerate.state import PartialState

    # Both shared states: every later AcceleratorState() (transformers makes some) copies PartialState's over its own.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin  # its mixed-precision policy: fsdp_plugin_from_launch


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def prepare_fsdp_plugin(accelerator, raw: torch.nn.Module) -> None:
    """Before ``accelerator.prepare`` under FSDP: which modules become their own FSDP unit. Without
    ``fsdp_transformer_layer_cls_to_wrap`` in the accelerate config, the repeated blocks that Hugging Face names
    in each submodel's ``_no_split_modules`` (the LLM's decoder layers, the vision tower's encoder layers) and
    that this model has; everything else (projector, region encoder, embeddings, head) is in the root unit.
    Named classes must exist in the model (ConfigError otherwise)."""
    if not is_fsdp(accelerator):
        return
    present = {type(m).__name__ for m in raw.modules()}
    plugin = accelerator.state.fsdp_plugin
    named = plugin.transformer_cls_names_to_wrap
    if named:
        missing = sorted(set(named) - present)
        if missing:
            raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which this model "
                              "does not have; leave it out to wrap the model's own layer classes")
        return
    blocks = {name for m in raw.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    raw._no_split_modules = sorted(blocks & present)  # accelerate's wrap policy reads the model's list


def describe_strategy(accelerator, model: torch.nn.Module) -> str:
    """One line for the log: how the prepared ``model`` is distributed, e.g. ``FSDP2 over 2 processes: own units
    Qwen2DecoderLayer x2, SiglipEncoderLayer x2; the rest in the root unit``."""
    kind = accelerator.distributed_type.value
    n = accelerator.num_processes
    if not is_fsdp(accelerator):
        return f"{kind} over {n} process{'es' if n > 1 else ''}"
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule

    units = Counter(type(m).__name__.removeprefix("FSDP") for m in model.modules()
                    if isinstance(m, FSDPModule) and m is not model)
    listed = ", ".join(f"{name} x{count}" for name, count in sorted(units.items())) or "none"
    return f"FSDP2 over {n} process{'es' if n > 1 else ''}: own units {listed}; the rest in the root unit"


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
def gathered(accelerator, params: list[torch.nn.Parameter],
             write: bool = False) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Inside the block, ``full(p)`` is the full value of each of ``params`` (under FSDP on the main process
    only). ZeRO-3 gathers them in place (``full(p)`` is ``p``; with ``write`` what rank 0 writes into them is
    partitioned back on exit: loading weights into a ZeRO-3 model). FSDP2 all-gathers each sharded (DTensor)
    parameter, one at a time, into a host tensor on the main process (the other ranks take part in the gathers
    and keep nothing: ``full(p)`` is None there), the sharded one unchanged; ``write`` is refused there (load
    before ``accelerator.prepare``, while nothing is sharded yet). Elsewhere ``full(p)`` is ``p``. Collective under
    ZeRO-3 and FSDP: every rank must enter it, with the same ``params`` in the same order."""
    if is_deepspeed(accelerator) and any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if write else None):
            yield _itself
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        if write:
            raise RuntimeError("gathered(write=True) on FSDP-sharded parameters: load before accelerator.prepare")
        # One parameter at a time, to host memory: the device holds one full parameter at most, and only the
        # main process keeps it (it alone writes; a trained 7B LLM is 30 GB of float32 per copy).
        keep = accelerator.is_main_process
        values = {id(p): _full_on_main(p, keep) if isinstance(p, DTensor) else p for p in params}
        yield lambda p: values[id(p)]
        return
    yield _itself


def _full_on_main(p, keep: bool) -> torch.Tensor | None:
    full = p.full_tensor()  # collective
    return full.cpu() if keep else None


def _itself(p: torch.Tensor) -> torch.Tensor:
    return p


def optimizer_state(accelerator, model, optimizer) -> dict | None:
    """What ``optimizer.pt`` holds: the torch state dict (parameters by index); under FSDP the full state dict
    gathered from the shards (parameters by name, ``torch.distributed.checkpoint.state_dict``; collective: every
    rank calls it, the main process gets the values), so it loads on any process count. None under DeepSpeed,
    which writes its own partitioned files."""
    if is_deepspeed(accelerator):
        return None
    if not is_fsdp(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _unwrapped(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(accelerator, model, optimizer, state: dict, path) -> None:
    """Load an :func:`optimizer_state` (read from ``path``) into ``optimizer``: before ``accelerator.prepare``;
    under FSDP after it (the state is sharded like the parameters). A file written under FSDP (by name) does not
    load without it, nor the reverse (ConfigError)."""
    by_name = any(isinstance(i, str) for g in state.get("param_groups", []) for i in g.get("params", []))
    if by_name != is_fsdp(accelerator):
        raise ConfigError(f"train.resume: '{path}' was written {'under' if by_name else 'without'} FSDP; resume it "
                          f"{'under FSDP (configs/accelerate/fsdp.yaml)' if by_name else 'without FSDP'}")
    if not is_fsdp(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _unwrapped(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _unwrapped(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


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
