"""Resource limits on what one sample may make refvllm read, decode or allocate.

A data file assembled by scripts from many sources holds every kind of oddity; a sample must never be able to
claim its way to gigabytes of memory or minutes of work. These limits bound, per sample, what the sample's own
claims (sizes, point lists, nesting) would otherwise decide. They are ``data.limits.*`` in the config (docs:
docs/data-format.md, "Limits"); a sample over a limit is a :class:`~refvllm.errors.DataError` (category
``limit``) like any other bad sample: skipped in training, reported by ``refvllm validate``.

No torch, no numpy: imported by the config and by every data stage.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fixed, not configurable: every integer of a sample must fit int64 (ids, frame keys, sizes, RLE counts; Python
# would otherwise carry 5,000-digit integers into numpy and C code that overflow) and every float must be finite.
INT64_MAX = (1 << 63) - 1
# pycocotools' compressed-RLE decoder overflows on runs of 2^29 pixels or more: no mask (and so no media, whose
# masks are decoded at its size) may have that many pixels, whatever the config says.
MAX_PIXELS_CEILING = (1 << 29) - 1


@dataclass
class DataLimits:
    """Per-sample bounds (all positive). Defaults admit every real data set we know, with a wide margin."""

    # Bytes of one sample's JSON text (a JSONL line or an array element). Real samples are KB to a few MB.
    max_sample_bytes: int = 64 << 20
    # Nesting depth of a sample's JSON value (a sample with polygon masks is 6 deep).
    max_json_depth: int = 32
    # Objects (``<region>`` placeholders) of one sample, and non-null segmentations of all its objects together:
    # the frame plan and the mask checks work per object and per mask.
    max_objects: int = 128
    max_masks: int = 4096
    # Pixels (height x width) of a decoded frame or image, read from the header before any pixel is decoded.
    # 8192 x 8192: beyond 8K video; one such RGB frame is 192 MiB.
    max_media_pixels: int = 8192 * 8192
    # Pixels of a mask's own size: an RLE's ``size`` or the ``height``/``width`` polygons are drawn in.
    max_mask_pixels: int = 8192 * 8192
    # Points of one frame's segmentation (all its polygons together).
    max_polygon_points: int = 100_000
    # Perimeter of one frame's polygons (sum over edges of max(|dx|, |dy|), in pixels of the media), as a
    # multiple of the frame's height + width. pycocotools' rasteriser allocates memory in proportion to it:
    # a zig-zag of a few thousand points across a 4K frame would take gigabytes. An object outline is 1-4x.
    max_polygon_perimeter: int = 64

    def check(self, prefix: str = "data.limits") -> None:
        """ValueError naming the key when a limit is not a positive integer."""
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config key '{prefix}.{name}' must be a positive integer; got {value!r}")
        for name in ("max_media_pixels", "max_mask_pixels"):
            if getattr(self, name) > MAX_PIXELS_CEILING:
                raise ValueError(f"config key '{prefix}.{name}' must be at most {MAX_PIXELS_CEILING} (2^29 - 1, "
                                 f"the largest mask pycocotools decodes safely); got {getattr(self, name)}")


DEFAULT_LIMITS = DataLimits()
