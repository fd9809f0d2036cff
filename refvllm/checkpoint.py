"""The checkpoint format: what a training checkpoint and an export hold, how trained weights are saved and loaded,
and how a path is resolved to a model. Training, export, inference and evaluation all use this module (none of
them imports another's package for it).

A training checkpoint, ``OUTPUT_DIR/checkpoint-STEP/`` (written by refvllm/train, docs/training.md)::

    config.yaml                        the resolved config of the run
    adapter/                           the LLM's LoRA adapter in PEFT layout (absent unless train_llm=lora)
    extra_trainables.safetensors       every other weight training changed (see extra_trainable_names)
    optimizer.pt scheduler.pt rng_state_{rank}.pt trainer_state.json     the trainer's state (resume)
    COMPLETE                           written last: a directory without it is never used

An export (written by refvllm/export.py, docs/export.md)::

    config.yaml adapter/ extra_trainables.safetensors tokenizer/ [merged_llm/ | merged_vlm/] export.json

Contract::

    save_trained_weights(model, dir)                 # adapter/ (when LoRA) + extra_trainables.safetensors
    load_trained_weights(model, dir)                 # both back into a built model; exact keys and shapes
    cfg, model, processor = load_for_inference(path, overrides=None)   # a checkpoint or an export
    resolve_model_dir(path)                          # a training output dir -> its newest complete checkpoint
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from refvllm.config import Config, load_config
from refvllm.errors import ConfigError

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"
CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
EXTRA_FILE = "extra_trainables.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
EXPORT_MANIFEST = "export.json"
TOKENIZER_DIR = "tokenizer"
_CKPT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


# ---------------------------------------------------------------------------------------------- directories


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` is a finished checkpoint (its COMPLETE marker and trainer state exist)."""
    path = Path(path)
    return (path / COMPLETE_MARKER).is_file() and (path / TRAINER_STATE_FILE).is_file()


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / EXPORT_MANIFEST).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CKPT_RE.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a checkpoint or an export directory; for a training output directory (one
    that holds ``checkpoint-STEP`` folders but is neither) its newest complete checkpoint, named on stderr."""
    path = Path(path)
    if is_export_dir(path) or is_complete(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        return path  # the loader says what is wrong with it
    print(f"using the newest checkpoint of {path}: {latest}", file=sys.stderr)
    return latest


def check_loadable(path: Path) -> None:
    """ConfigError unless ``path`` is a complete checkpoint or an export directory with its config."""
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a directory (expected a checkpoint-STEP or an export directory)")
    if not (is_export_dir(path) or is_complete(path)):
        raise ConfigError(f"'{path}' is neither a complete training checkpoint nor an export directory")
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"'{path}' has no {CONFIG_FILE}")


# ---------------------------------------------------------------------------------------------- trained weights


def _module_params(model, module: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``model.named_parameters()`` of one role (vision, projector, region, llm: a submodule of the assembled
    family, a view of the VLM's own modules in a pretrained family), tied weights once."""
    members = {id(p) for p in getattr(model, module).parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) in members]


def extra_trainable_names(model) -> list[str]:
    """The parameters a checkpoint must hold besides the HF base checkpoints and the PEFT adapter: all of the
    roles that start random (``model.FRESH_ROLES``: projector and region encoder of the assembled family, the
    region encoder of a pretrained VLM; trained or not), the trainable parameters of every other role, except
    the LoRA weights the adapter holds (a PEFT model's)."""
    adapter = {id(p) for n, p in model.adapter_model.named_parameters() if "lora_" in n} \
        if model.adapter_model is not None else set()
    names = [n for module in model.FRESH_ROLES for n, _ in _module_params(model, module)]
    for module in ("vision", "projector", "llm"):
        if module not in model.FRESH_ROLES:
            names += [n for n, p in _module_params(model, module) if p.requires_grad and id(p) not in adapter]
    return names


def extra_trainable_params(model) -> list[torch.nn.Parameter]:
    """The parameters of :func:`extra_trainable_names` (e.g. to gather them under ZeRO-3 before saving)."""
    params = dict(model.named_parameters())
    return [params[n] for n in extra_trainable_names(model)]


def save_trained_weights(model, directory: str | Path, full: Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> None:
    """``directory/adapter/`` (the LLM's LoRA adapter, plain PEFT layout, when it has one) and
    ``directory/extra_trainables.safetensors`` (:func:`save_extra_trainables`). ``full(p)``: the full value of a
    trained parameter ``p`` (FSDP keeps only a shard in ``p``; :func:`refvllm.train.distributed.gathered`), by
    default ``p`` itself."""
    directory = Path(directory)
    full = full or (lambda p: p)
    if model.adapter_model is not None:
        # The trained parameters' full values; PEFT picks the adapter's from them (frozen base weights are not
        # gathered: under FSDP that would be the whole LLM on every rank).
        trained = {n: full(p) for n, p in model.adapter_model.named_parameters() if p.requires_grad or "lora_" in n}
        model.adapter_model.save_pretrained(str(directory / ADAPTER_DIR), state_dict=trained)
    save_extra_trainables(model, directory, full)


def save_extra_trainables(model, directory: str | Path, full: Callable[[torch.Tensor], torch.Tensor] | None = None
                          ) -> Path:
    """Write :func:`extra_trainable_names` to ``directory/extra_trainables.safetensors``; returns the file.
    ``full``: as in :func:`save_trained_weights`."""
    from safetensors.torch import save_file

    full = full or (lambda p: p)
    params = dict(model.named_parameters())
    tensors = {n: full(params[n]).detach().contiguous().cpu() for n in extra_trainable_names(model)}
    path = Path(directory) / EXTRA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "names": json.dumps(sorted(tensors))})
    return path


def load_trained_weights(model, path: str | os.PathLike) -> None:
    """Load the LoRA adapter (when ``path/adapter`` exists) and ``extra_trainables.safetensors`` of a checkpoint
    or export directory into a built RefVLM (both must match the model exactly; ConfigError otherwise)."""
    path = Path(path)
    if (path / ADAPTER_DIR).is_dir():
        load_llm_adapter(model, path / ADAPTER_DIR)
    load_extra_trainables(model, path)


def load_extra_trainables(model, directory: str | Path) -> None:
    """Load ``directory/extra_trainables.safetensors`` into ``model``; the file must hold exactly the expected
    parameters with the expected shapes (ConfigError listing what differs; nothing is loaded then). Values are
    cast to each parameter's dtype (float32 masters saved in training, a bfloat16 model at inference)."""
    from safetensors.torch import load_file

    path = Path(directory) / EXTRA_FILE
    if not path.is_file():
        raise ConfigError(f"'{path}' does not exist")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    expected = set(extra_trainable_names(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    wrong = sorted(n for n in expected & set(tensors) if tensors[n].shape != params[n].shape)
    if missing or unexpected or wrong:
        raise ConfigError(f"'{path}' does not match the model (is the config the one it was trained with?): "
                          f"missing {_few(missing)}, unexpected {_few(unexpected)}, wrong shape {_few(wrong)}")
    with torch.no_grad():
        for name in expected:
            params[name].copy_(tensors[name])


def load_llm_adapter(model, directory: str | Path) -> None:
    """Load a PEFT adapter saved by ``model.adapter_model.save_pretrained`` into the PEFT model of ``model``.
    Every LoRA weight of the model must be in the file and nothing else (ConfigError otherwise)."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    peft_model = model.adapter_model
    if peft_model is None:
        raise ConfigError("load_llm_adapter: the model's LLM has no LoRA adapter (model.train_llm is not 'lora')")
    weights = load_peft_weights(str(directory), device="cpu")
    expected = set(get_peft_model_state_dict(peft_model))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ConfigError(f"adapter '{directory}' does not match the model: missing {_few(missing)}, "
                          f"unexpected {_few(unexpected)}")
    set_peft_model_state_dict(peft_model, weights)


def _few(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---------------------------------------------------------------------------------------------- loading


def load_config_of(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """The resolved config saved in a checkpoint or export directory, with ``key=value`` overrides."""
    path = Path(path)
    check_loadable(path)
    return load_config(path / CONFIG_FILE, overrides)


def load_for_inference(path: str | os.PathLike, overrides: list[str] | None = None):
    """``(cfg, model, processor)`` of a training checkpoint or an export directory; the model is in eval mode on
    the CPU in ``model.dtype``, with every trained weight loaded (base checkpoints from ``model.*_path``)."""
    from refvllm.families import make_processor
    from refvllm.model.build import build_model

    cfg = load_config_of(path, overrides)
    model = build_model(cfg.model, print_table=False)
    load_trained_weights(model, path)
    model.eval()
    return cfg, model, make_processor(cfg)
