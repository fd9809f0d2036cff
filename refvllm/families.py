"""Model families: one interface for every kind of model refvllm trains, chosen by the checkpoint's
``model_type`` (never by substrings of a path).

A family is a registry entry naming its hooks (``"module:function"``, imported only when used, so that the
data side never imports the model side and a family's heavy imports stay out of the others):

| hook | signature | what it does |
| --- | --- | --- |
| ``processor`` | ``(cfg) -> Processor`` | text + pixels of a sample, its token counts, its batches |
| ``build`` | ``(model_cfg, float32_masters) -> model`` | the trainable model (roles vision/projector/region/llm) |
| ``write_tiny`` | ``(model_cfg) -> None`` | tiny offline checkpoints at the configured paths (``model.tiny``) |
| ``export_merged`` | ``(model, processor, out_dir, dtype) -> str`` | the adapter merged into a plain HF directory |

``merged_dir`` is the export folder ``export_merged`` writes; ``paths`` are the model-config keys that name the
family's checkpoints (made absolute in an export); ``adapter_base`` is the key of the checkpoint its PEFT adapter
applies to. The model a family builds has the batch contract of its processor (``forward(batch, loss_normalizer,
ablate_regions, logits_at)``, ``generate(batch, ablate_regions, **kwargs)``), the roles
``vision``/``projector``/``region``/``llm`` (modules or parameter views), ``FRESH_ROLES`` (roles that start random:
saved whole) and ``adapter_model`` (the PeftModel or None): what training, checkpoints, export, eval and infer use,
whatever the family.

Adding a family (``qwen3_vl``, ``llava_onevision``): a data module (its processor), a model module (its model,
builder, tiny checkpoint, merged export) and one entry in ``FAMILIES``; docs/architecture.md, "Model families".

    family = family_of(cfg.model)        # ConfigError naming model.vlm_path for an unknown model_type
    processor = make_processor(cfg)
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from refvllm.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values of the checkpoints it loads (vlm_path)
    paths: tuple[str, ...]  # model config keys naming its checkpoints
    adapter_base: str  # the key of the checkpoint the PEFT adapter applies to
    merged_dir: str  # the export folder export_merged writes (its manifest key: merged_dir + "_dir")
    processor: str
    build: str
    write_tiny: str
    export_merged: str

    def hook(self, name: str):
        """The function of hook ``name`` (its module imported now; ``Class.method`` names work too)."""
        module, dotted = getattr(self, name).split(":")
        obj = importlib.import_module(module)
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj


ASSEMBLED = Family("assembled", (), ("vision_path", "llm_path"), "llm_path", "merged_llm",
                   processor="refvllm.data.processor:Processor.from_config",
                   build="refvllm.model.build:build_assembled",
                   write_tiny="refvllm.model.tiny:write_tiny_assembled",
                   export_merged="refvllm.model.build:export_merged_llm")
QWEN2_5_VL = Family("qwen2_5_vl", ("qwen2_5_vl",), ("vlm_path",), "vlm_path", "merged_vlm",
                    processor="refvllm.data.qwen2_5_vl:VLMProcessor.from_config",
                    build="refvllm.model.qwen2_5_vl:build_region_vlm",
                    write_tiny="refvllm.model.tiny:write_tiny_vlm_at",
                    export_merged="refvllm.model.qwen2_5_vl:export_merged_vlm")
FAMILIES = (ASSEMBLED, QWEN2_5_VL)


def vlm_model_type(model) -> str:
    """The ``model_type`` of ``model.vlm_path``'s config.json (local directory or hub id at ``vlm_revision``)."""
    from refvllm.hub import resolve_file

    file = resolve_file(model.vlm_path, "config.json", "model.vlm_path", model.vlm_revision or None)
    try:
        return str(json.loads(Path(file).read_text())["model_type"])
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model.vlm_path: config.json of '{model.vlm_path}' has no model_type ({e})") from None


def family_of(model) -> Family:
    """The family of the model config ``model`` (``cfg.model``): assembled without ``vlm_path``, else the one
    whose ``model_types`` hold the checkpoint's ``model_type``."""
    if not model.vlm_path:
        return ASSEMBLED
    if model.tiny:  # the tiny VLM is written on first use: its family is known before it exists
        return QWEN2_5_VL
    model_type = vlm_model_type(model)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(f"model.vlm_path: '{model.vlm_path}' is a '{model_type}' model; refvllm supports pretrained "
                      f"VLMs of type {known} (or an assembled model: model.vision_path + model.llm_path)")


def make_processor(cfg):
    """The processor of ``cfg``'s model family, writing prompts as ``data.prompt`` says."""
    processor = family_of(cfg.model).hook("processor")(cfg)
    processor.region_format = cfg.data.prompt.region
    return processor


def checkpoint_paths(model) -> dict[str, str]:
    """``{key: value}`` of the model config keys that name the family's checkpoints."""
    return {key: getattr(model, key) for key in family_of(model).paths}
