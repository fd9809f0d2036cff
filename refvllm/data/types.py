"""Typed records passed between the data stages. No torch here.

Stages: raw dict --schema.parse_sample--> Sample --media/masks--> DecodedSample --processor--> ProcessedSample
--collate--> batch dict (documented in refvllm/data/collate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Turn:
    """One conversation turn. ``role`` is 'user' (seed: human) or 'assistant' (seed: gpt)."""

    role: str
    text: str


@dataclass
class Sample:
    """A parsed, statically validated sample (no media opened yet).

    ``objects[k]`` is the k-th object of ``annotation``, named by the k-th ``<region>`` of the conversation; it
    maps an original frame index to a raw segmentation (compressed RLE dict, uncompressed RLE dict, or polygon
    list). Frames whose segmentation is ``null`` are dropped here (absent in that frame); every object keeps at
    least one frame.
    """

    index: int  # position in its file
    id: str  # the sample's ``id`` (or str(index) when it has none)
    kind: str  # one of constants.SAMPLE_KINDS
    media: str  # path relative to the data root (video file, frame folder or image)
    media_type: str  # 'video' (file or frame folder) or 'image'
    turns: list[Turn]
    objects: list[dict[int, Any]] = field(default_factory=list)
    height: int | None = None  # from the sample (needed by polygons when the media is not read)
    width: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # other keys kept as they are (e.g. eval 'type')

    @property
    def num_regions(self) -> int:
        return len(self.objects)


@dataclass
class FramePlan:
    """Which original frames are decoded, and which mask frames feed region tokens.

    ``frame_indices``: sorted original indices of the T' <= T planned frames (T' < T only when the video is
    shorter than T). ``object_frames[k]``: sorted original mask-frame indices kept for object k, every one of
    them in ``frame_indices``.
    """

    frame_indices: list[int]
    object_frames: list[list[int]]


@dataclass
class DecodedSample:
    """A sample with its planned frames and masks decoded at the vision tower's input resolution.

    frames: uint8 [F, S, S, 3] (S = VisualSpec.image_size), already resized (a pretrained VLM's family:
            [F, H', W', 3], the aspect-kept size of ``decode.FrameSize``).
    masks: bool [M, S, S] (or [M, H', W']), one per kept (object, frame) pair, ordered by object then frame.
    mask_frame: int64 [M], index into ``frames`` (0..F-1) of each mask.
    mask_object: int64 [M], object index (0..O-1) of each mask.
    fps: the media's frame rate as its container states it (None for frame folders, images, or a container
         that states none): with ``plan.frame_indices``, the real time between planned frames.
    """

    sample: Sample
    plan: FramePlan
    frames: np.ndarray
    masks: np.ndarray
    mask_frame: np.ndarray
    mask_object: np.ndarray
    fps: float | None = None


@dataclass(frozen=True)
class Skipped:
    """A sample the training loader could not use (bad-sample policy): returned by ``RefDataset[i]`` in place
    of the processed sample, dropped and counted by ``collate`` (``num_skipped``, ``skipped``)."""

    index: int  # position in its file
    id: str | None  # the sample's id when it could be read, else None
    reason: str  # DataError.reason
    category: str | None = None  # DataError.category (summary key, e.g. 'media_not_found', 'too_long')

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "reason": self.reason, "category": self.category}
