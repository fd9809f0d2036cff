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

Regions are pooled from the merged tokens (after the merger, in the LLM's width): every merged token is one
28 x 28 pixel cell of one token frame (2 frames), so a mask of frame f pools token frame f // 2 on that grid,
with the area weights, temporal merge and count checks of the assembled family (:mod:`refvllm.model.region`).
Pooling before the merger (1280-wide, 14 px cells) is the alternative still to measure; the merged tokens are
what the model's own forward returns in order, in every transformers version (the encoder's own patch
features come out in its window-attention order).

Temporal patches: Qwen2.5-VL joins ``temporal_patch_size`` (2) consecutive frames into one patch, so a video of
T frames has T/2 token frames; an odd T repeats its last frame (as the HF video processor does). The time
between token frames is ``second_per_grid_ts = temporal_patch_size / sampling fps`` seconds.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from refvllm.constants import REGION_TOKEN_ID
from refvllm.data.decode import FrameSize
from refvllm.data.processor import Processor
from refvllm.data.types import DecodedSample
from refvllm.errors import ConfigError, DataError, ModelInputError
from refvllm.layout import TokenLayout, VisualSpec
from refvllm.model.refvlm import drop_regions, label_positions, next_token_loss
from refvllm.model.shapes import QWEN2_5_GENERATION

MODEL_TYPE = "qwen2_5_vl"
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

# The hub's preprocessor_config.json of Qwen2.5-VL-*-Instruct (CLIP normalisation, 14 px patches, 2 x 2 merge).
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
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
                     sampling: bool = True) -> str:
    """Write a random ``Qwen2_5_VLForConditionalGeneration`` of ``shape`` with tokenizer, processor files and a
    generation config (Qwen's sampling one when ``sampling``, else greedy) to ``path``; returns it."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    tokenizer = tokenizer_for(shape)
    config = vl_config(shape, tokenizer, layers, vision_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    text = config.text_config
    generation = {"bos_token_id": text.bos_token_id, "pad_token_id": text.pad_token_id,
                  "eos_token_id": [text.eos_token_id, text.pad_token_id], "do_sample": False}
    if sampling:  # Qwen's sampling settings, what greedy evaluation must override
        generation.update({k: v for k, v in QWEN2_5_GENERATION.items() if "token" not in k})
    model.generation_config = GenerationConfig(**generation)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    video = {**PREPROCESSOR, "video_processor_type": "Qwen2VLVideoProcessor"}
    video.pop("image_processor_type")
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    return str(path)


# -------------------------------------------------------------------------------------------------- pixels


@dataclass(frozen=True)
class Preprocessor:
    """The pixel settings of a checkpoint's ``preprocessor_config.json`` (defaults: the hub's)."""

    min_pixels: int = PREPROCESSOR["min_pixels"]
    max_pixels: int = PREPROCESSOR["max_pixels"]
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = tuple(PREPROCESSOR["image_mean"])
    image_std: tuple[float, ...] = tuple(PREPROCESSOR["image_std"])

    @classmethod
    def from_file(cls, file: str | os.PathLike) -> Preprocessor:
        data = json.loads(Path(file).read_text())
        size = data.get("size") or {}
        return cls(min_pixels=int(data.get("min_pixels", size.get("shortest_edge", cls.min_pixels))),
                   max_pixels=int(data.get("max_pixels", size.get("longest_edge", cls.max_pixels))),
                   patch_size=int(data.get("patch_size", 14)),
                   temporal_patch_size=int(data.get("temporal_patch_size", 2)),
                   merge_size=int(data.get("merge_size", 2)),
                   image_mean=tuple(data.get("image_mean", cls.image_mean)),
                   image_std=tuple(data.get("image_std", cls.image_std)))

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The frame size the model sees (Qwen's ``smart_resize``: multiples of patch x merge, pixel count
        within [min_pixels, max_pixels], aspect ratio kept)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)


def video_patches(frames: np.ndarray, pre: Preprocessor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] -> (pixel_values_videos [t*h*w, 3*tp*p*p] float32, (t, h, w)) in the order
    of HF's Qwen2-VL video processor: frames resized (PIL bicubic, as the image processor's PIL backend does;
    HF's torchvision video backend resizes with torch's bicubic, a small pixel difference), rescaled to [0, 1],
    normalised, an odd T padded with its last frame, then patches ordered (t, h/m, w/m, m, m) with each row
    (C, tp, p, p). ``h``/``w`` count 14-px patches; the LLM sees t*h*w/m^2 tokens."""
    from refvllm.data.media import resize_frames

    num, height, width, _ = frames.shape
    new_h, new_w = pre.resized(height, width)
    frames = resize_frames(frames, (new_h, new_w), "bicubic")
    x = frames.astype(np.float32) / 255.0
    x = (x - np.asarray(pre.image_mean, np.float32)) / np.asarray(pre.image_std, np.float32)
    x = x.transpose(0, 3, 1, 2)  # [T, C, H, W]
    tp, p, m = pre.temporal_patch_size, pre.patch_size, pre.merge_size
    if pad := -num % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    t, gh, gw = x.shape[0] // tp, new_h // p, new_w // p
    x = x.reshape(t, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, tp, p, p)
    return torch.from_numpy(np.ascontiguousarray(x.reshape(t * gh * gw, 3 * tp * p * p))), (t, gh, gw)


def seconds_per_token_frame(frame_indices: list[int], fps: float | None, temporal_patch_size: int,
                            default_fps: float | None = None) -> float:
    """``second_per_grid_ts`` of a planned clip: ``temporal_patch_size`` x the mean time between its planned
    frames (the mean stride of ``frame_indices`` in source frames, over ``fps``; a plan that forced mask frames
    in has uneven strides, and Qwen2.5-VL encodes one interval per video). ``fps`` is the media's (None for
    frame folders): then ``default_fps``, and with neither a DataError of the sample (category ``frame_rate``:
    the interval would be a guess)."""
    rate = fps or default_fps
    if not rate:
        raise DataError("the media states no frame rate (a folder of frames?) and no default frame rate is set: "
                        "the time between frames, which Qwen2.5-VL encodes, is unknown", category="frame_rate")
    stride = (frame_indices[-1] - frame_indices[0]) / (len(frame_indices) - 1) if len(frame_indices) > 1 else 1.0
    return temporal_patch_size * stride / rate


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
    return get_peft_model(vlm, config)


def merged_features(model, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> torch.Tensor:
    """One pass of the VLM's vision encoder and merger: [sum(t*h*w), D_patch] pixels -> [sum(t*h*w)/m^2, D_llm]
    video tokens, in the order the model scatters them (each video's (t, h/m, w/m))."""
    visual = base_vlm(model).model.visual
    out = visual(pixel_values_videos.to(visual.dtype), grid_thw=video_grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


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

    def __init__(self, vlm: nn.Module, region: nn.Module, pad_token_id: int, region_dropout: float = 0.0):
        super().__init__()
        self.vlm, self.region, self.pad_token_id = vlm, region, pad_token_id
        self.region_dropout = region_dropout

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

    def _regions(self, batch: dict, merged: torch.Tensor) -> torch.Tensor:
        """Region tokens [N_R, D] from the masks, pooled on each visual's token frames of the merged tokens
        [sum_v t*h*w/m^2, D] (every visual's, in batch order)."""
        masks = batch["region_masks"]
        if masks.shape[0] == 0:
            return self.region(merged[:0, None], masks, *(batch[k] for k in (
                "region_frame_index", "region_object_index")), 0)
        vision = self.config.vision_config
        m, p, tp = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
        grids = batch["visual_grid_thw"]
        groups = []
        for tokens, (t, h, w) in zip(merged.split((grids.prod(-1) // (m * m)).tolist()), grids.tolist(),
                                     strict=True):
            groups.append((tokens.reshape(t, (h // m) * (w // m), -1), (h // m, w // m), p * m))
        visual_index, frame = batch["region_visual_index"], batch["region_frame_index"]
        is_video = batch["visual_is_video"][visual_index]
        token_frame = torch.where(is_video, frame // tp, frame)
        objects, num_objects = batch["region_object_index"], int(batch["object_sample_index"].shape[0])
        pooled = self.region.pool_groups(groups, masks, visual_index, token_frame, objects, num_objects)
        # Time order within an object follows the frame (two masks of one token frame stay two tokens).
        key_frame = visual_index * (int(frame.max()) + 1) + frame
        return self.region.mlp(self.region.merge(pooled, key_frame, objects, num_objects))

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

    def embed(self, batch: dict, ablate_regions: bool = False) -> torch.Tensor:
        """inputs_embeds [B, L, D] with the visual and region tokens in place (one vision pass)."""
        ids = batch["input_ids"]
        config = self.config
        is_region = ids == REGION_TOKEN_ID
        is_visual = (ids == config.video_token_id) | (ids == config.image_token_id)
        merged = merged_features(self.vlm, batch["pixel_values"], batch["visual_grid_thw"])
        region = self._regions(batch, merged)
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
        return embeds.masked_scatter(is_visual[..., None], merged).masked_scatter(is_region[..., None], region)

    def positions(self, batch: dict) -> torch.Tensor:
        """mRoPE position ids [3, B, L] of the batch (:func:`position_ids`)."""
        return position_ids(self.vlm, self._text_ids(batch), batch["attention_mask"], **self._rope_inputs(batch))

    def forward(self, batch: dict, loss_normalizer: float | None = None, ablate_regions: bool = False,
                logits_at: str = "all") -> CausalLMOutputWithPast:
        """Logits, and the next-token loss when ``labels`` are in the batch (as ``RefVLM.forward``)."""
        embeds, positions = self.embed(batch, ablate_regions), self.positions(batch)
        labels = batch.get("labels")
        keep = label_positions(labels, logits_at, embeds.device)
        out = self.vlm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=positions,
                       use_cache=False, **({} if keep is None else {"logits_to_keep": keep}))
        loss = None if labels is None else next_token_loss(out.logits, labels, keep, loss_normalizer)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)

    @torch.no_grad()
    def generate(self, batch: dict, ablate_regions: bool = False, **generation_kwargs) -> torch.Tensor:
        """New token ids [B, new] for a LEFT-padded batch, KV cache on. The VLM's own generate runs on our
        embeddings with the ids beside them (regions as text) and the grids, so its first step computes the
        mRoPE positions and their offset for the decoding steps exactly as for its own prompts; no pixels go in
        (the vision pass already ran)."""
        mask = batch["attention_mask"]
        if mask.shape[0] > 1 and bool((mask[:, -1] == 0).any()):
            raise ModelInputError("generate needs a left-padded batch (collate_vlm(..., padding_side='left'))")
        embeds, ids = self.embed(batch, ablate_regions), self._text_ids(batch)
        base_vlm(self.vlm).model.rope_deltas = None  # no offsets left from an earlier prompt
        generation_kwargs.setdefault("use_cache", True)
        generation_kwargs.setdefault("pad_token_id", self.pad_token_id)
        out = self.vlm.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                                mm_token_type_ids=token_types(ids, self.config), **self._rope_inputs(batch),
                                **generation_kwargs)
        return out[:, ids.shape[1]:]  # given ids, generate returns the prompt too


# ---------------------------------------------------------------------------------------------- processor


class VLMProcessor(Processor):
    """The processor of the Qwen2.5-VL family: the shared text rendering (markers, labels, special-token
    safety) with the VLM's own visual encoding. Frames are decoded at Qwen's aspect-kept size
    (:attr:`frame_size`); the visual placeholder becomes ``<|vision_start|>`` + t*h*w/m^2 x ``<|video_pad|>``
    (``<|image_pad|>`` for an image) + ``<|vision_end|>``; the tensors are :func:`video_patches`' pixels and
    grid, the time between token frames (:func:`seconds_per_token_frame`) and the masks at the frame size.

    ``encode(decoded)`` returns ``input_ids``, ``labels``, ``pixel_values`` [t*h*w, 1176], ``visual_grid_thw``
    long [3], ``visual_is_video`` bool, ``second_per_grid_ts`` float, ``region_masks`` bool [M, H', W'],
    ``region_frame_index``, ``region_object_index``, ``num_objects``, ``sample_index``, ``sample_id``;
    :func:`collate_vlm` batches them for :class:`RegionVLM`.
    """

    def __init__(self, tokenizer, layout: TokenLayout, pre: Preprocessor, token_ids: dict[str, int],
                 max_length: int, num_frames: int, mask_resize: str, default_fps: float | None = None):
        spec = VisualSpec(0, pre.patch_size, pre.image_mean, pre.image_std)  # no fixed size: frame_size says
        super().__init__(tokenizer, layout, spec, max_length, num_frames, mask_resize)
        self.pre, self.token_ids, self.default_fps = pre, token_ids, default_fps

    @classmethod
    def from_checkpoint(cls, path: str, layout: TokenLayout, max_length: int, num_frames: int,
                        mask_resize: str = "rescale", default_fps: float | None = None) -> VLMProcessor:
        """The tokenizer, pixel settings and vision token ids of the local checkpoint ``path``."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        ids = {name: int(getattr(config, f"{name}_token_id")) for name in (
            "vision_start", "vision_end", "image", "video")}
        return cls(AutoTokenizer.from_pretrained(path), layout,
                   Preprocessor.from_file(Path(path) / "preprocessor_config.json"), ids, max_length, num_frames,
                   mask_resize, default_fps)

    @property
    def frame_size(self) -> FrameSize:
        return FrameSize(of_media=self.pre.resized, resample="bicubic")

    def _grid(self, decoded: DecodedSample) -> tuple[int, int, int]:
        frames, p, tp = decoded.frames.shape[0], self.pre.patch_size, self.pre.temporal_patch_size
        return -(-frames // tp), decoded.frames.shape[1] // p, decoded.frames.shape[2] // p

    def _visual_ids(self, decoded: DecodedSample) -> list[int]:
        t, h, w = self._grid(decoded)
        pad = self.token_ids["video" if decoded.sample.media_type == "video" else "image"]
        count = t * h * w // self.pre.merge_size**2
        return [self.token_ids["vision_start"], *([pad] * count), self.token_ids["vision_end"]]

    def _visual_tensors(self, decoded: DecodedSample, num_objects: int) -> dict:
        pixels, grid = video_patches(decoded.frames, self.pre)
        is_video = decoded.sample.media_type == "video"
        seconds = (seconds_per_token_frame(decoded.plan.frame_indices, decoded.fps, self.pre.temporal_patch_size,
                                           self.default_fps) if is_video else 0.0)
        keep = decoded.mask_object < num_objects
        return {"pixel_values": pixels, "visual_grid_thw": torch.tensor(grid), "visual_is_video": is_video,
                "second_per_grid_ts": float(seconds),
                "region_masks": torch.from_numpy(np.ascontiguousarray(decoded.masks[keep], dtype=bool)),
                "region_frame_index": torch.from_numpy(decoded.mask_frame[keep].astype(np.int64)),
                "region_object_index": torch.from_numpy(decoded.mask_object[keep].astype(np.int64)),
                "num_objects": num_objects}


def collate_vlm(items: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """:class:`VLMProcessor` items -> a :class:`RegionVLM` batch: ids/labels/attention padded on
    ``padding_side``, every visual's patches concatenated in sample order, masks zero-padded to the batch's
    largest frame size, objects renumbered across the batch."""
    from refvllm.constants import IGNORE_INDEX

    length = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[i, cols], mask[i, cols] = it["input_ids"], 1
        if "labels" in it:
            labels[i, cols] = it["labels"]
    sizes = [it["region_masks"].shape[1:] for it in items]  # an item without masks still has their frame size
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    masks = torch.zeros(sum(it["region_masks"].shape[0] for it in items), height, width, dtype=torch.bool)
    row, first_object = 0, 0
    visual_index, object_index, object_sample = [], [], []
    for i, it in enumerate(items):
        m = it["region_masks"]
        masks[row:row + len(m), : m.shape[1], : m.shape[2]] = m
        row += len(m)
        visual_index.append(torch.full((len(m),), i, dtype=torch.long))
        object_index.append(it["region_object_index"] + first_object)
        object_sample += [i] * it["num_objects"]
        first_object += it["num_objects"]
    batch = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": torch.cat([it["pixel_values"] for it in items]),
             "visual_grid_thw": torch.stack([it["visual_grid_thw"] for it in items]),
             "visual_is_video": torch.tensor([it["visual_is_video"] for it in items]),
             "second_per_grid_ts": torch.tensor([it["second_per_grid_ts"] for it in items], dtype=torch.float32),
             "region_masks": masks, "region_visual_index": torch.cat(visual_index),
             "region_frame_index": torch.cat([it["region_frame_index"] for it in items]),
             "region_object_index": torch.cat(object_index),
             "object_sample_index": torch.tensor(object_sample, dtype=torch.long)}
    if any("labels" in it for it in items):
        batch["labels"] = labels
    return batch


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


def build_region_vlm(path: str, model, dtype: torch.dtype = torch.float32, float32_masters: bool = False,
                     revision: str | None = None) -> RegionVLM:
    """A :class:`RegionVLM` on the Qwen2.5-VL at ``path`` (local directory or hub id) for the model config
    ``model`` (``cfg.model``: ``train_vision``/``train_projector`` frozen|full, ``train_llm``
    lora|full|frozen with ``lora``, ``region`` (pooling, geometry, hidden size, max tokens, merge, dropout),
    ``attn_implementation``, ``gradient_checkpointing``). The region encoder maps the merged tokens' width to
    the LLM's; everything pretrained keeps ``dtype``; with ``float32_masters`` (training) every trainable
    parameter is float32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from refvllm.hub import first_line
    from refvllm.model.build import _enable_checkpointing, use_float32_masters
    from refvllm.model.region import RegionEncoder

    try:
        vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=model.attn_implementation, revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.vlm_path: cannot load a Qwen2.5-VL from '{path}': {first_line(e)}") from None
    for mode, key in ((model.train_vision, "train_vision"), (model.train_projector, "train_projector")):
        if mode not in ("frozen", "full"):
            raise ConfigError(f"model.{key}={mode}: a pretrained VLM's vision encoder and merger are frozen or full")
    vlm.requires_grad_(False)
    visual = vlm.model.visual
    for name, p in visual.named_parameters():
        p.requires_grad_((model.train_projector if name.startswith("merger.") else model.train_vision) == "full")
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
    width = vlm.config.text_config.hidden_size
    layout = TokenLayout(grid=1, spatial_pool=1, temporal_pool=1, region_max_tokens=model.region.max_tokens,
                         region_merge=model.region.merge)  # the region rule only; visual counts come from grids
    patch = vlm.config.vision_config.patch_size * vlm.config.vision_config.spatial_merge_size
    region = RegionEncoder(width, width, model.region.hidden_size or width, layout, patch, model.region.pooling,
                           model.region.geometry)
    region.requires_grad_(model.train_region == "full")
    pad = vlm.config.text_config.pad_token_id
    out = RegionVLM(vlm, region, int(pad if pad is not None else vlm.config.text_config.eos_token_id),
                    model.region.dropout)
    if float32_masters:
        use_float32_masters(out)
    return out
