"""Media readers (video file, frame folder, image), media-path safety, the frame plan, frame resizing.

Contract:

    check_media_path(rel) -> str                    # DataError(category='media_path') unless relative & inside
    reader = open_media(data_root, sample)          # VideoFileReader | FrameFolderReader | ImageReader
    reader.num_frames, reader.height, reader.width  # known without decoding pixels
    reader.read([3, 10, 17]) -> uint8 [3, H, W, 3]  # only these frames are converted to RGB
    plan = plan_frames(num_total, T, object_frames) # FramePlan; every kept mask frame is a planned frame
    resize_frames(frames, S) -> uint8 [n, S, S, 3]  # squash, bilinear

Every unreadable, missing or corrupt input raises :class:`DataError` (categories ``media_not_found``,
``media_corrupt``, ``media_empty``, ``media_path``, ``frame_index``, ``frame_budget``).

Video decoding (decord, one thread per process since loader workers already run in parallel) uses the
``keyframe`` strategy by default: it walks the sorted frames forward, decoding without colour conversion up to
each wanted frame, and seeks only when a keyframe lies between the current position and the next wanted
frame, so it never decodes more than sequential decoding and skips whole GOPs when it can. The alternatives
(``batch`` = decord's get_batch, ``seek`` = seek_accurate per frame, ``sequential``) are kept for the
measurement in benchmarks/data_loading.py (figures in docs/performance.md).
"""

from __future__ import annotations

import bisect
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from refvllm.data.types import FramePlan, Sample
from refvllm.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")  # files of a frame folder
VIDEO_STRATEGIES = ("keyframe", "batch", "seek", "sequential")
DEFAULT_VIDEO_STRATEGY = "keyframe"


# ---------------------------------------------------------------------------------------------- paths


def check_media_path(path: str) -> str:
    """``path`` unchanged if it is a non-empty relative path that stays inside the data root.

    Absolute paths (POSIX or Windows, drive letters, UNC), any ``..`` component (``/`` or ``\\`` separated)
    and NUL characters are rejected. Symbolic links inside the root are followed on purpose (a data root may
    link to storage elsewhere).
    """
    if not isinstance(path, str) or not path.strip():
        raise DataError("the media path is empty", category="media_path")
    if "\x00" in path:
        raise DataError(f"the media path {path!r} contains a NUL character", category="media_path")
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive:
        raise DataError(f"the media path {path!r} is absolute; it must be relative to the data root",
                        category="media_path")
    if ".." in re.split(r"[\\/]+", path):
        raise DataError(f"the media path {path!r} leaves the data root ('..')", category="media_path")
    return path


def resolve_media(data_root: str | os.PathLike, rel: str) -> Path:
    """The media's path under ``data_root`` after :func:`check_media_path`; DataError if it does not exist."""
    path = Path(data_root) / check_media_path(rel)
    if not path.exists():
        raise DataError(f"media '{rel}' not found under the data root '{data_root}'", category="media_not_found")
    return path


def natural_key(name: str) -> list:
    """Sort key ordering 'f2.jpg' before 'f10.jpg' (numbers compared as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- readers


class VideoFileReader:
    """A video container read with decord. ``read`` returns uint8 [n, H, W, 3] for sorted unique indices."""

    def __init__(self, path: str | os.PathLike, strategy: str = DEFAULT_VIDEO_STRATEGY):
        if strategy not in VIDEO_STRATEGIES:
            raise ValueError(f"unknown video strategy {strategy!r}; one of {VIDEO_STRATEGIES}")
        self.path = str(path)
        self.strategy = strategy
        # The header probe (PyAV) comes first: it rejects non-videos without decord logging to stderr.
        self.height, self.width = _probe_video_size(self.path)
        self._vr = _open_decord(self.path)
        self.num_frames = len(self._vr)
        self._pos: int | None = 0  # index of the frame the next decord.next() returns; None = unknown

    def read(self, indices: list[int]) -> np.ndarray:
        _check_indices(indices, self.num_frames, self.path)
        try:
            frames = getattr(self, f"_read_{self.strategy}")(list(indices))
        except DataError:
            raise
        except Exception as e:  # decord raises DECORDError/RuntimeError/StopIteration for broken streams
            raise DataError(f"cannot decode frames of video '{self.path}': {_first_line(e)}",
                            category="media_corrupt") from None
        if frames.shape[1:] != (self.height, self.width, 3):
            raise DataError(f"video '{self.path}' decodes to frames of shape {frames.shape[1:]} but its stream "
                            f"says {self.height}x{self.width}", category="media_corrupt")
        return frames

    def _read_batch(self, indices: list[int]) -> np.ndarray:
        self._pos = None
        return self._vr.get_batch(indices).asnumpy()

    def _read_seek(self, indices: list[int]) -> np.ndarray:
        out = []
        for i in indices:
            self._vr.seek_accurate(i)
            out.append(self._vr.next().asnumpy())
        self._pos = indices[-1] + 1 if indices else self._pos
        return np.stack(out) if out else self._empty()

    def _read_sequential(self, indices: list[int]) -> np.ndarray:
        return self._walk(indices, keyframes=None)

    def _read_keyframe(self, indices: list[int]) -> np.ndarray:
        return self._walk(indices, keyframes=list(self._vr.get_key_indices()))

    def _walk(self, indices: list[int], keyframes: list[int] | None) -> np.ndarray:
        """Decode forward through ``indices`` (skipped frames are decoded but not colour-converted); with
        ``keyframes``, jump to the last keyframe before a wanted frame whenever it is ahead of the position."""
        out = []
        for i in indices:
            key = keyframes[bisect.bisect_right(keyframes, i) - 1] if keyframes else 0
            if self._pos is None or self._pos > i or (keyframes and key > self._pos):
                self._vr.seek(key)  # decord seeks to the keyframe at or before frame `key`
                self._pos = key
            if i > self._pos:
                self._vr.skip_frames(i - self._pos)
            out.append(self._vr.next().asnumpy())
            self._pos = i + 1
        return np.stack(out) if out else self._empty()

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.height, self.width, 3), np.uint8)


def _open_decord(path: str):
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # broken files are reported as DataError, not ffmpeg noise
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # DECORDError, RuntimeError, AssertionError (zero frames) depending on the damage
        raise DataError(f"cannot open video '{path}': {_first_line(e)}", category="media_corrupt") from None
    if len(vr) < 1:
        raise DataError(f"video '{path}' has no frames", category="media_empty")
    return vr


def _probe_video_size(path: str) -> tuple[int, int]:
    """(height, width) from the container's stream header (no pixel decoding)."""
    import av

    try:
        with av.open(path) as container:
            ctx = container.streams.video[0].codec_context
            height, width = int(ctx.height), int(ctx.width)
    except (av.FFmpegError, OSError) as e:
        reason = getattr(e, "strerror", None) or _first_line(e)
        raise DataError(f"cannot open video '{path}': {reason}", category="media_corrupt") from None
    except IndexError:
        raise DataError(f"'{path}' has no video stream", category="media_corrupt") from None
    if height < 1 or width < 1:
        raise DataError(f"video '{path}' has no frame size in its header", category="media_corrupt")
    return height, width


def _check_indices(indices: list[int], num_frames: int, where: str) -> None:
    if any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
        raise ValueError(f"frame indices must be sorted and unique, got {indices}")
    if indices and (indices[0] < 0 or indices[-1] >= num_frames):
        raise DataError(f"frame {indices[-1] if indices[-1] >= num_frames else indices[0]} is outside "
                        f"'{where}' ({num_frames} frames)", category="frame_index")


def _read_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] of an image file; DataError if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image '{path}': {_first_line(e)}", category="media_corrupt") from None


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image '{path}': {_first_line(e)}", category="media_corrupt") from None
    return height, width


class FrameFolderReader:
    """A video stored as a folder of JPEG/PNG frames, ordered by the numbers in their names."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            names = [n for n in os.listdir(self.path) if n.lower().endswith(FRAME_EXTENSIONS)]
        except OSError as e:
            raise DataError(f"cannot list frame folder '{self.path}': {_first_line(e)}",
                            category="media_corrupt") from None
        if not names:
            raise DataError(f"frame folder '{self.path}' has no .jpg/.jpeg/.png files", category="media_empty")
        self.files = [self.path / n for n in sorted(names, key=natural_key)]
        self.num_frames = len(self.files)
        self.height, self.width = _image_size(self.files[0])

    def read(self, indices: list[int]) -> np.ndarray:
        _check_indices(indices, self.num_frames, str(self.path))
        out = np.zeros((len(indices), self.height, self.width, 3), np.uint8)
        for j, i in enumerate(indices):
            frame = _read_image(self.files[i])
            if frame.shape[:2] != (self.height, self.width):
                raise DataError(f"frame file '{self.files[i]}' is {frame.shape[0]}x{frame.shape[1]} but the "
                                f"folder's first frame is {self.height}x{self.width}", category="media_corrupt")
            out[j] = frame
        return out


class ImageReader:
    """One image (PIL); a 1-frame clip."""

    num_frames = 1

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"image '{self.path}' is a folder", category="media_corrupt")
        self.height, self.width = _image_size(self.path)

    def read(self, indices: list[int]) -> np.ndarray:
        _check_indices(indices, 1, str(self.path))
        frame = _read_image(self.path)
        if frame.shape[:2] != (self.height, self.width):  # e.g. a multi-frame file whose frames differ in size
            raise DataError(f"image '{self.path}' decodes to {frame.shape[:2]}, its header says "
                            f"{self.height}x{self.width}", category="media_corrupt")
        return frame[None].repeat(len(indices), axis=0)


MediaReader = VideoFileReader | FrameFolderReader | ImageReader


def open_media(data_root: str | os.PathLike, sample: Sample,
               strategy: str = DEFAULT_VIDEO_STRATEGY) -> MediaReader:
    """The reader of ``sample.media`` under ``data_root``; DataError (naming the sample) if it cannot be opened."""
    try:
        path = resolve_media(data_root, sample.media)
        if sample.media_type == "image":
            return ImageReader(path)
        if path.is_dir():
            return FrameFolderReader(path)
        return VideoFileReader(path, strategy)
    except DataError as e:
        raise e.with_sample(sample.index, sample.id) from None


# ---------------------------------------------------------------------------------------------- frame plan


def uniform_indices(num_total: int, count: int) -> list[int]:
    """``count`` indices of 0..num_total-1 at the centres of ``count`` equal segments (count <= num_total)."""
    return [((2 * i + 1) * num_total) // (2 * count) for i in range(count)]


def check_mask_frames(num_total: int, object_frames: list[list[int]]) -> None:
    """DataError when a mask frame is negative or past the end of a media with ``num_total`` frames."""
    for k, frames in enumerate(object_frames):
        bad = [f for f in frames if not 0 <= f < num_total]
        if bad:
            raise DataError(f"object {k}: mask frame {bad[0]} is past the end of the media ({num_total} frame"
                            f"{'s' if num_total != 1 else ''}, indices 0..{num_total - 1})", category="frame_index")


def plan_frames(num_total: int, num_frames: int, object_frames: list[list[int]]) -> FramePlan:
    """The T = ``num_frames`` frames to decode from a media of ``num_total`` frames.

    Uniform frames (centres of T equal segments) with every kept mask frame in place of its nearest uniform
    frame (a min-total-distance, order-preserving assignment, so two mask frames never evict each other; ties
    go to the earlier slot). When the objects' mask frames together exceed T, each object keeps a uniform subset
    of its frames (the object with the most frames gives one up first), so every object keeps at least one
    frame. A media with fewer than T frames is used whole. ``object_frames[k]`` must be non-empty.
    """
    if num_total < 1:
        raise DataError("the media has no frames", category="media_empty")
    check_mask_frames(num_total, object_frames)
    for k, frames in enumerate(object_frames):
        if not frames:
            raise DataError(f"object {k} has no mask frame", category="no_mask")
    sorted_frames = [sorted(set(f)) for f in object_frames]
    if num_total <= num_frames:
        return FramePlan(list(range(num_total)), sorted_frames)
    kept = _fit_mask_frames(sorted_frames, num_frames)
    mask_frames = sorted(set().union(*kept)) if kept else []
    frames = _place_mask_frames(mask_frames, uniform_indices(num_total, num_frames), num_total)
    return FramePlan(frames, kept)


def _uniform_subset(frames: list[int], count: int) -> list[int]:
    return [frames[j] for j in uniform_indices(len(frames), count)]


def _fit_mask_frames(object_frames: list[list[int]], budget: int) -> list[list[int]]:
    """Uniform subsets of each object's frames whose union has at most ``budget`` frames."""
    quotas = [min(len(f), budget) for f in object_frames]
    kept = [_uniform_subset(f, q) for f, q in zip(object_frames, quotas, strict=True)]
    while len(set().union(*kept)) > budget:
        k = int(np.argmax(quotas))  # first object with the most frames gives one up
        if quotas[k] == 1:
            raise DataError(f"{len(object_frames)} objects need more distinct mask frames than the frame budget "
                            f"of {budget} (data.num_frames)", category="frame_budget")
        quotas[k] -= 1
        kept[k] = _uniform_subset(object_frames[k], quotas[k])
    return kept


def _place_mask_frames(mask_frames: list[int], uniform: list[int], num_total: int) -> list[int]:
    """Sorted frame list: ``uniform`` with each mask frame replacing its slot of an optimal monotone matching."""
    m, t = len(mask_frames), len(uniform)
    if m == 0:
        return list(uniform)
    dist = np.abs(np.asarray(mask_frames)[:, None] - np.asarray(uniform)[None, :]).astype(np.int64)
    inf = np.iinfo(np.int64).max // 4
    cost = np.full((m, t), inf, np.int64)  # cost[i, j]: best for mask frames 0..i with frame i in slot j
    cost[0] = dist[0]
    for i in range(1, m):
        best_before = np.minimum.accumulate(np.concatenate(([inf], cost[i - 1, :-1])))
        cost[i] = np.where(best_before < inf, best_before + dist[i], inf)
    slots = [int(np.argmin(cost[m - 1]))]  # argmin takes the first (earliest) slot on ties
    for i in range(m - 1, 0, -1):
        slots.append(int(np.argmin(cost[i - 1, : slots[-1]])))
    chosen = list(uniform)
    for frame, slot in zip(mask_frames, reversed(slots), strict=True):
        chosen[slot] = frame
    return _fill_to(sorted(set(chosen)), t, num_total)


def _fill_to(frames: list[int], count: int, num_total: int) -> list[int]:
    """Add frames in the middle of the largest gaps until there are ``count`` (a replaced slot can, rarely,
    coincide with a kept uniform frame)."""
    while len(frames) < count:
        bounds = [-1, *frames, num_total]
        gap = max(range(len(bounds) - 1), key=lambda g: bounds[g + 1] - bounds[g])
        bisect.insort(frames, (bounds[gap] + bounds[gap + 1] + 1) // 2)
    return frames


# ---------------------------------------------------------------------------------------------- resize


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, H, W, 3] -> uint8 [n, size, size, 3], squashed (aspect ratio not kept), bilinear (PIL)."""
    if frames.shape[1:3] == (size, size):
        return np.ascontiguousarray(frames)
    out = np.empty((frames.shape[0], size, size, 3), np.uint8)
    for j, frame in enumerate(frames):
        out[j] = np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))
    return out
