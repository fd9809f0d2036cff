"""A parsed sample -> its planned frames and masks at the vision tower's resolution.

Contract:

    decoded = decode_sample(sample, data_root, num_frames, image_size, mask_resize="rescale", limits=DataLimits())
        # image_size: a side S (frames and masks S x S), or a FrameSize (a size from the media's, a filter)
    decoded, areas = decode_sample_report(...)   # + per object {frame: mask pixel count at media resolution}
    planned = plan_sample(sample, data_root, num_frames, mask_resize, limits)  # reader, plan, RLEs; no pixels

Steps: open the media (header only) -> every non-null segmentation to an RLE at the media's size (checked,
rescaled or rejected; no pixels decoded) -> drop frames whose mask is empty (an object left with none is an
error: "object k has no non-empty mask") -> plan T frames so every kept mask frame is one of them -> decode
only the planned frames -> bring each planned mask to S x S with "any coverage" (computed from its RLE runs:
exactly ``resize_mask_any(decode_mask(...), S)`` without a full-resolution copy) -> resize the frames to S x S.

Every DataError is re-raised naming the sample's index and id. ``limits`` (:class:`DataLimits`) bound the media's
and the masks' pixels and the polygons' complexity before anything is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from refvllm.data.limits import DEFAULT_LIMITS, DataLimits
from refvllm.data.masks import resize_rle_any, rle_area, to_rle
from refvllm.data.media import MediaReader, check_mask_frames, open_media, plan_frames, resize_frames
from refvllm.data.types import DecodedSample, FramePlan, Sample
from refvllm.errors import DataError


@dataclass(frozen=True)
class FrameSize:
    """The frame size a model family wants: a square ``side`` (the assembled towers squash every frame to
    it), or ``of_media(height, width) -> (height, width)`` (a pretrained VLM that keeps the aspect ratio,
    e.g. Qwen's smart_resize); frames are resized with PIL's ``resample`` filter, masks with "any coverage"."""

    side: int = 0
    of_media: Callable[[int, int], tuple[int, int]] | None = None
    resample: str = "bilinear"

    def target(self, height: int, width: int) -> tuple[int, int]:
        return self.of_media(height, width) if self.of_media is not None else (self.side, self.side)


def as_frame_size(image_size: int | FrameSize) -> FrameSize:
    return image_size if isinstance(image_size, FrameSize) else FrameSize(side=int(image_size))


def decode_sample(sample: Sample, data_root: str | os.PathLike, num_frames: int, image_size: int | FrameSize,
                  mask_resize: str = "rescale", limits: DataLimits = DEFAULT_LIMITS) -> DecodedSample:
    """frames uint8 [F, S, S, 3], masks bool [M, S, S] (object-major, then time), see DecodedSample; with a
    :class:`FrameSize`, [F, H', W', 3] and [M, H', W'] at its target for the media's size."""
    return decode_sample_report(sample, data_root, num_frames, image_size, mask_resize, limits)[0]


def decode_sample_report(sample: Sample, data_root: str | os.PathLike, num_frames: int,
                         image_size: int | FrameSize, mask_resize: str = "rescale", limits: DataLimits = DEFAULT_LIMITS
                         ) -> tuple[DecodedSample, list[dict[int, int]]]:
    """:func:`decode_sample` plus, per object, ``{frame: mask pixel count at the media's resolution}`` for every
    frame with a non-null segmentation (planned or not)."""
    planned = plan_sample(sample, data_root, num_frames, mask_resize, limits)
    size = as_frame_size(image_size)
    target = size.target(planned.reader.height, planned.reader.width)
    try:
        frames = resize_frames(planned.reader.read(planned.plan.frame_indices), target, size.resample)
        masks, mask_frame, mask_object = _planned_masks(planned.rles, planned.plan, target)
    except DataError as e:
        raise e.with_sample(sample.index, sample.id) from None
    return (DecodedSample(sample, planned.plan, frames, masks, mask_frame, mask_object, planned.reader.fps),
            planned.areas)


@dataclass
class PlannedSample:
    """A sample's opened media, its frame plan and its masks as RLE at the media's resolution (no pixels yet)."""

    reader: MediaReader
    plan: FramePlan
    rles: list[dict[int, dict]]  # per object, {frame: pycocotools RLE} for every non-null segmentation
    areas: list[dict[int, int]]  # per object, {frame: pixel count} for the same frames


def plan_sample(sample: Sample, data_root: str | os.PathLike, num_frames: int, mask_resize: str = "rescale",
                limits: DataLimits = DEFAULT_LIMITS) -> PlannedSample:
    """Open the media (header only), check every mask and convert it to an RLE at the media's size, drop empty
    masks, plan the frames. The first half of :func:`decode_sample`; DataError names the sample."""
    try:
        reader = open_media(data_root, sample, limits=limits)
        check_mask_frames(reader.num_frames, [list(obj) for obj in sample.objects])
        rles = object_rles(sample, reader.height, reader.width, mask_resize, limits)
        areas = [{f: rle_area(rle) for f, rle in obj.items()} for obj in rles]
        plan = plan_frames(reader.num_frames, num_frames if sample.media_type == "video" else 1,
                           _non_empty_frames(areas))
    except DataError as e:
        raise e.with_sample(sample.index, sample.id) from None
    return PlannedSample(reader, plan, rles, areas)


def object_rles(sample: Sample, height: int, width: int, mask_resize: str,
                limits: DataLimits = DEFAULT_LIMITS) -> list[dict[int, dict]]:
    """Per object, {frame: pycocotools RLE at [height, width]} for every non-null segmentation."""
    poly_size = (sample.height, sample.width) if sample.height is not None else None
    return [{f: to_rle(seg, height, width, poly_size=poly_size, mask_resize=mask_resize,
                       where=f"object {k} frame {f}", limits=limits) for f, seg in obj.items()}
            for k, obj in enumerate(sample.objects)]


def _non_empty_frames(areas: list[dict[int, int]]) -> list[list[int]]:
    frames = [[f for f, a in obj.items() if a > 0] for obj in areas]
    for k, kept in enumerate(frames):
        if not kept:
            raise DataError(f"object {k} has no non-empty mask (all {len(areas[k])} of its masks are empty)",
                            category="empty_mask")
    return frames


def _planned_masks(rles: list[dict[int, dict]], plan: FramePlan, size: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """masks bool [M, H', W'], mask_frame int64 [M] (row in plan.frame_indices), mask_object int64 [M]."""
    row = {f: j for j, f in enumerate(plan.frame_indices)}
    masks, mask_frame, mask_object = [], [], []
    for k, frames in enumerate(plan.object_frames):
        for f in frames:
            masks.append(resize_rle_any(rles[k][f], size))
            mask_frame.append(row[f])
            mask_object.append(k)
    stacked = np.stack(masks) if masks else np.zeros((0, *size), bool)
    return stacked, np.asarray(mask_frame, np.int64), np.asarray(mask_object, np.int64)
