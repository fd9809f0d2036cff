"""Tiny real media and masks for tests (import as ``from helpers_media import ...``; tests/ is on sys.path).

- :func:`write_video`: an mp4 (libx264) from frames; :func:`indexed_frames`: frames whose grey level encodes
  their index (``frame_index_of`` reads it back after lossy coding).
- :func:`write_frame_folder`, :func:`write_image`: JPEG/PNG frames and images.
- :func:`box_mask`, :func:`rle`, :func:`uncompressed_rle`, :func:`box_polygon`: masks and segmentations.
- :func:`video_sample`, :func:`image_sample`: raw samples in the seed's format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from refvllm.data.masks import encode_rle, encode_uncompressed_rle

LEVEL_STEP = 12  # grey-level step between consecutive frames of indexed_frames (robust to x264 at crf 10)


def indexed_frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [n, h, w, 3]; frame i is uniformly grey at level (i * LEVEL_STEP) % 240 + 8."""
    levels = (np.arange(num_frames) * LEVEL_STEP) % 240 + 8
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).astype(np.uint8)


def frame_index_of(frames: np.ndarray) -> list[int]:
    """Inverse of :func:`indexed_frames` for frames of videos with fewer than 240 / LEVEL_STEP = 20 frames."""
    means = frames.reshape(frames.shape[0], -1).mean(axis=1)
    return [int(round((m - 8) / LEVEL_STEP)) for m in means]


def write_video(path: str | Path, frames: np.ndarray, fps: int = 10, gop: int = 4) -> Path:
    """Write uint8 [n, h, w, 3] frames (h, w even) as an H.264 mp4 with a keyframe every ``gop`` frames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast", "crf": "10", "threads": "1", "x264-params": "mbtree=0"}  # as synthetic
        for frame in frames:
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(rgb.reformat(format="yuv420p", threads=1)):  # see synthetic.write_video
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(folder: str | Path, frames: np.ndarray, ext: str = ".jpg") -> Path:
    """Frames as ``frame_<i>.<ext>`` with unpadded numbers (so only natural ordering gets them right)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i}{ext}", quality=95)
    return folder


def write_image(path: str | Path, frame: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path, quality=95)
    return path


def box_mask(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """bool [height, width] with rows y0..y1-1 and columns x0..x1-1 set."""
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE with ``counts`` as str (as it appears in JSON)."""
    return encode_rle(mask)


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE: column-major run lengths starting with a run of zeros."""
    return encode_uncompressed_rle(mask)


def box_polygon(y0: int, y1: int, x0: int, x1: int) -> list[list[float]]:
    """A rectangle as a COCO polygon list (pixel corners)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def video_sample(media: str, objects: list[dict[int, Any]] | None = None, question: str | None = None,
                 sample_id: Any = "s", key: str = "video", **extra: Any) -> dict[str, Any]:
    """A raw sample: one <region> per object in the question; ``objects[k]`` maps frame -> segmentation."""
    objects = objects or []
    if question is None:
        question = "<video>\nWhat about " + " and ".join("<region>" for _ in objects) + "?" if objects else \
            "<video>\nWhat happens?"
    raw = {"id": sample_id, key: media,
           "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "An answer."}],
           **extra}
    if objects:
        raw["annotation"] = [{str(f): (None if s is None else {"segmentation": s}) for f, s in obj.items()}
                             for obj in objects]
    return raw


def image_sample(media: str, segmentations: list[Any] | None = None, sample_id: Any = "i",
                 **extra: Any) -> dict[str, Any]:
    """A raw image sample; ``segmentations[k]`` is object k's frame-0 segmentation."""
    segs = segmentations or []
    question = "<image>\n" + ("Describe " + " and ".join("<region>" for _ in segs) + "." if segs else "Describe it.")
    return video_sample(media, [{0: s} for s in segs], question, sample_id, key="image", **extra)
