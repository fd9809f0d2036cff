"""Media readers (video file, frame folder, image), media-path safety, the frame plan, frame resizing.

Contract:

    check_media_path(rel) -> str                    # DataError(category='media_path') unless relative & inside
    reader = open_media(data_root, sample)          # VideoFileReader | FrameFolderReader | ImageReader
    reader.num_frames, reader.height, reader.width  # known without decoding pixels
    reader.read([3, 10, 17]) -> uint8 [3, H, W, 3]  # only these frames are converted to RGB
    plan = plan_frames(num_total, T, object_frames) # FramePlan; every kept mask frame is a planned frame
                                                    # frame_budget only if no T frames hit every object
    resize_frames(frames, S) -> uint8 [n, S, S, 3]  # squash, bilinear; S may be (height, width)

Every unreadable, missing or corrupt input raises :class:`DataError` (categories ``media_not_found``,
``media_corrupt``, ``media_empty``, ``media_path``, ``frame_index``, ``frame_order``, ``frame_budget``, ``limit``).
Every reader learns the frame size from the header first and refuses media of more than
``limits.max_media_pixels`` pixels before decoding a pixel.

Video decoding (decord, one thread per process since loader workers already run in parallel) uses the
``keyframe`` strategy by default: it walks the sorted frames forward, decoding without colour conversion up to
each wanted frame, and seeks only when a keyframe lies between the current position and the next wanted
frame, so it never decodes more than sequential decoding and skips whole GOPs when it can. The alternatives
(``batch`` = decord's get_batch, ``seek`` = seek_accurate per frame, ``sequential``) are kept for the
measurement in benchmarks/data_loading.py (figures in docs/performance.md).
"""

from __future__ import annotations

import bisect
import math
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from refvllm.data.limits import DEFAULT_LIMITS, DataLimits
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
    try:
        exists = path.exists()
    except OSError as e:  # e.g. a name longer than the file system allows (ENAMETOOLONG)
        raise DataError(f"the media path {rel!r:.200} cannot be looked up: {_first_line(e)}",
                        category="media_path") from None
    if not exists:
        raise DataError(f"media '{rel}' not found under the data root '{data_root}'", category="media_not_found")
    return path


def natural_key(name: str) -> list:
    """Sort key ordering 'f2.jpg' before 'f10.jpg' (runs of ASCII digits compared as numbers, the rest without
    case). Only ASCII digits count: ``str.isdigit`` also accepts '²' or '١', which ``int`` may refuse."""
    return [int(t) if t.isascii() and t.isdigit() else t.lower() for t in re.split(r"([0-9]+)", name)]


def _check_pixels(height: int, width: int, what: str, limits: DataLimits) -> None:
    if height * width > limits.max_media_pixels:
        raise DataError(f"{what} is {height}x{width}, more pixels than data.limits.max_media_pixels="
                        f"{limits.max_media_pixels}", category="limit")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- readers


class VideoFileReader:
    """A video container read with decord. ``read`` returns uint8 [n, H, W, 3] for sorted unique indices."""

    def __init__(self, path: str | os.PathLike, strategy: str = DEFAULT_VIDEO_STRATEGY,
                 limits: DataLimits = DEFAULT_LIMITS):
        if strategy not in VIDEO_STRATEGIES:
            raise ValueError(f"unknown video strategy {strategy!r}; one of {VIDEO_STRATEGIES}")
        self.path = str(path)
        self.strategy = strategy
        # The header probe (PyAV) comes first: it rejects non-videos without decord logging to stderr.
        self.height, self.width = _probe_video_size(self.path)
        _check_pixels(self.height, self.width, f"video '{self.path}'", limits)
        self._vr = _open_decord(self.path)
        self.num_frames = len(self._vr)
        self.fps = _valid_fps(self._vr.get_avg_fps())  # frames per second the container states, or None
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


def _valid_fps(value) -> float | None:
    """A frame rate a container states, or None when it states none usable (0, negative, NaN, infinite)."""
    try:
        fps = float(value)
    except (TypeError, ValueError):
        return None
    return fps if math.isfinite(fps) and fps > 0 else None


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


def _read_image(path: Path, limits: DataLimits | None = None, what: str = "") -> np.ndarray:
    """uint8 [H, W, 3] of an image file; DataError if it cannot be decoded. With ``limits``, the header's size
    is checked against them (naming ``what``) before any pixel is decoded, in the same open."""
    try:
        with Image.open(path) as im:
            if limits is not None:
                _check_pixels(im.size[1], im.size[0], what, limits)
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # no second full-size copy
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
    """A video stored as a folder of JPEG/PNG frames, ordered by the numbers in their names.

    Two names with the same natural key (``frame_1.jpg`` and ``frame_01.jpg``, or ``F1.jpg`` and ``f1.JPG``)
    would be ordered by the file system's listing: the folder is rejected (``frame_order``).
    """

    def __init__(self, path: str | os.PathLike, limits: DataLimits = DEFAULT_LIMITS):
        self.path = Path(path)
        self.limits = limits
        try:
            names = [n for n in os.listdir(self.path) if n.lower().endswith(FRAME_EXTENSIONS)]
        except OSError as e:
            raise DataError(f"cannot list frame folder '{self.path}': {_first_line(e)}",
                            category="media_corrupt") from None
        if not names:
            raise DataError(f"frame folder '{self.path}' has no .jpg/.jpeg/.png files", category="media_empty")
        self.files = [self.path / n for n in _ordered_frame_names(self.path, names)]
        self.num_frames = len(self.files)
        self.fps = None  # a folder of frames states no frame rate
        self.height, self.width = _image_size(self.files[0])
        _check_pixels(self.height, self.width, f"frame '{self.files[0]}'", limits)

    def read(self, indices: list[int]) -> np.ndarray:
        _check_indices(indices, self.num_frames, str(self.path))
        out = np.zeros((len(indices), self.height, self.width, 3), np.uint8)
        for j, i in enumerate(indices):
            # Header first: a huge odd frame is refused before decoding.
            frame = _read_image(self.files[i], self.limits, f"frame '{self.files[i]}'")
            if frame.shape[:2] != (self.height, self.width):
                raise DataError(f"frame file '{self.files[i]}' is {frame.shape[0]}x{frame.shape[1]} but the "
                                f"folder's first frame is {self.height}x{self.width}", category="media_corrupt")
            out[j] = frame
        return out


def _ordered_frame_names(folder: Path, names: list[str]) -> list[str]:
    """``names`` in natural order; DataError (``frame_order``) when two of them have the same natural key."""
    ordered = sorted(names, key=lambda n: (natural_key(n), n))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if natural_key(a) == natural_key(b):
            raise DataError(f"frame folder '{folder}' has two files for one frame position: '{a}' and '{b}' "
                            "(their numbers are equal); rename one so the frame order is unambiguous",
                            category="frame_order")
    return ordered


class ImageReader:
    """One image (PIL); a 1-frame clip."""

    num_frames = 1
    fps = None

    def __init__(self, path: str | os.PathLike, limits: DataLimits = DEFAULT_LIMITS):
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"image '{self.path}' is a folder", category="media_corrupt")
        self.height, self.width = _image_size(self.path)
        _check_pixels(self.height, self.width, f"image '{self.path}'", limits)

    def read(self, indices: list[int]) -> np.ndarray:
        _check_indices(indices, 1, str(self.path))
        frame = _read_image(self.path)
        if frame.shape[:2] != (self.height, self.width):  # e.g. a multi-frame file whose frames differ in size
            raise DataError(f"image '{self.path}' decodes to {frame.shape[:2]}, its header says "
                            f"{self.height}x{self.width}", category="media_corrupt")
        return frame[None] if len(indices) == 1 else frame[None].repeat(len(indices), axis=0)


MediaReader = VideoFileReader | FrameFolderReader | ImageReader


def open_media(data_root: str | os.PathLike, sample: Sample, strategy: str = DEFAULT_VIDEO_STRATEGY,
               limits: DataLimits = DEFAULT_LIMITS) -> MediaReader:
    """The reader of ``sample.media`` under ``data_root``; DataError (naming the sample) if it cannot be opened."""
    try:
        path = resolve_media(data_root, sample.media)
        if sample.media_type == "image":
            return ImageReader(path, limits)
        if path.is_dir():
            return FrameFolderReader(path, limits)
        return VideoFileReader(path, strategy, limits)
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
    frame. When that greedy shrinking cannot fit, an exact search finds at most T frames holding a mask frame of
    every object (each object keeps its frames among them, plus more of its own frames while the union fits).
    DataError ``frame_budget`` only when no such T frames exist (its message gives the fewest frames needed) or
    the bounded search gives up. A media with fewer than T frames is used whole. ``object_frames[k]`` must be
    non-empty. Deterministic: the same input gives the same plan.
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
    """Per object, a non-empty sorted subset of its (sorted, distinct) frames; their union has at most ``budget``
    frames. DataError ``frame_budget`` when no ``budget`` frames hold a frame of every object."""
    kept = _shrink_quotas(object_frames, budget)
    if kept is not None:  # the common case (fast); the exact search only takes what the greedy cannot fit
        return kept
    cover = _frame_cover(object_frames, budget)
    return _spread_quotas(object_frames, cover, budget)


def _shrink_quotas(object_frames: list[list[int]], budget: int) -> list[list[int]] | None:
    """Uniform subsets of each object's frames whose union has at most ``budget`` frames, found by lowering the
    quota of the object with the most frames; None when some object's quota would drop to 0."""
    quotas = [min(len(f), budget) for f in object_frames]
    kept = [_uniform_subset(f, q) for f, q in zip(object_frames, quotas, strict=True)]
    while len(set().union(*kept)) > budget:
        k = int(np.argmax(quotas))  # first object with the most frames gives one up
        if quotas[k] == 1:
            return None  # a greedy dead end: the sample may still fit (objects sharing frames)
        quotas[k] -= 1
        kept[k] = _uniform_subset(object_frames[k], quotas[k])
    return kept


def _spread_quotas(object_frames: list[list[int]], cover: list[int], budget: int) -> list[list[int]]:
    """Each object's frames in ``cover`` (a frame set hitting every object, at most ``budget`` frames), plus a
    uniform subset of its frames whose quota is raised by one per round, objects in order, until the union
    would exceed ``budget`` (the object then stops growing) or the object keeps all its frames."""
    in_cover = set(cover)
    base = [[f for f in frames if f in in_cover] for frames in object_frames]
    kept = [list(b) for b in base]
    uses: dict[int, int] = {}  # frame -> number of objects keeping it; len(uses) is the union's size
    for frames in kept:
        _count(uses, frames, 1)
    quotas = [0] * len(object_frames)
    growing = [len(b) < len(f) for b, f in zip(base, object_frames, strict=True)]
    while any(growing):
        for k, frames in enumerate(object_frames):
            if not growing[k]:
                continue
            quotas[k] += 1
            wider = sorted(set(base[k]).union(_uniform_subset(frames, quotas[k])))
            _count(uses, kept[k], -1)
            _count(uses, wider, 1)
            if len(uses) <= budget:
                kept[k] = wider
                growing[k] = quotas[k] < len(frames)
            else:
                _count(uses, wider, -1)
                _count(uses, kept[k], 1)
                growing[k] = False
    return kept


def _count(uses: dict[int, int], frames: list[int], step: int) -> None:
    """Add ``step`` to each frame's count in ``uses``, dropping frames whose count reaches 0."""
    for f in frames:
        n = uses.get(f, 0) + step
        if n:
            uses[f] = n
        else:
            del uses[f]


# The exact search below solves minimum hitting set: choose frames so that every object's frame set contains one.
# Sets are bit masks (Python ints): an object's set of columns (candidate frames), a column's set of objects.

# Search budgets in work units: one unit per column (or object) a search node looks at, so the time a hostile
# sample can take is bounded whatever its size (about 1 s for the cover search on 2 cores, measured with
# 128 objects x 64 frames). Realistic samples need a few thousand units.
_COVER_SEARCH_NODES = 2_000_000  # to decide whether T frames fit
_MESSAGE_SEARCH_NODES = 200_000  # for each refinement of a frame_budget message
_MAX_NAMED_OBJECTS = 32  # objects listed by index in a frame_budget message


class _SearchExhausted(Exception):
    """The node budget of the exact search ran out."""


class _Nodes:
    """A budget of search work (units: columns or objects looked at by a node)."""

    def __init__(self, limit: int):
        self.left = limit

    def spend(self, units: int = 1) -> None:
        """Count a search node that looks at ``units`` columns or objects; _SearchExhausted once the budget is
        used up."""
        self.left -= max(1, units)
        if self.left < 0:
            raise _SearchExhausted


def _bits(mask: int) -> list[int]:
    """The positions of the set bits of ``mask``, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class _HittingSet:
    """The objects' frame sets reduced for the exact search.

    ``objects[a]``: original index of reduced object a (objects whose set contains another object's are
    dropped: they are hit whenever that one is). ``frames[j]``: the frame of column j (frames whose objects are
    a subset of another frame's are dropped: that frame serves at least as well; among frames with the same
    objects the earliest is kept). ``cols[a]``: columns of object a; ``objs[j]``: objects of column j. Every set
    of columns hitting all reduced objects is, as frames, a set hitting every original object.
    """

    def __init__(self, object_frames: list[list[int]]):
        frame_objs: dict[int, int] = {}
        for k, frames in enumerate(object_frames):
            for f in frames:
                frame_objs[f] = frame_objs.get(f, 0) | 1 << k
        active, frames = (1 << len(object_frames)) - 1, sorted(frame_objs)
        while True:
            frames = _maximal_frames(frames, frame_objs, active)
            cols = {k: 0 for k in _bits(active)}
            for j, f in enumerate(frames):
                for k in _bits(frame_objs[f] & active):
                    cols[k] |= 1 << j
            smaller = _minimal_objects(cols)
            if len(smaller) == len(cols):
                break
            active = sum(1 << k for k in smaller)
        self.objects = sorted(cols)
        self.frames = frames
        self.cols = [cols[k] for k in self.objects]
        self.objs = [0] * len(frames)
        for a, mask in enumerate(self.cols):
            for j in _bits(mask):
                self.objs[j] |= 1 << a


def _maximal_frames(frames: list[int], frame_objs: dict[int, int], active: int) -> list[int]:
    """The earliest frame of each distinct object set (restricted to ``active``), dropping empty sets and sets
    strictly inside another, in frame order."""
    first: dict[int, int] = {}
    for f in frames:
        mask = frame_objs[f] & active
        if mask and mask not in first:
            first[mask] = f
    by_object: dict[int, list[int]] = {}
    for mask in first:
        for k in _bits(mask):
            by_object.setdefault(k, []).append(mask)

    def dominated(mask: int) -> bool:
        # a superset of mask contains each of its objects: scan the shortest of their lists
        rivals = min((by_object[k] for k in _bits(mask)), key=len)
        return any(other != mask and mask & ~other == 0 for other in rivals)

    return sorted(f for mask, f in first.items() if not dominated(mask))


def _minimal_objects(cols: dict[int, int]) -> list[int]:
    """The objects whose column set contains no other object's (on equal sets the earliest object stays)."""
    return [a for a, mine in cols.items()
            if not any(b != a and other & ~mine == 0 and (other != mine or b < a) for b, other in cols.items())]


def _packing(hs: _HittingSet, unhit: int, avail: int) -> list[int] | None:
    """Greedy pairwise-disjoint unhit objects (over the ``avail`` columns), fewest columns first (the earliest
    on ties), so the first is the unhit object with the fewest columns: a lower bound on the columns still needed,
    each needs its own. None when an unhit object has no available column."""
    sizes = sorted(((hs.cols[a] & avail).bit_count(), a) for a in _bits(unhit))
    if sizes and sizes[0][0] == 0:
        return None
    used, picked = 0, []
    for _, a in sizes:
        mine = hs.cols[a] & avail
        if not mine & used:
            used |= mine
            picked.append(a)
    return picked


def _branch_columns(hs: _HittingSet, a: int, unhit: int, avail: int) -> list[int]:
    """The available columns of object ``a`` worth trying, those hitting the most unhit objects first; a column
    whose unhit objects are a subset of another's is skipped (swapping it for the other keeps a cover)."""
    chosen: list[int] = []
    for _, j in sorted((-(hs.objs[j] & unhit).bit_count(), j) for j in _bits(hs.cols[a] & avail)):
        mine = hs.objs[j] & unhit
        if not any(mine & ~(hs.objs[i] & unhit) == 0 for i in chosen):
            chosen.append(j)
    return chosen


def _search_cover(hs: _HittingSet, cap: int, nodes: _Nodes, shortest: bool) -> list[int] | None:
    """Columns hitting every reduced object, at most ``cap`` of them: the first found, or when ``shortest`` the
    fewest (branch and bound). None when none exists; _SearchExhausted when ``nodes`` runs out first.

    Branches on the unhit object with the fewest available columns; a column tried in one branch is excluded
    from its later siblings (their covers without it are all that is left), and a node is pruned when its
    disjoint-object packing shows it needs more than ``cap`` columns. Depth-first with an explicit stack, so the
    depth (up to the cover's size) is not limited by Python's recursion limit.
    """
    best: list[int] | None = None
    chosen: list[int] = []  # chosen[i]: the column taken at stack[i] towards stack[i + 1]
    stack: list[list] = []  # open nodes: [unhit objects, available columns, columns left to try (last first)]

    def expand(unhit: int, avail: int) -> bool:  # True: a cover (``chosen``) was found
        nonlocal best, cap
        nodes.spend(avail.bit_count() + unhit.bit_count())
        if not unhit:
            best, cap = list(chosen), len(chosen) - 1
            return True
        packing = _packing(hs, unhit, avail)
        if packing is not None and len(chosen) + len(packing) <= cap \
                and _coverable(hs, unhit, avail, cap - len(chosen)):  # packing[0]: fewest available columns
            stack.append([unhit, avail, _branch_columns(hs, packing[0], unhit, avail)[::-1]])
        return False

    if expand((1 << len(hs.objects)) - 1, (1 << len(hs.frames)) - 1):
        return best
    while stack:
        node = stack[-1]
        if len(chosen) == len(stack):  # back from the child of chosen[-1]: later siblings go without it
            node[1] &= ~(1 << chosen.pop())
        if not node[2]:
            stack.pop()
            continue
        chosen.append(node[2].pop())
        if expand(node[0] & ~hs.objs[chosen[-1]], node[1]) and not shortest:
            return best
    return best


def _coverable(hs: _HittingSet, unhit: int, avail: int, columns: int) -> bool:
    """False when even the ``columns`` available columns hitting the most unhit objects hit fewer objects than
    are unhit, counted with overlaps (a bound the packing misses when objects overlap a lot)."""
    degrees = sorted(((hs.objs[j] & unhit).bit_count() for j in _bits(avail)), reverse=True)
    return sum(degrees[:columns]) >= unhit.bit_count()


def _greedy_cover(hs: _HittingSet) -> list[int]:
    """Columns hitting every reduced object, each the one hitting the most unhit objects (earliest on ties)."""
    unhit, chosen = (1 << len(hs.objects)) - 1, []
    while unhit:
        j = max(range(len(hs.frames)), key=lambda c: ((hs.objs[c] & unhit).bit_count(), -c))
        chosen.append(j)
        unhit &= ~hs.objs[j]
    return chosen


def _max_packing(hs: _HittingSet, start: list[int], enough: int, nodes: _Nodes) -> list[int]:
    """Pairwise-disjoint reduced objects, as many as the search finds within ``nodes`` (starting from ``start``,
    stopping at ``enough``): a maximum independent set of the objects-sharing-a-frame graph."""
    n = len(hs.objects)
    clash = [sum(1 << b for b in range(n) if b != a and hs.cols[a] & hs.cols[b]) for a in range(n)]
    best, picked = list(start), []
    stack: list[list] = []  # open nodes: [candidate objects, objects left to try (last first)]

    def expand(cand: int) -> bool:  # True: stop, ``enough`` objects found
        nonlocal best
        nodes.spend(cand.bit_count())
        if len(picked) + cand.bit_count() <= len(best):
            return False
        if not cand:
            best = list(picked)
            return len(best) >= enough
        # some maximum set holds v or one of its neighbours, else v could be added to it
        v = min(_bits(cand), key=lambda o: ((clash[o] & cand).bit_count(), o))
        stack.append([cand, [v, *_bits(clash[v] & cand)][::-1]])
        return False

    try:
        if expand((1 << n) - 1):
            return best
        while stack:
            node = stack[-1]
            if len(picked) == len(stack):  # back from the child of picked[-1]
                picked.pop()
            if not node[1]:
                stack.pop()
                continue
            picked.append(node[1].pop())
            if expand(node[0] & ~clash[picked[-1]] & ~(1 << picked[-1])):
                return best
    except _SearchExhausted:
        pass  # keep the largest found
    return best


def _frame_cover(object_frames: list[list[int]], budget: int) -> list[int]:
    """Sorted frames, at most ``budget``, holding a frame of every object. DataError ``frame_budget`` when the
    exact search proves there is none (the message gives the fewest frames needed) or runs out of nodes."""
    hs = _HittingSet(object_frames)
    packing = _packing(hs, (1 << len(hs.objects)) - 1, (1 << len(hs.frames)) - 1) or []
    if len(packing) <= budget:  # otherwise the packing alone proves that nothing fits
        try:
            cover = _search_cover(hs, budget, _Nodes(_COVER_SEARCH_NODES), shortest=False)
        except _SearchExhausted:
            raise DataError(f"no {budget} frames holding a mask frame of each of the {len(object_frames)} objects "
                            f"were found within the search budget ({_COVER_SEARCH_NODES} work units); the frame budget "
                            f"data.num_frames is {budget}", category="frame_budget") from None
        if cover is not None:
            return sorted(hs.frames[j] for j in cover)
    raise _budget_error(hs, packing, budget, len(object_frames))


def _budget_error(hs: _HittingSet, packing: list[int], budget: int, num_objects: int) -> DataError:
    """The frame_budget error once no ``budget`` frames can hit every object: the fewest frames needed (a range
    when the bounded search cannot settle it) and, when found, more than ``budget`` objects sharing no frame."""
    if len(packing) <= budget:
        packing = _max_packing(hs, packing, budget + 1, _Nodes(_MESSAGE_SEARCH_NODES))
    upper = _greedy_cover(hs)
    try:
        smaller = _search_cover(hs, len(upper) - 1, _Nodes(_MESSAGE_SEARCH_NODES), shortest=True)
        low = high = len(smaller or upper)
    except _SearchExhausted:  # proven: more than budget (the search or the packing showed it), at least the packing
        low, high = max(budget + 1, len(packing)), len(upper)
    need = f"{low} distinct frames" if low == high else f"between {low} and {high} distinct frames"
    every = f"keeping a mask frame of each of the {num_objects} objects takes {need}"
    if len(packing) > budget:
        names = sorted(hs.objects[a] for a in packing)
        listed = ", ".join(map(str, names[:_MAX_NAMED_OBJECTS]))
        if len(names) > _MAX_NAMED_OBJECTS:
            listed += f" and {len(names) - _MAX_NAMED_OBJECTS} more"
        reason = f"objects {listed} share no mask frame, so they need at least {len(packing)} distinct frames"
        if high > len(packing):
            reason += f" ({every})"
    else:
        reason = every
    return DataError(f"{reason}; the frame budget data.num_frames is {budget}", category="frame_budget")


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


RESAMPLING = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resize_frames(frames: np.ndarray, size: int | tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """uint8 [n, H, W, 3] -> uint8 [n, height, width, 3] (``size``: a side or (height, width)), squashed to
    it, with PIL's ``resample`` filter (bilinear for the assembled towers; bicubic is what Qwen's processors
    use)."""
    height, width = (size, size) if isinstance(size, int) else size
    if frames.shape[1:3] == (height, width):
        return np.ascontiguousarray(frames)
    out = np.empty((frames.shape[0], height, width, 3), np.uint8)
    for j, frame in enumerate(frames):
        out[j] = np.asarray(Image.fromarray(frame).resize((width, height), RESAMPLING[resample]))
    return out
