"""Segmentations to boolean masks: COCO compressed RLE, uncompressed RLE, polygons.

Contract:

    form = segmentation_form(seg)          # 'rle' | 'rle_uncompressed' | 'polygon' (structure only; DataError)
    rle = to_rle(seg, height, width)       # pycocotools RLE dict at the media's [height, width], content checked
    rle_area(rle) -> int                   # pixel count, without decoding
    decode_mask(seg, height, width)        # bool [height, width]
    resize_mask_any(mask, size)            # bool [size, size], "any coverage": non-empty stays non-empty
                                           # (size: a side, or (height, width): every resize here takes both)

Every malformed input raises :class:`DataError` with a category (``rle_malformed``, ``polygon_malformed``,
``segmentation_type``, ``mask_size``, ``limit``). pycocotools' C code trusts its input (a compressed RLE whose
counts overrun ``h * w`` writes past its buffer; a truncated counts string reads past its end; a ``size`` whose
product overflows corrupts its heap; a polygon's rasteriser allocates memory in proportion to its perimeter),
so every segmentation is checked here first, in numpy, against its own structure and the
:class:`~refvllm.data.limits.DataLimits` (mask pixels, polygon points and perimeter). Uncompressed RLE never
reaches pycocotools: it is re-encoded to COCO's compressed string here (:func:`rle_string_from_counts`).

Size mismatch: an RLE whose ``size`` (or polygon whose reference size) differs from the media's is rescaled
(nearest neighbour for RLE, coordinate scaling for polygons) with a :class:`MaskRescaleWarning` when both have
the same aspect ratio (within 1%) and ``mask_resize == "rescale"``; anything else is a DataError.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from refvllm.data.limits import DEFAULT_LIMITS, DataLimits
from refvllm.errors import DataError

MASK_RESIZE_MODES = ("rescale", "error")
ASPECT_TOLERANCE = 0.01  # relative difference of height/width ratios still called "the same aspect ratio"
MAX_RESCALE_AREA_RATIO = 64  # a mask rescaled to the media may have at most 64x its pixels (8x per side) ...
MAX_RESCALE_PIXELS = 1 << 28  # ... and at most 2^28 (it is decoded at its own size first)
_MAX_RLE_CHARS_PER_COUNT = 6  # 30 bits: the most pycocotools' decoder handles without integer overflow


class MaskRescaleWarning(UserWarning):
    """A mask at another resolution with the media's aspect ratio was rescaled to the media's size."""


def _fail(where: str, message: str, category: str) -> DataError:
    return DataError(f"{where}: {message}" if where else message, category=category)


# ---------------------------------------------------------------------------------------------- structure


def segmentation_form(seg: Any, where: str = "") -> str:
    """Which form ``seg`` has, after checking its structure (types, lengths; not the RLE counts string).

    Returns 'rle' (``{"size": [h, w], "counts": str}``), 'rle_uncompressed' (``counts`` a list of ints summing
    to ``h * w``) or 'polygon' (a list of flat coordinate lists, each of even length >= 6; a single flat list is
    accepted as one polygon). ``None`` is not a segmentation (callers treat it as "absent in this frame").
    """
    if isinstance(seg, dict):
        return _rle_form(seg, where)
    if isinstance(seg, list):
        _polygon_list(seg, where)
        return "polygon"
    raise _fail(where, f"segmentation must be an RLE object, a polygon list or null; got {_json_type(seg)}",
                "segmentation_type")


def _rle_form(seg: dict, where: str) -> str:
    if "size" not in seg or "counts" not in seg:
        raise _fail(where, "an RLE segmentation needs 'size' and 'counts'", "rle_malformed")
    _rle_size(seg["size"], where)
    counts = seg["counts"]
    if isinstance(counts, (str, bytes)):
        return "rle"
    if isinstance(counts, list):
        _uncompressed_counts(seg, where)
        return "rle_uncompressed"
    raise _fail(where, f"RLE 'counts' must be a string or a list of integers; got {_json_type(counts)}",
                "rle_malformed")


def _rle_size(size: Any, where: str) -> tuple[int, int]:
    ok = isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)
    if not ok:
        raise _fail(where, f"RLE 'size' must be [height, width] with positive integers; got {size!r:.80}",
                    "rle_malformed")
    return int(size[0]), int(size[1])


def _uncompressed_counts(seg: dict, where: str) -> np.ndarray:
    """The counts of an uncompressed RLE as int64, checked: integers >= 0 that sum to h * w."""
    h, w = _rle_size(seg["size"], where)
    try:
        counts = np.asarray(seg["counts"])
    except (ValueError, TypeError, OverflowError):
        counts = np.asarray([None])  # ragged or nested: reported below
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise _fail(where, "uncompressed RLE 'counts' must be a flat list of integers", "rle_malformed")
    counts = counts.astype(np.int64, copy=False)
    if counts.size and counts.min() < 0:
        raise _fail(where, "uncompressed RLE 'counts' has a negative run length", "rle_malformed")
    if counts.size and counts.max() >= 1 << 32:  # pycocotools stores runs as uint32
        raise _fail(where, "uncompressed RLE 'counts' has a run longer than 2^32 pixels", "rle_malformed")
    if int(counts.sum()) != h * w:
        raise _fail(where, f"RLE counts cover {int(counts.sum())} pixels but size {h}x{w} has {h * w}",
                    "rle_malformed")
    return counts


def _polygon_list(seg: list, where: str) -> list[list[float]]:
    """The polygons of ``seg`` as lists of floats: a list of flat [x0, y0, x1, y1, ...] lists (or one flat list)."""
    if not seg:
        raise _fail(where, "empty polygon list", "polygon_malformed")
    polys = [seg] if all(_is_number(v) for v in seg) else seg
    for j, poly in enumerate(polys):
        if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
            raise _fail(where, f"polygon {j} must be a flat list of numbers [x0, y0, x1, y1, ...]",
                        "polygon_malformed")
        if len(poly) < 6 or len(poly) % 2:
            raise _fail(where, f"polygon {j} has {len(poly)} coordinates; it needs an even number, at least 6",
                        "polygon_malformed")
        if not all(math.isfinite(v) for v in poly):
            raise _fail(where, f"polygon {j} has a non-finite coordinate", "polygon_malformed")
    return [[float(v) for v in poly] for poly in polys]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _json_type(v: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(v), "a number" if _is_number(v) else type(v).__name__)


# ---------------------------------------------------------------------------------------------- RLE strings


def rle_counts_from_string(counts: str | bytes, where: str = "") -> np.ndarray:
    """Run lengths int64 [K] of a COCO compressed counts string, checked so pycocotools may decode it safely.

    The format (pycocotools' rleFrString): each count is a run of 6-bit characters ('0' + value), 5 data bits
    each, bit 0x20 = "more characters follow", bit 0x10 of the last character = sign; counts after the second
    are stored as deltas to the count two places earlier.
    """
    try:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError:
        raise _fail(where, "RLE counts string has non-ASCII characters", "rle_malformed") from None
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        raise _fail(where, "RLE counts string has characters outside '0'..'o'", "rle_malformed")
    more = (c & 0x20) != 0
    if more[-1]:
        raise _fail(where, "RLE counts string is truncated", "rle_malformed")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_RLE_CHARS_PER_COUNT:
        raise _fail(where, "RLE counts string holds a count too large for any image", "rle_malformed")
    shift = 5 * (np.arange(c.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    out = values.copy()  # undo the delta coding: count j (j > 2) += count j - 2
    out[1::2] = np.cumsum(values[1::2])
    out[2::2] = np.cumsum(values[2::2])
    if out.min() < 0:
        raise _fail(where, "RLE counts string decodes to a negative run length", "rle_malformed")
    return out


def rle_string_from_counts(counts: np.ndarray) -> bytes:
    """COCO's compressed counts string of run lengths ``counts`` (int [K], >= 0): pycocotools' rleToString,
    vectorised. The inverse of :func:`rle_counts_from_string`."""
    counts = np.asarray(counts, np.int64)
    x = counts.copy()
    x[3:] -= counts[1:-2]  # counts after the third are deltas to the count two places earlier (i > 2)
    groups, alive = [], np.ones(x.size, bool)  # one 5-bit group per round, while a value needs more
    for _ in range(13):  # 64-bit values need at most 13 groups
        if not alive.any():
            break
        c = x & 0x1F
        x = x >> 5  # arithmetic shift: negative deltas end at -1
        more = np.where((c & 0x10) != 0, x != -1, x != 0) & alive
        groups.append((np.where(more, c | 0x20, c) + 48, alive))
        alive = more
    lengths = np.sum([g[1] for g in groups], axis=0) if groups else np.zeros(0, np.int64)
    out = np.zeros(int(np.sum(lengths)), np.uint8)
    starts = np.cumsum(lengths) - lengths
    for r, (chars, active) in enumerate(groups):
        out[starts[active] + r] = chars[active]
    return out.tobytes()


# ---------------------------------------------------------------------------------------------- to RLE


def to_rle(seg: Any, height: int, width: int, *, poly_size: tuple[int, int] | None = None,
           mask_resize: str = "rescale", where: str = "", limits: DataLimits = DEFAULT_LIMITS) -> dict:
    """``seg`` as a pycocotools RLE (``{"size": [height, width], "counts": bytes}``) at the media's size.

    ``poly_size``: (height, width) that polygon coordinates refer to (the sample's ``height``/``width``);
    default: the media's. Raises DataError for anything malformed, over ``limits`` or of another size (see the
    module docstring).
    """
    if mask_resize not in MASK_RESIZE_MODES:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZE_MODES}, got {mask_resize!r}")
    form = segmentation_form(seg, where)
    if form == "polygon":
        poly_size = poly_size or (height, width)
        _check_mask_pixels(poly_size, "polygon reference size (the sample's height x width)", limits, where)
        return _polygon_rle(_polygon_list(seg, where), height, width, poly_size, mask_resize, limits, where)
    h, w = _rle_size(seg["size"], where)
    _check_mask_pixels((h, w), "RLE size", limits, where)  # before any count is summed or decoded
    if form == "rle":
        counts = rle_counts_from_string(seg["counts"], where)
        if int(counts.sum()) != h * w:
            raise _fail(where, f"RLE counts cover {int(counts.sum())} pixels but size {h}x{w} has {h * w}",
                        "rle_malformed")
        text = seg["counts"]
        rle = {"size": [h, w], "counts": text.encode("ascii") if isinstance(text, str) else bytes(text)}
    else:
        rle = {"size": [h, w], "counts": rle_string_from_counts(_uncompressed_counts(seg, where))}
    if (h, w) != (height, width):
        rle = _rescale_rle(rle, (h, w), (height, width), mask_resize, where)
    return rle


def _check_mask_pixels(size: tuple[int, int], what: str, limits: DataLimits, where: str) -> None:
    if size[0] * size[1] > limits.max_mask_pixels:
        raise _fail(where, f"{what} {size[0]}x{size[1]} has more pixels than data.limits.max_mask_pixels="
                    f"{limits.max_mask_pixels}", "limit")


def _check_same_aspect(src: tuple[int, int], dst: tuple[int, int], mask_resize: str, what: str, where: str) -> None:
    """DataError unless ``src`` may be rescaled to ``dst``; warns when it may."""
    (h0, w0), (h, w) = src, dst
    same_aspect = abs(h0 * w - h * w0) <= ASPECT_TOLERANCE * h * w0
    if not same_aspect:
        raise _fail(where, f"{what} size {h0}x{w0} does not match the media's {h}x{w} (different aspect ratio)",
                    "mask_size")
    if mask_resize == "error":
        raise _fail(where, f"{what} size {h0}x{w0} differs from the media's {h}x{w} (data.mask_resize=error)",
                    "mask_size")
    warnings.warn(f"{what} size {h0}x{w0} differs from the media's {h}x{w} (same aspect ratio): rescaled "
                  "(set data.mask_resize=error to reject such masks)", MaskRescaleWarning, stacklevel=4)


def _rescale_rle(rle: dict, src: tuple[int, int], dst: tuple[int, int], mask_resize: str, where: str) -> dict:
    (h0, w0), (h, w) = src, dst
    if h0 * w0 > min(MAX_RESCALE_AREA_RATIO * h * w, MAX_RESCALE_PIXELS):  # decoding it would need that much memory
        raise _fail(where, f"mask size {h0}x{w0} is too large to rescale to the media's {h}x{w}", "mask_size")
    _check_same_aspect(src, dst, mask_resize, "mask", where)
    mask = resize_mask_nearest(mask_utils.decode(rle), *dst)
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _polygon_rle(polys: list[list[float]], height: int, width: int, poly_size: tuple[int, int],
                 mask_resize: str, limits: DataLimits, where: str) -> dict:
    ph, pw = poly_size
    points = sum(len(poly) for poly in polys) // 2
    if points > limits.max_polygon_points:
        raise _fail(where, f"the polygons have {points} points, more than data.limits.max_polygon_points="
                    f"{limits.max_polygon_points}", "limit")
    _check_polygon_bounds(polys, ph, pw, where)
    if (ph, pw) != (height, width):
        _check_same_aspect((ph, pw), (height, width), mask_resize, "polygon", where)
        sx, sy = width / pw, height / ph
        polys = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(poly)] for poly in polys]
    _check_polygon_perimeter(polys, height, width, limits, where)
    return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))


def polygon_perimeter(polys: list[list[float]]) -> float:
    """Sum over every edge (the closing one included) of max(|dx|, |dy|): the steps pycocotools' rasteriser
    walks, which its memory grows with."""
    total = 0.0
    for poly in polys:
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        total += float(np.abs(xy - np.roll(xy, 1, axis=0)).max(axis=1).sum())
    return total


def _check_polygon_perimeter(polys: list[list[float]], height: int, width: int, limits: DataLimits,
                             where: str) -> None:
    bound = limits.max_polygon_perimeter * (height + width)
    perimeter = polygon_perimeter(polys)
    if perimeter > bound:
        raise _fail(where, f"the polygons' perimeter is {perimeter:.0f} pixels, more than data.limits."
                    f"max_polygon_perimeter={limits.max_polygon_perimeter} x (height + width) = {bound} for the "
                    f"{height}x{width} frame (a zig-zag that would take gigabytes to rasterise)", "limit")


def _check_polygon_bounds(polys: list[list[float]], height: int, width: int, where: str) -> None:
    """Points must lie in the frame (with a small margin): this catches polygons drawn at another resolution
    and keeps absurd coordinates away from pycocotools' rasteriser, whose work grows with the coordinates."""
    margin = max(2.0, 0.01 * max(height, width))
    for j, poly in enumerate(polys):
        xy = np.asarray(poly).reshape(-1, 2)
        outside = (xy[:, 0] < -margin) | (xy[:, 0] > width + margin) | (xy[:, 1] < -margin) | (xy[:, 1] > height
                                                                                                + margin)
        if outside.any():
            x, y = xy[np.argmax(outside)]
            raise _fail(where, f"polygon {j} point ({x:g}, {y:g}) lies outside the {height}x{width} frame "
                        "(height x width)", "polygon_malformed")


# ---------------------------------------------------------------------------------------------- decode, resize


def rle_area(rle: dict) -> int:
    """Number of set pixels of a pycocotools RLE (no decoding)."""
    return int(mask_utils.area(rle))


def decode_rle(rle: dict) -> np.ndarray:
    """bool [h, w] of a checked RLE (as returned by :func:`to_rle`)."""
    return mask_utils.decode(rle).astype(bool)


def decode_mask(seg: Any, height: int, width: int, *, mask_resize: str = "rescale", where: str = "",
                poly_size: tuple[int, int] | None = None, limits: DataLimits = DEFAULT_LIMITS) -> np.ndarray:
    """bool [height, width]: ``seg`` decoded at the media's resolution (see :func:`to_rle`)."""
    mask = decode_rle(to_rle(seg, height, width, poly_size=poly_size, mask_resize=mask_resize, where=where,
                             limits=limits))
    if mask.shape != (height, width):  # pycocotools bug guard: never hand on a mask of the wrong shape
        raise _fail(where, f"mask decoded to shape {mask.shape}, expected {(height, width)}", "rle_malformed")
    return mask


@functools.lru_cache(maxsize=64)
def _axis_map(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n`` source indices, the first and last target index (of ``size``) it sets under the
    "any" rule of :func:`_any_axis`: its bin when downsampling, the targets whose centre it holds when
    upsampling."""
    if n >= size:
        bins = np.searchsorted((np.arange(size) * n) // size, np.arange(n), side="right") - 1
        return bins, bins
    centres = ((np.arange(size) + 0.5) * n / size).astype(np.int64)
    return np.searchsorted(centres, np.arange(n), "left"), np.searchsorted(centres, np.arange(n), "right") - 1


def target_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a square side or a (height, width) pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_rle_any(rle: dict, size: int | tuple[int, int]) -> np.ndarray:
    """bool [height, width] of :func:`target_size`: exactly ``resize_mask_any(decode_rle(rle), size)``,
    computed from the runs.

    Each run of ones (column-major) covers at most three rectangles of the source (its first partial column,
    whole columns, its last partial column); each maps to a rectangle of the target, and the union is painted
    with a 2-D difference array. Cost grows with the number of runs, not the media's pixel count, so a 720p
    mask never exists at full resolution.
    """
    h, w = (int(v) for v in rle["size"])
    ends = np.cumsum(rle_counts_from_string(rle["counts"]))
    starts, stops = ends[0:-1:2], ends[1::2]  # runs of ones: [start, stop) in column-major order
    rects = run_rectangles(starts[stops > starts], stops[stops > starts], h)
    out_h, out_w = target_size(size)
    row_lo, row_hi = _axis_map(h, out_h)
    col_lo, col_hi = _axis_map(w, out_w)
    top, bottom = row_lo[rects[:, 0]], row_hi[rects[:, 1]] + 1
    left, right = col_lo[rects[:, 2]], col_hi[rects[:, 3]] + 1
    diff = np.zeros((out_h + 1, out_w + 1), np.int32)
    for rows, cols, sign in ((top, left, 1), (top, right, -1), (bottom, left, -1), (bottom, right, 1)):
        np.add.at(diff, (rows, cols), sign)
    return diff.cumsum(0).cumsum(1)[:out_h, :out_w] > 0


def run_rectangles(starts: np.ndarray, stops: np.ndarray, height: int) -> np.ndarray:
    """int64 [R, 4]: (first row, last row, first column, last column), inclusive, of the rectangles that the
    non-empty column-major runs [starts, stops) of a ``height``-row mask cover: each run covers at most three
    (its first partial column, whole columns, its last partial column)."""
    c0, r0 = np.divmod(starts, height)
    c1, r1 = np.divmod(stops - 1, height)
    multi, middle = c1 > c0, c1 - c0 >= 2
    return np.concatenate([
        np.stack([r0, np.where(multi, height - 1, r1), c0, c0], 1),
        np.stack([np.zeros_like(r1), r1, c1, c1], 1)[multi],
        np.stack([np.zeros_like(c0), np.full_like(c0, height - 1), c0 + 1, c1 - 1], 1)[middle],
    ])


def resize_mask_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W] -> [height, width] by sampling the source pixel under each target pixel's centre."""
    rows = ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64)
    return mask[rows[:, None], cols[None, :]]


def _any_axis(mask: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Resize one axis to ``size`` with "any" semantics (see :func:`resize_mask_any`)."""
    n = mask.shape[axis]
    if n == size:
        return mask
    if n > size:  # each source index falls in exactly one target bin: OR over the bin
        starts = (np.arange(size) * n) // size
        return np.logical_or.reduceat(mask, starts, axis=axis)
    centres = ((np.arange(size) + 0.5) * n / size).astype(np.int64)  # upsampling: every source index is hit
    return np.take(mask, centres, axis=axis)


def resize_mask_any(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """bool [H, W] -> bool [height, width] of :func:`target_size`, squashing like the frames.

    A target pixel is set when any source pixel mapped into it is set (downsampling partitions the source
    pixels among the target pixels; upsampling samples pixel centres), so a non-empty mask never becomes empty.
    Works row-then-column on booleans: no float copies of the full-resolution mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"resize_mask_any expects a 2-D mask, got shape {mask.shape}")
    out_h, out_w = target_size(size)
    return np.ascontiguousarray(_any_axis(_any_axis(mask.astype(bool, copy=False), out_h, 0), out_w, 1))


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a mask [H, W] (non-zero = object), ``counts`` as str: JSON-ready."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(bool).astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a (maybe empty) 0-run."""
    flat = mask.astype(bool).astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}
