"""Qwen2.5-VL, the first pretrained video-LLM family: its checkpoints and the model-side pieces refvllm needs.

Checkpoints (offline, random weights), in the layout of the hub's ``Qwen/Qwen2.5-VL-*-Instruct`` repositories
(``config.json`` with ``model_type: qwen2_5_vl``, safetensors, tokenizer files with Qwen2-VL's chat template,
``preprocessor_config.json``, ``video_preprocessor_config.json``, ``generation_config.json``), which plain
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and ``AutoTokenizer`` load:

    write_checkpoint(path, "tiny")                       # 64-wide vision, 128-wide LLM, ~1,500-token BPE vocab
    write_checkpoint(path, "qwen2.5-vl-7b", layers=1)    # the hub config at reduced depth, Qwen's real token ids

Model side, through the model's own code only (so refvllm and plain transformers agree on whatever transformers
version is installed; the pieces used exist with the same signatures in 5.17 and 5.24):

    video_patches(frames, preprocessor)  # uint8 [T, H, W, 3] -> pixel_values_videos [N, C*2*14*14], grid (t, h, w)
    merged_features(model, pixels, grid_thw)   # the vision pass once -> merged video tokens [sum t*h*w/4, D_llm]
    position_ids(model, input_ids, ...)  # mRoPE ids [3, B, L] from the model's own get_rope_index
    RegionVLM(vlm, region_encoder, pad_token_id)   # the VLM + the region pathway (batch contract: its docstring)
    language_model_lora(vlm, lora)       # LoRA on the language model's linear layers only (a PeftModel)

Regions pool one token frame's features (2 frames per token frame, so a mask of frame f pools token frame
f // 2), with the area weights, temporal merge and count checks of the assembled family
(:mod:`refvllm.model.region`); ``model.region.features`` says which: ``merged`` (the merged tokens, in the LLM's
width, one per 28 x 28 pixel cell), ``encoder`` (the encoder's patch features before the merger, one per
14 x 14 cell, back in pixel order from the encoder's window order) or ``both`` (each patch beside its merged
token; the default, measured best on the synthetic data: docs/model.md, "The tiny VLM demo").

Temporal patches: Qwen2.5-VL joins ``temporal_patch_size`` (2) consecutive frames into one patch, so a video of
T frames has T/2 token frames; an odd T repeats its last frame (as the HF video processor does). The time
between token frames is ``second_per_grid_ts = temporal_patch_size / sampling fps`` seconds.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from refvllm.constants import REGION_TOKEN_ID
from refvllm.data.qwen2_5_vl import PREPROCESSOR
from refvllm.errors import ConfigError, ModelInputError
from refvllm.model.packing import causal_lm_pass
from refvllm.model.refvlm import drop_regions, with_zero_term
from refvllm.model.shapes import QWEN2_5_GENERATION

MODEL_TYPE = "qwen2_5_vl"
# What regions pool: the merged tokens (after the merger, the LLM's width, 28-px cells), the encoder's own
# patch features (the merger's input, the encoder's width, 14-px cells), or both side by side on the 14-px grid.
# model.region.features; docs/model.md.
REGION_FEATURES = ("merged", "encoder", "both")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2  # mm_token_type_ids values (transformers' convention)

# Qwen2-VL / Qwen2.5-VL's chat template (the hub's chat_template.json): a default system prompt, content either a
# string or a list of {"type": "text" | "image" | "video"} parts, one <|vision_start|><|X_pad|><|vision_end|> per
# visual part (the processor expands the pad token to the part's token count).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TEXT_7B = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
            "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "num_hidden_layers": 28}
_VISION_7B = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "tokens_per_second": 2,
              "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": 3584, "hidden_act": "silu"}
MROPE_SECTION = [16, 24, 24]  # of the hub configs: halves of a 128-wide head split over (t, h, w)


@dataclass(frozen=True)
class VLShape:
    hub_id: str
    text: dict
    vision: dict
    mrope_section: list[int]


SHAPES = {
    "qwen2.5-vl-7b": VLShape("Qwen/Qwen2.5-VL-7B-Instruct", _TEXT_7B, _VISION_7B, MROPE_SECTION),
    "qwen2.5-vl-3b": VLShape("Qwen/Qwen2.5-VL-3B-Instruct", {
        **_TEXT_7B, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
        "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True, "num_hidden_layers": 36},
        {**_VISION_7B, "out_hidden_size": 2048}, MROPE_SECTION),
    # Offline tests and the demo: 32-wide heads, so the mRoPE sections are a quarter of the real ones.
    "tiny": VLShape("", {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                         "rope_theta": 1000000.0, "tie_word_embeddings": False, "num_hidden_layers": 2},
                    {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 14,
                     "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                     "tokens_per_second": 2, "fullatt_block_indexes": [1], "out_hidden_size": 128,
                     "hidden_act": "silu"}, [4, 6, 6]),
}


REAL_SHAPES = tuple(k for k in SHAPES if SHAPES[k].hub_id)


def shape_for(path: str) -> str | None:
    """The shape of a Qwen2.5-VL named ``path`` (its hub id, a folder named like one, or a shape name)."""
    if path in SHAPES:
        return path
    for name in REAL_SHAPES:
        if SHAPES[name].hub_id.split("/")[-1].lower() in path.lower():
            return name
    return None


# --------------------------------------------------------------------------------------------- checkpoints


def tokenizer_for(shape: str):
    """Qwen's real token ids for a real shape (151,643 regular tokens, then the added ones, vision tokens at
    151652-151656); for ``tiny`` the tiny BPE with ChatML and the vision tokens as special tokens."""
    from refvllm.model import tiny
    from refvllm.model.shapes import qwen2_5_tokenizer

    tokenizer = qwen2_5_tokenizer() if shape != "tiny" else tiny.train_tokenizer(
        special_tokens=(*tiny.SPECIAL_TOKENS, *VISION_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def vl_config(shape: str, tokenizer, layers: int | None = None, vision_layers: int | None = None):
    """``Qwen2_5_VLConfig`` of ``shape`` (text at ``layers``, vision at ``vision_layers`` blocks; None = the
    shape's depth), its special token ids from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    if shape not in SHAPES:
        raise ConfigError(f"unknown Qwen2.5-VL shape '{shape}' (known: {', '.join(SHAPES)})")
    s = SHAPES[shape]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", *VISION_TOKENS)}
    text = {**s.text, "vocab_size": s.text.get("vocab_size", len(tokenizer)),
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    if layers is not None:
        text["num_hidden_layers"] = layers
    theta = text.pop("rope_theta")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "mrope_section": s.mrope_section}
    vision = dict(s.vision)
    if vision_layers is not None:
        # Keep a full-attention block among the kept ones, as every real depth has (the last of each 8).
        vision["depth"] = vision_layers
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_layers] or [
            vision_layers - 1]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def write_checkpoint(path: str | os.PathLike, shape: str = "tiny", layers: int | None = None,
                     vision_layers: int | None = None, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     sampling: bool = True, min_pixels: int | None = None) -> str:
    """Write a random ``Qwen2_5_VLForConditionalGeneration`` of ``shape`` with tokenizer, processor files and a
    generation config (Qwen's sampling one when ``sampling``, else greedy) to ``path``; returns it.
    ``min_pixels`` replaces the processor's (the hub's 3,136 = 56 x 56; users raise it to see small media in
    more tokens, as the tiny demo VLM does)."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    tokenizer = tokenizer_for(shape)
    config = vl_config(shape, tokenizer, layers, vision_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    if shape == "tiny":  # the tiny LLM's head headroom (refvllm.model.tiny.OUTPUT_HEAD_ROW_NORM: LoRA leaves it frozen)
        from refvllm.model.tiny import scale_output_head

        scale_output_head(model)
    text = config.text_config
    generation = {"bos_token_id": text.bos_token_id, "pad_token_id": text.pad_token_id,
                  "eos_token_id": [text.eos_token_id, text.pad_token_id], "do_sample": False}
    if sampling:  # Qwen's sampling settings, what greedy evaluation must override
        generation.update({k: v for k, v in QWEN2_5_GENERATION.items() if "token" not in k})
    model.generation_config = GenerationConfig(**generation)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    pixels = {**PREPROCESSOR, **({"min_pixels": min_pixels} if min_pixels else {})}
    (path / "preprocessor_config.json").write_text(json.dumps(pixels, indent=2) + "\n")
    video = {**pixels, "video_processor_type": "Qwen2VLVideoProcessor"}
    video.pop("image_processor_type")
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------- model side


def base_vlm(model):
    """The ``Qwen2_5_VLForConditionalGeneration`` under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model_lora(vlm, lora):
    """``vlm`` with LoRA (``lora``: refvllm's LoraConfig) on the named linear layers of its language model
    only: the vision encoder's MLP has layers of the same names (gate_proj, up_proj, down_proj), which stay
    frozen, as does the merger. Returns the PeftModel; the base weights are frozen by peft."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(sorted(set(lora.target_modules)))
    # peft matches a string target as a full-match regex over module names.
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=rf".*\.language_model\..*\.({names})")
    with warnings.catch_warnings():  # peft still reads the deprecated name; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(vlm, config)


def vision_pass(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the VLM's vision encoder and merger over [sum(t*h*w), D_pixel] patches: the merged tokens
    [sum(t*h*w)/m^2, D_llm] in the order the model scatters them (each visual's (t, h/m, w/m)), and the
    encoder's own patch features [sum(t*h*w), D_v] (the merger's input) back in the pixels' order (t, h/m, w/m,
    m, m): the model runs its blocks in window-attention order and returns them so (``last_hidden_state``, in
    transformers 5.17 and 5.24 alike); its own window index undoes that."""
    from transformers.vision_utils import get_vision_window_index

    visual = base_vlm(model).model.visual
    out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
    vision = model.config.vision_config
    window, _ = get_vision_window_index(grid_thw, spatial_merge_size=vision.spatial_merge_size,
                                        window_size=vision.window_size, patch_size=vision.patch_size)
    unit = vision.spatial_merge_size**2
    patches = out.last_hidden_state
    patches = patches.reshape(-1, unit, patches.shape[-1])[torch.argsort(window)].reshape(patches.shape)
    return out.pooler_output, patches


def merged_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The merged tokens of :func:`vision_pass` alone."""
    return vision_pass(model, pixel_values, grid_thw)[0]


def token_types(input_ids: torch.Tensor, config) -> torch.Tensor:
    """``mm_token_type_ids`` [B, L]: video (2) at the video pad token, image (1) at the image pad, else text (0).
    Region tokens are text positions."""
    types = torch.full_like(input_ids, TEXT_TYPE, dtype=torch.int32)
    types[input_ids == config.image_token_id] = IMAGE_TYPE
    types[input_ids == config.video_token_id] = VIDEO_TYPE
    return types


def position_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                 image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """mRoPE position ids [3, B, L] from the model's own ``get_rope_index`` (whatever rule the installed
    transformers follows for the text after a video)."""
    kwargs = {"input_ids": input_ids, "mm_token_type_ids": token_types(input_ids, model.config),
              "video_grid_thw": video_grid_thw, "second_per_grid_ts": second_per_grid_ts,
              "image_grid_thw": image_grid_thw, "attention_mask": attention_mask}
    rope_index = base_vlm(model).model.get_rope_index
    accepted = inspect.signature(rope_index).parameters
    positions, _ = rope_index(**{k: v for k, v in kwargs.items() if k in accepted})
    return positions


class RegionVLM(nn.Module):
    """A Qwen2.5-VL with refvllm's region pathway: region tokens pooled from the merged tokens of the same
    vision pass, scattered at the REGION_TOKEN_ID sentinels, the VLM's own positions for everything.

    ``vlm`` is a ``Qwen2_5_VLForConditionalGeneration`` (its modules may carry LoRA adapters); ``region`` a
    :class:`~refvllm.model.region.RegionEncoder` from the LLM's width to the LLM's width.

    Batch:
        input_ids           long [B, L]  the VLM's ids: <|video_pad|> / <|image_pad|> runs expanded to each
                                         visual's t*h*w/m^2 tokens, REGION_TOKEN_ID where region tokens go
        attention_mask      long [B, L]
        labels              long [B, L]  optional (IGNORE_INDEX where no loss)
        pixel_values        float [sum_v t*h*w, C*tp*p*p]  every visual's patches (:func:`video_patches`), in
                                         the order the visuals appear in the batch (sample by sample)
        visual_grid_thw     long [V, 3]; visual_is_video bool [V]; second_per_grid_ts float [V] (videos)
        region_masks        bool [N_M, H, W]  each at its visual's resized frame size (h*p x w*p), zero-padded
        region_visual_index long [N_M]   the visual each mask is on
        region_frame_index  long [N_M]   the frame of that visual (0..T-1, before temporal patching)
        region_object_index long [N_M]   object 0..O-1 of the batch (objects in prompt order)
        object_sample_index long [O]     the sample of each object
    Objects' region tokens go to the sentinels in object order, each object's in time order
    (``region.layout.num_region_tokens`` per object).
    """

    def __init__(self, vlm: nn.Module, region: nn.Module, pad_token_id: int, region_dropout: float = 0.0,
                 region_features: str = "merged"):
        super().__init__()
        if region_features not in REGION_FEATURES:
            raise ValueError(f"region_features must be one of {', '.join(REGION_FEATURES)}; got {region_features!r}")
        self.vlm, self.region, self.pad_token_id = vlm, region, pad_token_id
        self.region_dropout, self.region_features = region_dropout, region_features

    # The checkpoint format's view of the model (refvllm/checkpoint.py): the roles whose weights start random
    # (saved whole, trained or not) and the PEFT model whose adapter is saved in PEFT's layout.
    FRESH_ROLES = ("region",)

    @property
    def adapter_model(self):
        """The PeftModel holding the language model's LoRA (the whole VLM, wrapped), or None."""
        from peft import PeftModel

        return self.vlm if isinstance(self.vlm, PeftModel) else None

    @property
    def generation_config(self):
        return self.vlm.generation_config

    @property
    def config(self):
        return self.vlm.config

    # The roles of the assembled family (refvllm.model.build.MODULES), as views of the VLM's own modules, so
    # the parameter table, per-module learning rates and float32 masters work unchanged. Views, not submodule
    # attributes: a parameter must be registered once.
    @property
    def vision(self) -> ParameterView:
        """The vision encoder without its merger."""
        return ParameterView(base_vlm(self.vlm).model.visual, exclude="merger.")

    @property
    def projector(self) -> ParameterView:
        """The merger: the VLM's pretrained projector."""
        return ParameterView(base_vlm(self.vlm).model.visual.merger)

    @property
    def llm(self) -> ParameterView:
        """The language model and its head (with their LoRA adapters)."""
        base = base_vlm(self.vlm)
        return ParameterView(base.model.language_model, extra=(("lm_head", base.lm_head),))

    def _groups(self, batch: dict, merged: torch.Tensor,
                patches: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int], int]]:
        """The features regions pool, one group per visual: (tokens [t, rows * cols, D], (rows, cols), pixels per
        cell side). ``merged`` (region_features "merged"): the merged tokens [sum_v t*h*w/m^2, D_llm] on the
        (h/m, w/m) grid of 28-px cells; else the encoder's patches [sum_v t*h*w, D_v] (pixel order (t, h/m,
        w/m, m, m)) on the (h, w) grid of 14-px cells, for "both" each beside its merged token ([.., D_v +
        D_llm])."""
        vision = self.config.vision_config
        m, p = vision.spatial_merge_size, vision.patch_size
        grids = batch["visual_grid_thw"].tolist()
        merged_parts = merged.split([t * h * w // (m * m) for t, h, w in grids])
        if self.region_features == "merged":
            return [(tokens.reshape(t, (h // m) * (w // m), -1), (h // m, w // m), p * m)
                    for tokens, (t, h, w) in zip(merged_parts, grids, strict=True)]
        groups = []
        for tokens, merged_tokens, (t, h, w) in zip(patches.split([t * h * w for t, h, w in grids]), merged_parts,
                                                   grids, strict=True):
            grid = tokens.reshape(t, h // m, w // m, m, m, -1).permute(0, 1, 3, 2, 4, 5)  # (t, h/m, m, w/m, m)
            grid = grid.reshape(t, h, w, -1)
            if self.region_features == "both":
                # Each merged token over its m x m patches: area pooling on the patch grid then pools it exactly
                # as on its own grid (the weights of a token's patches add up to its cell's weight).
                cell = merged_tokens.reshape(t, h // m, w // m, -1)
                grid = torch.cat([grid, cell.repeat_interleave(m, 1).repeat_interleave(m, 2)], dim=-1)
            groups.append((grid.reshape(t, h * w, -1), (h, w), p))
        return groups

    def _regions(self, batch: dict, merged: torch.Tensor,
                 patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region tokens [N_R, D] from the masks, pooled on each visual's token frames (:meth:`_groups`), and a
        zero-valued scalar: with no mask in the batch, the region encoder still runs once on a
        whole-frame mask times zero, so it gets a gradient on every rank (DDP) and runs on every rank (ZeRO-3
        gathers its parameters collectively), as RefVLM's dummy path."""
        # The one cast on the vision side: the VLM's dtype (bf16 at inference) -> the region encoder's weights'.
        dtype = next((p.dtype for p in self.region.parameters()), merged.dtype)
        masks, groups = batch["region_masks"], self._groups(batch, merged.to(dtype), patches.to(dtype))
        zero = merged.new_zeros(())
        if masks.shape[0] == 0:
            tokens, (rows, cols), cell = groups[0]
            full = torch.ones(1, rows * cell, cols * cell, dtype=torch.bool, device=merged.device)
            index = torch.zeros(1, dtype=torch.long, device=merged.device)
            dummy = self.region.pool_groups(groups[:1], full, index, index, index, 1)
            zero = zero + self.region.mlp(dummy).sum() * 0.0
            return merged.new_zeros(0, self.config.text_config.hidden_size), zero
        tp = self.config.vision_config.temporal_patch_size
        visual_index, frame = batch["region_visual_index"], batch["region_frame_index"]
        is_video = batch["visual_is_video"][visual_index]
        token_frame = torch.where(is_video, frame // tp, frame)
        objects, num_objects = batch["region_object_index"], int(batch["object_sample_index"].shape[0])
        pooled = self.region.pool_groups(groups, masks, visual_index, token_frame, objects, num_objects)
        # Time order within an object follows the frame (two masks of one token frame stay two tokens).
        key_frame = visual_index * (int(frame.max()) + 1) + frame
        return self.region.mlp(self.region.merge(pooled, key_frame, objects, num_objects)), zero

    def _text_ids(self, batch: dict) -> torch.Tensor:
        """``input_ids`` with the region sentinels as the pad id: region tokens are text positions."""
        return batch["input_ids"].masked_fill(batch["input_ids"] == REGION_TOKEN_ID, self.pad_token_id)

    @staticmethod
    def _rope_inputs(batch: dict) -> dict:
        """The grids (and videos' seconds per token frame) ``get_rope_index`` takes, split by modality; a
        modality the batch does not have is left out."""
        grids, is_video = batch["visual_grid_thw"], batch["visual_is_video"]
        out = {}
        if is_video.any():
            out.update(video_grid_thw=grids[is_video], second_per_grid_ts=batch["second_per_grid_ts"][is_video])
        if (~is_video).any():
            out["image_grid_thw"] = grids[~is_video]
        return out

    def embed(self, batch: dict, ablate_regions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds [B, L, D] with the visual and region tokens in place (one vision pass), and the
        zero-valued dummy term of :meth:`_regions` (:func:`refvllm.model.refvlm.with_zero_term` adds it to the
        embeddings)."""
        ids = batch["input_ids"]
        config = self.config
        is_region = ids == REGION_TOKEN_ID
        is_visual = (ids == config.video_token_id) | (ids == config.image_token_id)
        merged, patches = vision_pass(self.vlm, batch["pixel_values"], batch["visual_grid_thw"])
        region, dummy = self._regions(batch, merged, patches)
        if int(is_region.sum()) != region.shape[0]:
            raise ModelInputError(f"the batch has {int(is_region.sum())} region placeholder positions but "
                                  f"{region.shape[0]} region tokens")
        embeds = self.vlm.get_input_embeddings()(self._text_ids(batch))
        merged = merged.to(embeds.dtype)
        if int(is_visual.sum()) != merged.shape[0]:
            raise ModelInputError(f"the batch has {int(is_visual.sum())} visual placeholder positions but "
                                  f"{merged.shape[0]} visual tokens")
        region = region.to(embeds.dtype)
        if ablate_regions:
            region = torch.zeros_like(region)
        elif self.training and self.region_dropout > 0 and region.shape[0]:
            region = drop_regions(region, is_region, self.region_dropout)
        return embeds.masked_scatter(is_visual[..., None], merged).masked_scatter(is_region[..., None], region), dummy

    def positions(self, batch: dict) -> torch.Tensor:
        """mRoPE position ids [3, B, L] of the batch (:func:`position_ids`)."""
        return position_ids(self.vlm, self._text_ids(batch), batch["attention_mask"], **self._rope_inputs(batch))

    def forward(self, batch: dict, loss_normalizer: float | None = None, ablate_regions: bool = False,
                logits_at: str = "all", pack: bool = False) -> CausalLMOutputWithPast:
        """Logits, and the next-token loss when ``labels`` are in the batch (as ``RefVLM.forward``; packed,
        each sample keeps the mRoPE positions the model's own index computation gives it alone)."""
        embeds, positions = with_zero_term(*self.embed(batch, ablate_regions)), self.positions(batch)
        loss, logits = causal_lm_pass(self.vlm, embeds, batch["attention_mask"], batch.get("labels"), logits_at,
                                      loss_normalizer, pack, positions)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, batch: dict, ablate_regions: bool = False, **generation_kwargs) -> torch.Tensor:
        """New token ids [B, new] for a LEFT-padded batch, KV cache on. The VLM's own generate runs on our
        embeddings with the ids beside them (regions as text) and the grids, so its first step computes the
        mRoPE positions and their offset for the decoding steps exactly as for its own prompts; no pixels go in
        (the vision pass already ran)."""
        mask = batch["attention_mask"]
        if mask.shape[0] > 1 and bool((mask[:, -1] == 0).any()):
            raise ModelInputError("generate needs a left-padded batch (processor.collate(items, padding_side='left'))")
        (embeds, _), ids = self.embed(batch, ablate_regions), self._text_ids(batch)
        base_vlm(self.vlm).model.rope_deltas = None  # no offsets left from an earlier prompt
        generation_kwargs.setdefault("use_cache", True)
        generation_kwargs.setdefault("pad_token_id", self.pad_token_id)
        out = self.vlm.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                                mm_token_type_ids=token_types(ids, self.config), **self._rope_inputs(batch),
                                **generation_kwargs)
        return out[:, ids.shape[1]:]  # given ids, generate returns the prompt too


class ParameterView:
    """``named_parameters``/``parameters`` of a part of a model: ``module`` without the parameters under
    ``exclude`` (a name prefix), plus ``extra`` (name, module) pairs; tied weights appear once."""

    def __init__(self, module: nn.Module, exclude: str | None = None,
                 extra: tuple[tuple[str, nn.Module], ...] = ()):
        self.module, self.exclude, self.extra = module, exclude, extra

    def named_parameters(self):
        seen = set()
        parts = (("", self.module), *self.extra)
        for prefix, module in parts:
            for name, p in module.named_parameters():
                full = f"{prefix}.{name}" if prefix else name
                if (self.exclude and full.startswith(self.exclude)) or id(p) in seen:
                    continue
                seen.add(id(p))
                yield full, p

    def parameters(self):
        return (p for _, p in self.named_parameters())


def build_region_vlm(model, float32_masters: bool = False) -> RegionVLM:
    """The Qwen2.5-VL family's builder: a :class:`RegionVLM` on the VLM at ``model.vlm_path`` (local directory
    or hub id at ``model.vlm_revision``) for the model config ``model`` (``cfg.model``: ``train_vision`` /
    ``train_projector`` frozen|full (``auto``: the merger frozen), ``train_llm`` lora|full|frozen with
    ``lora`` on the language model only, ``region`` (pooling, geometry, hidden size, max tokens, merge,
    dropout), ``attn_implementation``, ``dtype``, ``gradient_checkpointing``). The region encoder maps the
    merged tokens' width to the LLM's; everything pretrained keeps ``model.dtype``; with ``float32_masters``
    (training) every trainable parameter is float32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from refvllm.hub import check_model, first_line
    from refvllm.layout import region_layout
    from refvllm.model.build import DTYPES, _enable_checkpointing, use_float32_masters
    from refvllm.model.region import RegionEncoder

    path, revision = model.vlm_path, model.vlm_revision or None
    check_model(path, "model.vlm_path", revision)
    try:
        vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=DTYPES[model.dtype], attn_implementation=model.attn_implementation, revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.vlm_path: cannot load a Qwen2.5-VL from '{path}': {first_line(e)}") from None
    merger = "frozen" if model.train_projector == "auto" else model.train_projector
    vlm.requires_grad_(False)
    for name, p in vlm.model.visual.named_parameters():
        p.requires_grad_((merger if name.startswith("merger.") else model.train_vision) == "full")
    if model.train_llm == "full":
        vlm.model.language_model.requires_grad_(True)
        vlm.lm_head.requires_grad_(True)
    if model.gradient_checkpointing:
        _enable_checkpointing(vlm)
    if model.train_llm == "lora":
        trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
        vlm = language_model_lora(vlm, model.lora)
        for n, p in base_vlm(vlm).named_parameters():  # peft froze every base weight: restore the chosen ones
            if n in trainable:
                p.requires_grad_(True)
    width, vision = vlm.config.text_config.hidden_size, vlm.config.vision_config
    # auto: both levels, the measured best on the synthetic data (docs/model.md, "The tiny VLM demo").
    features = "both" if model.region.features == "auto" else model.region.features
    source, patch = ((width, vision.patch_size * vision.spatial_merge_size) if features == "merged" else
                     (vision.hidden_size + (width if features == "both" else 0), vision.patch_size))
    region = RegionEncoder(source, width, model.region.hidden_size or width, region_layout(model), patch,
                           model.region.pooling, model.region.geometry)
    region.requires_grad_(model.train_region == "full")
    pad = vlm.config.text_config.pad_token_id
    out = RegionVLM(vlm, region, int(pad if pad is not None else vlm.config.text_config.eos_token_id),
                    model.region.dropout, features)
    if float32_masters:
        use_float32_masters(out)
    return out


def export_merged_vlm(model: RegionVLM, processor, out: str, dtype: torch.dtype) -> str:
    """The family's merged export: the VLM with the LoRA merged into its language model (or as trained), as a
    plain Qwen2.5-VL directory in ``dtype`` with its processor files (tokenizer, chat template, pixel settings), which
    ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` load. The region encoder is
    not part of it (it stays in the export's extra_trainables.safetensors)."""
    vlm = model.adapter_model.merge_and_unload() if model.adapter_model is not None else model.vlm
    vlm.to(dtype).save_pretrained(out)
    processor.save_pretrained(out)
    return out
