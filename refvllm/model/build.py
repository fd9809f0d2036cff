"""Config -> RefVLM: load the vision tower and the LLM with ``from_pretrained``, build the adapters, set each
module's trainability (frozen | lora | full), and save/load the weights that are not in the HF checkpoints.

Contract:
    model = build_model(cfg.model)                   # the config's family (refvllm.families); prints the table
    model = build_model(cfg.model, float32_masters=True)  # training: every trainable parameter in float32
    groups = parameter_groups(model)                 # {"llm": [...], "vision": [...], "projector": .., "region": ..}
    counts = parameter_counts(model)                 # {"llm": {"trainable": n, "total": m}, ...}

Saving and loading what training changes (adapter, extra trainables) is the checkpoint format's:
refvllm/checkpoint.py.

Module names are fixed: ``vision``, ``projector``, ``region``, ``llm`` (attributes of RefVLM).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import nn

from refvllm.config import LoraConfig, ModelConfig
from refvllm.errors import ConfigError
from refvllm.hub import check_model, config_revision, first_line
from refvllm.layout import load_visual_spec, make_token_layout
from refvllm.model.refvlm import RefVLM
from refvllm.model.region import RegionEncoder
from refvllm.model.vision import Projector, VisionTower

MODULES = ("vision", "projector", "region", "llm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(m: ModelConfig, print_table: bool = True, float32_masters: bool = False):
    """The model described by the model config ``m`` (``cfg.model``: the builder needs no other section), built
    by its family (:mod:`refvllm.families`: assembled, or a pretrained VLM by its ``model_type``); tiny
    checkpoints are written first when ``model.tiny`` asks.

    ``float32_masters`` (training): see :func:`use_float32_masters`. Inference and export keep ``model.dtype``.
    """
    from refvllm.families import family_of

    ensure_tiny_checkpoints(m)
    check_attn_implementation(m.attn_implementation)
    model = family_of(m).hook("build")(m, float32_masters)
    if print_table:
        print(format_parameter_table(parameter_counts(model)))
    return model


def build_assembled(m: ModelConfig, float32_masters: bool = False) -> RefVLM:
    """The assembled family: the vision tower and the LLM by ``from_pretrained``, a fresh projector and region
    encoder between them, each module's trainability as configured."""
    dtype = DTYPES[m.dtype]
    spec = load_visual_spec(m)  # also the clear error for a vision_path that is neither here nor on the hub
    layout = make_token_layout(m, spec)
    # flex_attention is for the LLM's packed rows (refvllm.model.packing); an unpadded vision tower needs no mask.
    vision_attn = "sdpa" if m.attn_implementation == "flex_attention" else m.attn_implementation
    vision = VisionTower.from_pretrained(m.vision_path, m.vision_feature_layer, vision_attn, dtype,
                                         m.trust_remote_code, revision=config_revision(m, "vision"))
    if vision.grid != layout.grid:
        raise ConfigError(f"model.vision_path: the tower's patch grid is {vision.grid}x{vision.grid} but "
                          f"image_size/patch_size give {layout.grid}x{layout.grid}")
    llm = _load_llm(m.llm_path, m.attn_implementation, dtype, m.trust_remote_code, config_revision(m, "llm"))
    width = llm.get_input_embeddings().embedding_dim
    projector = Projector(vision.hidden_size, width, m.projector.hidden_size or width, layout)
    region = RegionEncoder(vision.hidden_size, width, m.region.hidden_size or width, layout, spec.patch_size,
                           m.region.pooling, m.region.geometry)
    vision = _set_vision_trainability(vision, m.train_vision, m.vision_lora, m.gradient_checkpointing)
    llm = _set_llm_trainability(llm, m.train_llm, m.lora, m.gradient_checkpointing)
    projector.requires_grad_(m.train_projector in ("full", "auto"))  # auto: a fresh projector trains
    region.requires_grad_(m.train_region == "full")
    model = RefVLM(vision, projector, region, llm, layout, _pad_token_id(llm), m.region.dropout)
    if float32_masters:
        use_float32_masters(model)
    return model


def export_merged_llm(model: RefVLM, processor, out: str, dtype: torch.dtype) -> str:
    """The assembled family's merged export: the LLM with its adapter merged (or the fully trained LLM) as a
    plain causal-LM directory in ``dtype`` with the tokenizer, which ``AutoModelForCausalLM.from_pretrained``
    loads."""
    llm = model.adapter_model.merge_and_unload() if model.adapter_model is not None else model.llm
    llm.to(dtype).save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    return out


def ensure_tiny_checkpoints(model: ModelConfig) -> None:
    """With ``model.tiny``, write the family's tiny checkpoints at the configured paths when missing
    (:mod:`refvllm.families`, hook ``write_tiny``): not a local directory with a ``config.json``, nor a hub id
    already in the hub cache (checked without a network request: a tiny run is an offline run)."""
    from refvllm.families import family_of

    if model.tiny:
        family_of(model).hook("write_tiny")(model)


def check_attn_implementation(name: str) -> None:
    """flash_attention_2 needs the flash-attn package; say so instead of failing deep inside transformers."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not "
                          "installed (pip install 'refvllm[flash]' on a CUDA machine), or use sdpa")


def _load_llm(path: str, attn: str, dtype: torch.dtype, trust_remote_code: bool,
              revision: str | None = None) -> nn.Module:
    """The causal LM at ``path`` (local directory or hub id, at ``revision``); ConfigError when it cannot load."""
    from transformers import AutoModelForCausalLM

    check_model(path, "model.llm_path", revision)  # one clear line for an id that is neither here nor on the hub
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                    trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise ConfigError(f"model.llm_path: cannot load a causal LM from '{path}': {first_line(e)}") from None


def _pad_token_id(llm: nn.Module) -> int:
    """Any valid id works (the sentinel positions it fills are overwritten); prefer the checkpoint's pad id."""
    for source in (llm.config, getattr(llm, "generation_config", None)):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0


def _peft_lora(lora: LoraConfig, task_type: str | None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), task_type=task_type)


def _set_vision_trainability(vision: VisionTower, mode: str, lora: LoraConfig, checkpointing: bool) -> VisionTower:
    vision.requires_grad_(mode == "full")
    if mode == "lora":
        from peft import inject_adapter_in_model

        inject_adapter_in_model(_peft_lora(lora, None), vision.model)  # only the LoRA weights train
    if checkpointing and mode != "frozen":
        _enable_checkpointing(vision.model)
    return vision


def _enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing, non-reentrant (works with frozen inputs and PEFT). transformers
    >= 5.2x names it ``activation_checkpointing_enable``; older 5.x ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _set_llm_trainability(llm: nn.Module, mode: str, lora: LoraConfig, checkpointing: bool) -> nn.Module:
    """frozen / full: requires_grad on the plain model. lora: a plain PEFT model on the unmodified base, so its
    adapter loads with ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dir)``."""
    llm.requires_grad_(mode == "full")
    if checkpointing:  # also when frozen: gradients still flow through it to the projector and region encoder
        _enable_checkpointing(llm)
    if mode == "lora":
        from peft import get_peft_model

        with warnings.catch_warnings():  # peft still reads the deprecated name; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            llm = get_peft_model(llm, _peft_lora(lora, "CAUSAL_LM"))
    return llm


# ------------------------------------------------------------------------------------ parameters per module
def _named_params(model: RefVLM, module: str) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters`` of one module, with RefVLM-level names; tied weights appear once."""
    return [(f"{module}.{name}", p) for name, p in getattr(model, module).named_parameters()]


def use_float32_masters(model: RefVLM) -> None:
    """Every trainable parameter in float32; frozen ones keep ``model.dtype``.

    An optimizer step on bfloat16 weights rounds away every update smaller than about 1/256 of the weight (an
    8-bit mantissa), so small learning rates train nothing; DeepSpeed and FSDP keep float32 masters for the same
    reason. The compute stays in bfloat16 through ``train.mixed_precision=bf16`` (autocast), as configs/sft.yaml
    sets. PEFT already makes LoRA weights float32 on a half-precision base; this covers fully trained towers and
    LLMs and LoRA injected into the vision tower.
    """
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def parameter_counts(model: RefVLM) -> dict[str, dict]:
    """{module: {"trainable": n, "total": m, "dtypes": "float32" or "float32 trainable, bfloat16 frozen"}} for
    vision, projector, region, llm."""
    counts = {}
    for module in MODULES:
        params = [p for _, p in _named_params(model, module)]
        counts[module] = {"trainable": sum(_numel(p) for p in params if p.requires_grad),
                          "total": sum(_numel(p) for p in params), "dtypes": _dtypes(params)}
    return counts


def _numel(p: nn.Parameter) -> int:
    """Elements of ``p``; a parameter partitioned by ZeRO-3 (zero.Init) holds an empty tensor and its size in
    ``ds_numel``."""
    return int(getattr(p, "ds_numel", p.numel()))


def _dtypes(params: list[nn.Parameter]) -> str:
    names = {flag: sorted({str(p.dtype).removeprefix("torch.") for p in params if p.requires_grad == flag})
             for flag in (True, False)}
    if names[True] == names[False] or not names[False]:
        return "/".join(names[True] or names[False])
    if not names[True]:
        return "/".join(names[False])
    return f"{'/'.join(names[True])} trainable, {'/'.join(names[False])} frozen"


def format_parameter_table(counts: dict[str, dict]) -> str:
    """A small text table of :func:`parameter_counts`, with each module's parameter dtypes."""
    rows = [f"{'module':<10} {'trainable':>14} {'total':>14} {'%':>7}  dtype"]
    total = {k: sum(v[k] for v in counts.values()) for k in ("trainable", "total")}
    for name, c in [*counts.items(), ("all", {**total, "dtypes": ""})]:
        pct = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        rows.append(f"{name:<10} {c['trainable']:>14,} {c['total']:>14,} {pct:>6.2f}%  {c['dtypes']}".rstrip())
    return "\n".join(rows)


def parameter_groups(model: RefVLM) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters per module (llm, vision, projector, region), for per-module learning rates.
    A module with nothing trainable maps to an empty list."""
    return {module: [p for _, p in _named_params(model, module) if p.requires_grad]
            for module in ("llm", "vision", "projector", "region")}
