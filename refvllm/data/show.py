"""Render one sample as a PNG: its planned frames with each object's masks overlaid, and its conversation.

Contract:
    view = load_view(data_file, data_root, index, num_frames=8)   # SampleView (frames and masks at display size)
    draw(view, "sample.png") -> Path

    refvllm show DATA --data-root ROOT --index I --out FILE.png [--num-frames T] [--mask-resize rescale|error]

The frames are exactly those the training path decodes (``media.plan_frames`` with the same T): the frame plan
is what this view exists to check. Each object has its own colour: a translucent fill and an outline on every
planned frame that carries one of its masks; the legend names the object (the k-th ``<region>``) and how many
of its mask frames the plan kept. A bad index or a malformed sample raises :class:`DataError` naming it; a bad
``--out`` or ``--index`` is a usage error (exit 2) reported before any work is done.

Memory is bounded by the display, not the media: a frame cell is 1.6 in at 110 dpi (~176 px), so frames and
masks are brought to a display size (the media's aspect ratio, longest side at most ``DISPLAY_MAX_SIDE``)
as they are read. Frames are read one at a time and box-averaged at once, so one full-resolution frame is
alive at a time (for an 8000 x 8000 image: the reader's 192 MB frame plus the copies its decoder makes). Masks
are painted at display size straight from their RLE runs, never decoded at full resolution: their cost is
proportional to the number of runs (which ``plan_sample`` already parsed), not to the pixel count. Only the
first ``MAX_DRAWN_OBJECTS`` objects are drawn (the legend says how many more there are), and text is cut to
``MAX_TEXT_LINES`` lines, so neither a sample's object count nor its text decides the figure's size.
Measured: ``refvllm show`` on an 8000 x 8000 JPEG with three 8000 x 8000 RLE masks peaks at 1.0 GB RSS, 0.9 GB
of it ``ImageReader.read`` (PIL's decode and its copies); it was 13 GB when everything was kept at media size.
"""

from __future__ import annotations

import argparse
import math
import os
import string
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refvllm.data.decode import plan_sample
from refvllm.data.index import SampleIndex
from refvllm.data.masks import rle_counts_from_string, run_rectangles
from refvllm.data.schema import parse_sample
from refvllm.data.types import FramePlan, Sample
from refvllm.errors import DataError
from refvllm.fileio import output_file_problem

# Overlay colours, chosen away from the synthetic data's red/green/blue/yellow objects.
OBJECT_COLOURS = ("#ff00ff", "#00ffff", "#ff8c00", "#ffffff", "#8a2be2", "#00ff7f", "#ff1493", "#1e90ff")
FILL_ALPHA = 0.3
MAX_COLUMNS = 8
DISPLAY_MAX_SIDE = 512  # px: ~3x a frame cell (176 px), so the PNG loses nothing to the smaller frames
MAX_DRAWN_OBJECTS = 32  # 4 rounds of the palette; beyond that the legend only counts them
MAX_TEXT_LINES = 200  # conversation lines drawn (about 34 in of figure); the rest is counted
MAX_HEADER_LINES = 4
RUN_CHUNK = 1 << 18  # RLE runs painted per step: bounds the temporaries at ~50 MB however many runs a mask has


@dataclass
class SampleView:
    """A sample's planned frames and masks at display size ``(h, w)`` (see :func:`display_size`).

    frames: uint8 [F, h, w, 3], the planned frames in order (``plan.frame_indices``), box-averaged from the media.
    masks[k]: {original frame index: bool [h, w]} for object k, one entry per frame in ``plan.object_frames[k]``;
        a display pixel is set when any media pixel it covers is set. Only the first ``MAX_DRAWN_OBJECTS``
        objects have an entry (``len(masks) <= len(plan.object_frames)``).
    media_size: (H, W) of the media, for reference.
    """

    sample: Sample
    plan: FramePlan
    frames: np.ndarray
    masks: list[dict[int, np.ndarray]]
    media_size: tuple[int, int]


def read_sample(data_file: str | os.PathLike, index: int) -> Sample:
    """Sample ``index`` of ``data_file``, parsed; DataError for an index out of range or a malformed sample."""
    samples = SampleIndex(data_file)
    n = len(samples)
    if not 0 <= index < n:
        valid = f"valid: 0..{n - 1}" if n else "it is empty"
        raise DataError(f"--index {index} is out of range: {data_file} has {n} samples ({valid})")
    return parse_sample(samples.raw(index), index)


def load_view(data_file: str | os.PathLike, data_root: str | os.PathLike, index: int, num_frames: int = 8,
              mask_resize: str = "rescale") -> SampleView:
    """Read sample ``index`` and plan its frames exactly as :func:`refvllm.data.decode.decode_sample` does (empty
    masks dropped, an image is one frame), then read those frames and the kept masks at display size."""
    sample = read_sample(data_file, index)
    planned = plan_sample(sample, data_root, num_frames, mask_resize)  # the training path's own plan
    plan, reader = planned.plan, planned.reader
    size = display_size(reader.height, reader.width)
    try:
        frames = _read_display_frames(reader, plan.frame_indices, size)
    except DataError as e:
        raise e.with_sample(sample.index, sample.id) from None
    drawn = plan.object_frames[:MAX_DRAWN_OBJECTS]
    masks = [{f: rle_to_display(planned.rles[k][f], size) for f in kept} for k, kept in enumerate(drawn)]
    return SampleView(sample, plan, frames, masks, (reader.height, reader.width))


# --------------------------------------------------------------------------------------------- display size


def display_size(height: int, width: int, max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(h, w): the media's aspect ratio with the longest side at most ``max_side``; never enlarged, each >= 1."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _bin_starts(n: int, d: int) -> np.ndarray:
    """int64 [d]: first source index of each of ``d <= n`` display bins. Source index i falls in bin
    ``i * d // n`` (see :func:`_bins`): contiguous bins, none empty, the same partition for frames and masks."""
    return -((-np.arange(d, dtype=np.int64) * n) // d)  # ceil(j * n / d)


def _bins(i: np.ndarray, n: int, d: int) -> np.ndarray:
    """The display bin (of ``d``) of each source index ``i`` (of ``n``)."""
    return i * d // n


def _shrink_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3]: the mean of the media pixels in each display bin (a box filter).

    Rows first: the only temporary is uint32 [h, W, 3] (50 MB for an 8192-wide frame), never a float copy."""
    (big_h, big_w), (h, w) = frame.shape[:2], size
    if (big_h, big_w) == (h, w):
        return frame
    rows, cols = _bin_starts(big_h, h), _bin_starts(big_w, w)
    sums = np.add.reduceat(np.add.reduceat(frame, rows, axis=0, dtype=np.uint32), cols, axis=1)
    area = np.diff(rows, append=big_h)[:, None, None] * np.diff(cols, append=big_w)[None, :, None]
    return ((sums + area // 2) // area).astype(np.uint8)


def _read_display_frames(reader, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    """uint8 [len(indices), h, w, 3]: each frame read alone (indices increase, as readers require) and shrunk
    before the next is read, so one full-resolution frame exists at a time."""
    out = np.empty((len(indices), *size, 3), np.uint8)
    for j, f in enumerate(indices):
        out[j] = _shrink_frame(reader.read([f])[0], size)
    return out


def rle_to_display(rle: dict, size: tuple[int, int]) -> np.ndarray:
    """bool [h, w] of a checked RLE (``to_rle``'s output, ``size`` at most its own): a display pixel is set when
    any media pixel of its bin is set, so a non-empty mask stays non-empty; at the RLE's own size it is exact.

    Painted from the runs, as :func:`refvllm.data.masks.resize_rle_any` does for square targets: each run of ones
    (column-major) covers at most three rectangles of the media (its first partial column, whole columns, its
    last partial column); each maps to a rectangle of bins, and the union is painted with a 2-D difference array.
    Memory: the run lengths plus ``RUN_CHUNK`` runs' temporaries plus int64 [h + 1, w + 1]; no [H, W] array.
    """
    big_h, big_w = (int(v) for v in rle["size"])
    h, w = size
    ends = np.cumsum(rle_counts_from_string(rle["counts"]))
    starts, stops = ends[0:-1:2], ends[1::2]  # runs of ones: [start, stop) in column-major order
    diff = np.zeros((h + 1) * (w + 1), np.int64)
    for c in range(0, starts.size, RUN_CHUNK):
        a, b = starts[c:c + RUN_CHUNK], stops[c:c + RUN_CHUNK]
        rects = run_rectangles(a[b > a], b[b > a], big_h)
        top, bottom = _bins(rects[:, 0], big_h, h), _bins(rects[:, 1], big_h, h) + 1
        left, right = _bins(rects[:, 2], big_w, w), _bins(rects[:, 3], big_w, w) + 1
        corners = [(top, left, 1), (top, right, -1), (bottom, left, -1), (bottom, right, 1)]
        for rows, cols, sign in corners:
            diff += sign * np.bincount(rows * (w + 1) + cols, minlength=diff.size)
    return diff.reshape(h + 1, w + 1).cumsum(0).cumsum(1)[:h, :w] > 0


# --------------------------------------------------------------------------------------------- drawing


# Control characters have no glyph: shown as escapes, like surrogates below (whitespace is left to textwrap).
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if chr(c) not in string.whitespace}


def _safe_text(text: str) -> str:
    """``text`` that the font renderer accepts: a lone surrogate (half of a UTF-16 pair, as JSON may decode
    ``"\\ud83d"``) cannot be encoded and would crash drawing, so it becomes the escape ``\\ud83d``; control
    characters become ``\\xNN``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").translate(_CONTROL_ESCAPES)


def _cut(lines: list[str], limit: int) -> list[str]:
    """At most ``limit`` lines, the last saying how many were left out."""
    if len(lines) <= limit:
        return lines
    return [*lines[:limit - 1], f"... ({len(lines) - limit + 1} more lines not shown)"]


def _conversation_text(sample: Sample, width: int) -> list[str]:
    """The turns wrapped to ``width`` characters, each prefixed by its speaker; at most ``MAX_TEXT_LINES``."""
    lines = []
    for turn in sample.turns:
        speaker = "USER" if turn.role == "user" else "ASSISTANT"
        for i, para in enumerate(_safe_text(turn.text).split("\n")):
            prefix = f"{speaker}: " if i == 0 else " " * (len(speaker) + 2)
            lines += textwrap.wrap(para, width, initial_indent=prefix, subsequent_indent=" " * (len(speaker) + 2))
            if len(lines) > MAX_TEXT_LINES:  # stop wrapping early: a huge text must not cost its size in lines
                return _cut(lines, MAX_TEXT_LINES)
    return lines or ["(no conversation)"]


def _header(view: SampleView) -> str:
    s = view.sample
    extra = "".join(f"  {k}: {s.meta[k]}" for k in ("type", "chance", "needs_region") if k in s.meta)
    return _safe_text(f"sample {s.index}  id {s.id}  {s.kind}  {s.media}  frames {view.plan.frame_indices}{extra}")


def _overlay(ax, frame_masks: list[tuple[np.ndarray, str]]) -> None:
    """Each (bool [h, w] mask, colour) as a translucent fill and an outline, in order (later on top).

    The fills are composited into one uint8 RGBA [h, w, 4] image ("over", as stacked layers would be), so a
    frame costs one display-size image however many objects it carries."""
    from matplotlib.colors import to_rgb

    if not frame_masks:
        return
    premul = np.zeros((*frame_masks[0][0].shape, 4), np.float32)  # premultiplied colour, alpha
    for mask, colour in frame_masks:
        premul[mask] = FILL_ALPHA * np.array([*to_rgb(colour), 1.0], np.float32) + (1 - FILL_ALPHA) * premul[mask]
    alpha = premul[..., 3:]
    rgb = np.divide(premul[..., :3], alpha, out=np.zeros_like(premul[..., :3]), where=alpha > 0)
    ax.imshow(np.round(np.concatenate([rgb, alpha], -1) * 255).astype(np.uint8), interpolation="nearest")
    for mask, colour in frame_masks:
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.5)


def _draw_frames(fig, grid, view: SampleView) -> None:
    cols = min(MAX_COLUMNS, len(view.frames))
    for i, (f, frame) in enumerate(zip(view.plan.frame_indices, view.frames, strict=True)):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(frame, interpolation="nearest")
        _overlay(ax, [(m[f], OBJECT_COLOURS[k % len(OBJECT_COLOURS)]) for k, m in enumerate(view.masks) if f in m])
        marked = any(f in kept for kept in view.plan.object_frames)
        ax.set_title(f"frame {f}" + (" *" if marked else ""), fontsize=8, fontweight="bold" if marked else "normal")
        ax.set_xticks([])
        ax.set_yticks([])


def _legend_entries(view: SampleView) -> int:
    """Legend lines: one per drawn object, one more counting the objects not drawn."""
    return len(view.masks) + (len(view.plan.object_frames) > len(view.masks))


def _legend(fig, view: SampleView, y: float, ncol: int) -> None:
    """One legend entry per drawn object (and one counting the others) at figure height ``y``, left-aligned."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=OBJECT_COLOURS[k % len(OBJECT_COLOURS)], edgecolor="black",
                     label=f"object {k} (<region> #{k + 1}): {len(m)}/{len(view.sample.objects[k])} mask frames")
               for k, m in enumerate(view.masks)]
    if _legend_entries(view) > len(handles):
        hidden = len(view.plan.object_frames) - len(view.masks)
        handles.append(Patch(facecolor="none", edgecolor="none", label=f"... {hidden} more objects (not drawn)"))
    if handles:
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.005, y), fontsize=8, ncol=ncol,
                   frameon=False, borderaxespad=0.0, handlelength=1.2, columnspacing=1.5)


def draw(view: SampleView, out: str | os.PathLike) -> Path:
    """Write the PNG: header, legend, frame grid (``*`` marks frames with masks) and the conversation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(MAX_COLUMNS, max(1, len(view.frames)))
    rows = math.ceil(len(view.frames) / cols)
    cell, line = 1.6, 0.17  # inches per frame cell and per text line
    fig_w = max(cols * cell, 7.0)
    header = _cut(textwrap.wrap(_header(view), int(fig_w * 17)), MAX_HEADER_LINES)
    ncol = max(1, int(fig_w // 3.4))
    legend_h = 0.2 * math.ceil(_legend_entries(view) / ncol)
    text = _conversation_text(view.sample, width=int(fig_w * 14))
    top = 0.08 + 0.13 * len(header) + legend_h + 0.3  # header, legend, frame titles (inches)
    bottom = (len(text) + 1) * line + 0.1
    fig_h = top + rows * cell + bottom
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    grid = fig.add_gridspec(rows, cols, left=0.01, right=0.99, top=1 - top / fig_h, bottom=bottom / fig_h,
                            wspace=0.05, hspace=0.3)
    _draw_frames(fig, grid, view)
    # parse_math=False: '$' in a caption is text, and a lone '$...' would otherwise fail to parse as mathtext
    fig.text(0.005, 1 - 0.06 / fig_h, "\n".join(header), fontsize=7, va="top", parse_math=False)
    _legend(fig, view, 1 - (0.1 + 0.13 * len(header)) / fig_h, ncol)
    fig.text(0.005, (bottom - 0.1) / fig_h, "\n".join(text), fontsize=8, va="top", family="monospace",
             parse_math=False)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refvllm show",
                                description="Render a sample's planned frames with its masks and conversation.")
    p.add_argument("data", help="JSON or JSONL file in the seed's format")
    p.add_argument("--data-root", default=None, help="folder media paths are relative to (default: DATA's folder)")
    p.add_argument("--index", type=int, required=True, help="sample position in DATA (0-based)")
    p.add_argument("--out", required=True, help="PNG file to write (missing folders are created)")
    p.add_argument("--num-frames", type=int, default=8, help="frame budget T of the plan (default 8)")
    p.add_argument("--mask-resize", choices=("rescale", "error"), default="rescale")
    return p


def out_problem(out: str) -> str | None:
    """Why ``--out`` cannot be written (one line), or None: a .png file path (:func:`output_file_problem`)."""
    return output_file_problem("--out", out, ".png")


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.num_frames < 1:
        parser.error(f"--num-frames must be >= 1, got {args.num_frames}")
    if args.index < 0:
        parser.error(f"--index must be >= 0, got {args.index}")
    if (problem := out_problem(args.out)) is not None:
        parser.error(problem)
    root = args.data_root if args.data_root is not None else str(Path(args.data).parent)
    view = load_view(args.data, root, args.index, args.num_frames, args.mask_resize)
    try:
        out = draw(view, args.out)
    except OSError as e:  # checked above, but the disk may still be full or the folder gone
        parser.error(f"cannot write --out {args.out!r}: {e.strerror or e}")
    print(out)
    return 0
