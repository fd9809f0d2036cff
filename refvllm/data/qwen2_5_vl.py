"""The Qwen2.5-VL family's data side: its pixels, its time between frames, its processor and batches.

What the model sees is what Hugging Face's own Qwen2.5-VL processor makes (:func:`video_patches` equals its
image processor on single frames; a video is frames in temporal pairs), computed here with numpy and PIL so no
torchvision is needed; the model side (:mod:`refvllm.model.qwen2_5_vl`) reads these tensors.

    pre = Preprocessor.from_file("CKPT/preprocessor_config.json")
    pixels, (t, h, w) = video_patches(frames, pre)      # uint8 [T, H, W, 3] -> [t*h*w, 3*2*14*14], grid
    seconds_per_token_frame(plan.frame_indices, fps, 2) # second_per_grid_ts of the clip
    proc = VLMProcessor.from_checkpoint(path, layout, max_length, num_frames, default_fps=None)
    batch = proc.collate(items)                          # the RegionVLM batch (VLMProcessor's docstring)

Temporal pairs: Qwen2.5-VL joins ``temporal_patch_size`` (2) consecutive planned frames into one token frame,
so a clip of T planned frames has ceil(T/2) token frames (an odd T repeats its last frame, as HF's video
processor does). A mask of planned frame f pools token frame f // 2: the token that encodes f together with
its neighbour in the plan (docs/model.md, "Qwen2.5-VL").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refvllm.data.collate import _cat, _no_rows
from refvllm.data.decode import FrameSize
from refvllm.data.processor import Processor
from refvllm.data.types import DecodedSample
from refvllm.errors import ConfigError, DataError
from refvllm.layout import TokenLayout, VisualSpec

# The hub's preprocessor_config.json of Qwen2.5-VL-*-Instruct (CLIP normalisation, 14 px patches, 2 x 2 merge).
# The files of a checkpoint that make up HF's Qwen2.5-VL processor besides the tokenizer's.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
                   "chat_template.jinja")

PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}

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



class VLMProcessor(Processor):
    """The processor of the Qwen2.5-VL family: the shared text rendering (markers, labels, special-token
    safety) with the VLM's own visual encoding. Frames are decoded at Qwen's aspect-kept size
    (:attr:`frame_size`); the visual placeholder becomes ``<|vision_start|>`` + t*h*w/m^2 x ``<|video_pad|>``
    (``<|image_pad|>`` for an image) + ``<|vision_end|>``; the tensors are :func:`video_patches`' pixels and
    grid, the time between token frames (:func:`seconds_per_token_frame`) and the masks at the frame size.

    ``encode(decoded)`` returns ``input_ids``, ``labels``, ``pixel_values`` [t*h*w, 1176], ``visual_grid_thw``
    long [3], ``visual_is_video`` bool, ``second_per_grid_ts`` float, ``region_masks`` bool [M, H', W'],
    ``region_frame_index``, ``region_object_index``, ``num_objects``, ``sample_index``, ``sample_id``;
    :meth:`collate` (:meth:`batch_visuals`) batches them for ``RegionVLM``.
    """

    def __init__(self, tokenizer, layout: TokenLayout, pre: Preprocessor, token_ids: dict[str, int],
                 max_length: int, num_frames: int, mask_resize: str, default_fps: float | None = None):
        spec = VisualSpec(0, pre.patch_size, pre.image_mean, pre.image_std)  # no fixed size: frame_size says
        super().__init__(tokenizer, layout, spec, max_length, num_frames, mask_resize)
        self.pre, self.token_ids, self.default_fps = pre, token_ids, default_fps

    @classmethod
    def from_checkpoint(cls, path: str, layout: TokenLayout, max_length: int, num_frames: int,
                        mask_resize: str = "rescale", default_fps: float | None = None,
                        revision: str | None = None) -> VLMProcessor:
        """The tokenizer (its chat template, or the checkpoint's chat_template.json), pixel settings and vision
        token ids of the checkpoint ``path`` (a local directory or a hub id at ``revision``)."""
        from transformers import AutoConfig, AutoTokenizer

        from refvllm.hub import check_model, first_line, resolve_file

        check_model(path, "model.vlm_path", revision)
        try:
            config = AutoConfig.from_pretrained(path, revision=revision)
            tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.vlm_path: cannot load the config and tokenizer of '{path}': "
                              f"{first_line(e)}") from None
        files = {name: resolve_file(path, name, "model.vlm_path", revision, required=False) for name in PROCESSOR_FILES}
        if files["preprocessor_config.json"] is None:
            raise ConfigError(f"model.vlm_path: '{path}' has no preprocessor_config.json (its pixel settings)")
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _chat_template(files)
        ids = {name: int(getattr(config, f"{name}_token_id")) for name in (
            "vision_start", "vision_end", "image", "video")}
        proc = cls(tokenizer, layout, Preprocessor.from_file(files["preprocessor_config.json"]), ids, max_length,
                   num_frames, mask_resize, default_fps)
        proc.source_files = {name: file for name, file in files.items() if file is not None}
        return proc

    @classmethod
    def from_config(cls, cfg) -> VLMProcessor:
        """The processor of ``model.vlm_path`` with the data settings of ``cfg`` (``data.default_fps`` 0: none)."""
        from dataclasses import replace

        from refvllm.layout import region_layout

        proc = cls.from_checkpoint(cfg.model.vlm_path, region_layout(cfg.model), cfg.data.max_length,
                                   cfg.data.num_frames, cfg.data.mask_resize, cfg.data.default_fps or None,
                                   cfg.model.vlm_revision or None)
        m = cfg.model
        proc.pre = replace(proc.pre, min_pixels=m.min_pixels or proc.pre.min_pixels,
                           max_pixels=m.max_pixels or proc.pre.max_pixels)
        if proc.pre.min_pixels > proc.pre.max_pixels:
            raise ConfigError(f"model.min_pixels/max_pixels: with the checkpoint's settings the pixel range is "
                              f"[{proc.pre.min_pixels}, {proc.pre.max_pixels}], which is empty")
        return proc

    def save_pretrained(self, out: str | os.PathLike) -> None:
        """The tokenizer and the checkpoint's processor files (pixel settings, chat template) into ``out``, so
        that HF's own ``AutoProcessor.from_pretrained(out)`` loads the same processing."""
        import shutil

        super().save_pretrained(out)
        for name, file in getattr(self, "source_files", {}).items():
            if name.endswith("preprocessor_config.json"):  # with the pixel budget this processor uses
                data = json.loads(Path(file).read_text())
                data.update(min_pixels=self.pre.min_pixels, max_pixels=self.pre.max_pixels)
                if "size" in data:
                    data["size"] = {**data["size"], "shortest_edge": self.pre.min_pixels,
                                    "longest_edge": self.pre.max_pixels}
                (Path(out) / name).write_text(json.dumps(data, indent=2) + "\n")
            else:
                shutil.copyfile(file, Path(out) / name)

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

    def planned_visual_tokens(self, sample, num_frames: int) -> int:
        """``_visual_ids``' count at the size the sample states (``height``/``width``), else at ``max_pixels``
        (an upper bound: the media's own size is not read here)."""
        p, m, tp = self.pre.patch_size, self.pre.merge_size, self.pre.temporal_patch_size
        if sample.height is not None and sample.width is not None:
            h, w = self.pre.resized(sample.height, sample.width)
            patches = (h // p) * (w // p)
        else:
            patches = self.pre.max_pixels // (p * p)
        return -(-num_frames // tp) * (patches // m**2) + 2  # + vision_start, vision_end

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

    def dummy_item(self) -> dict:
        """One black image at the checkpoint's smallest size (its grid, not a fixed one: ``min_pixels`` may
        enlarge it) with no label token: the stand-in for a micro-batch whose samples were all skipped (the
        trainer's dummy batch), so every module still runs."""
        side = self.pre.patch_size * self.pre.merge_size
        pixels, (t, h, w) = video_patches(np.zeros((1, side, side, 3), np.uint8), self.pre)
        count = t * h * w // self.pre.merge_size**2
        ids = [self.token_ids["vision_start"], *([self.token_ids["image"]] * count), self.token_ids["vision_end"]]
        return {**super().dummy_item(), "input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), -100),
                "pixel_values": pixels, "visual_grid_thw": torch.tensor((t, h, w)), "visual_is_video": False,
                "second_per_grid_ts": 0.0,
                "region_masks": torch.zeros(0, h * self.pre.patch_size, w * self.pre.patch_size, dtype=torch.bool)}

    @staticmethod
    def batch_visuals(kept: list[dict]) -> dict:
        """The visual part of a :class:`RegionVLM` batch: every visual's patches concatenated in sample order
        (``pixel_values``), ``visual_grid_thw`` [B, 3], ``visual_is_video`` [B], ``second_per_grid_ts`` [B],
        masks zero-padded to the batch's largest frame size, ``region_visual_index`` (the sample: one visual
        per sample), objects renumbered across the batch (``object_sample_index``)."""
        sizes = [it["region_masks"].shape[1:] for it in kept]  # an item without masks still has its frame size
        height, width = max((s[0] for s in sizes), default=0), max((s[1] for s in sizes), default=0)
        masks = torch.zeros(sum(it["region_masks"].shape[0] for it in kept), height, width, dtype=torch.bool)
        row, first_object = 0, 0
        visual_index, object_index, object_sample = [], [], []
        for i, it in enumerate(kept):
            m = it["region_masks"]
            masks[row:row + len(m), : m.shape[1], : m.shape[2]] = m
            row += len(m)
            visual_index.append(torch.full((len(m),), i, dtype=torch.long))
            object_index.append(it["region_object_index"] + first_object)
            object_sample += [i] * it["num_objects"]
            first_object += it["num_objects"]
        return {"pixel_values": _cat([it["pixel_values"] for it in kept], torch.zeros(0, 0)),
                "visual_grid_thw": _cat([it["visual_grid_thw"][None] for it in kept],
                                        torch.zeros(0, 3, dtype=torch.long)),
                "visual_is_video": torch.tensor([it["visual_is_video"] for it in kept], dtype=torch.bool),
                "second_per_grid_ts": torch.tensor([it["second_per_grid_ts"] for it in kept], dtype=torch.float32),
                "region_masks": masks, "region_visual_index": _cat(visual_index, _no_rows()),
                "region_frame_index": _cat([it["region_frame_index"] for it in kept], _no_rows()),
                "region_object_index": _cat(object_index, _no_rows()),
                "object_sample_index": torch.tensor(object_sample, dtype=torch.long)}


def _chat_template(files: dict[str, str | None]) -> str:
    """The chat template of a checkpoint whose tokenizer has none: ``chat_template.jinja`` or
    ``chat_template.json``'s ``chat_template`` (the processor's; older Qwen2-VL repositories keep it there)."""
    if files.get("chat_template.jinja"):
        return Path(files["chat_template.jinja"]).read_text()
    if files.get("chat_template.json"):
        return json.loads(Path(files["chat_template.json"]).read_text())["chat_template"]
    raise ConfigError("model.vlm_path: the checkpoint has no chat template (neither in its tokenizer nor in "
                      "chat_template.json / chat_template.jinja)")
