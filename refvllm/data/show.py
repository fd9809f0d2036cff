"""Render one sample as a PNG: its planned frames with each object's masks overlaid, and its conversation.

Contract:
    view = load_view(data_file, data_root, index, num_frames=8)   # SampleView (frames and masks at media size)
    draw(view, "sample.png") -> Path

    refvllm show DATA --data-root ROOT --index I --out FILE.png [--num-frames T] [--mask-resize rescale|error]

The frames are exactly those the training path decodes (``media.plan_frames`` with the same T): the frame plan
is what this view exists to check. Frames and masks are shown at the media's own resolution (the model sees
them squashed to S x S). Each object has its own colour: a translucent fill and an outline on every planned
frame that carries one of its masks; the legend names the object (the k-th ``<region>``) and how many of its
mask frames the plan kept. A bad index or a malformed sample raises :class:`DataError` naming it.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refvllm.data.decode import plan_sample
from refvllm.data.index import SampleIndex
from refvllm.data.masks import decode_rle
from refvllm.data.schema import parse_sample
from refvllm.data.types import FramePlan, Sample
from refvllm.errors import DataError

# Overlay colours, chosen away from the synthetic data's red/green/blue/yellow objects.
OBJECT_COLOURS = ("#ff00ff", "#00ffff", "#ff8c00", "#ffffff", "#8a2be2", "#00ff7f", "#ff1493", "#1e90ff")
MAX_COLUMNS = 8


@dataclass
class SampleView:
    """A sample's planned frames and masks at the media's resolution.

    frames: uint8 [F, H, W, 3], the planned frames in order (``plan.frame_indices``).
    masks[k]: {original frame index: bool [H, W]} for object k, one entry per frame in ``plan.object_frames[k]``.
    """

    sample: Sample
    plan: FramePlan
    frames: np.ndarray
    masks: list[dict[int, np.ndarray]]


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
    masks dropped, an image is one frame), then decode those frames and the kept masks at media resolution."""
    sample = read_sample(data_file, index)
    planned = plan_sample(sample, data_root, num_frames, mask_resize)  # the training path's own plan
    try:
        frames = planned.reader.read(planned.plan.frame_indices)
    except DataError as e:
        raise e.with_sample(sample.index, sample.id) from None
    plan = planned.plan
    masks = [{f: decode_rle(planned.rles[k][f]) for f in kept} for k, kept in enumerate(plan.object_frames)]
    return SampleView(sample, plan, frames, masks)


# --------------------------------------------------------------------------------------------- drawing


def _conversation_text(sample: Sample, width: int) -> list[str]:
    lines = []
    for turn in sample.turns:
        speaker = "USER" if turn.role == "user" else "ASSISTANT"
        for i, para in enumerate(turn.text.split("\n")):
            prefix = f"{speaker}: " if i == 0 else " " * (len(speaker) + 2)
            lines += textwrap.wrap(para, width, initial_indent=prefix, subsequent_indent=" " * (len(speaker) + 2))
    return lines or ["(no conversation)"]


def _header(view: SampleView) -> str:
    s = view.sample
    extra = "".join(f"  {k}: {s.meta[k]}" for k in ("type", "chance", "needs_region") if k in s.meta)
    return f"sample {s.index}  id {s.id}  {s.kind}  {s.media}  frames {view.plan.frame_indices}{extra}"


def _overlay(ax, mask: np.ndarray, colour: str) -> None:
    """A translucent fill and an outline of ``mask`` (bool [H, W]) in ``colour``."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*mask.shape, 4), np.float32)
    rgba[mask] = to_rgba(colour, alpha=0.3)
    ax.imshow(rgba, interpolation="nearest")
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.5)


def _draw_frames(fig, grid, view: SampleView) -> None:
    cols = min(MAX_COLUMNS, len(view.frames))
    for i, (f, frame) in enumerate(zip(view.plan.frame_indices, view.frames, strict=True)):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(frame, interpolation="nearest")
        owners = [k for k, m in enumerate(view.masks) if f in m]
        for k in owners:
            _overlay(ax, view.masks[k][f], OBJECT_COLOURS[k % len(OBJECT_COLOURS)])
        ax.set_title(f"frame {f}" + (" *" if owners else ""), fontsize=8, fontweight="bold" if owners else "normal")
        ax.set_xticks([])
        ax.set_yticks([])


def _legend(fig, view: SampleView, y: float, ncol: int) -> None:
    """One legend entry per object at figure height ``y`` (fraction), left-aligned."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=OBJECT_COLOURS[k % len(OBJECT_COLOURS)], edgecolor="black",
                     label=f"object {k} (<region> #{k + 1}): {len(m)}/{len(view.sample.objects[k])} mask frames")
               for k, m in enumerate(view.masks)]
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
    header = textwrap.wrap(_header(view), int(fig_w * 17))
    ncol = max(1, int(fig_w // 3.4))
    legend_h = 0.2 * math.ceil(len(view.masks) / ncol)
    text = _conversation_text(view.sample, width=int(fig_w * 14))
    top = 0.08 + 0.13 * len(header) + legend_h + 0.3  # header, legend, frame titles (inches)
    bottom = (len(text) + 1) * line + 0.1
    fig_h = top + rows * cell + bottom
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    grid = fig.add_gridspec(rows, cols, left=0.01, right=0.99, top=1 - top / fig_h, bottom=bottom / fig_h,
                            wspace=0.05, hspace=0.3)
    _draw_frames(fig, grid, view)
    fig.text(0.005, 1 - 0.06 / fig_h, "\n".join(header), fontsize=7, va="top")
    _legend(fig, view, 1 - (0.1 + 0.13 * len(header)) / fig_h, ncol)
    fig.text(0.005, (bottom - 0.1) / fig_h, "\n".join(text), fontsize=8, va="top", family="monospace")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refvllm show",
                                description="Render a sample's planned frames with its masks and conversation.")
    p.add_argument("data", help="JSON or JSONL file in the seed's format")
    p.add_argument("--data-root", default=None, help="folder media paths are relative to (default: DATA's folder)")
    p.add_argument("--index", type=int, required=True, help="sample position in DATA (0-based)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--num-frames", type=int, default=8, help="frame budget T of the plan (default 8)")
    p.add_argument("--mask-resize", choices=("rescale", "error"), default="rescale")
    return p


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.num_frames < 1:
        parser.error(f"--num-frames must be >= 1, got {args.num_frames}")
    root = args.data_root if args.data_root is not None else str(Path(args.data).parent)
    view = load_view(args.data, root, args.index, args.num_frames, args.mask_resize)
    print(draw(view, args.out))
    return 0
