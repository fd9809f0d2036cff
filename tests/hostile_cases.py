"""The hostile samples of the issue "Hostile inputs" (and the media they refer to), shared by the unit tests of
each case and the training run over all of them (import as ``from hostile_cases import ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers_media import (
    box_polygon,
    image_sample,
    indexed_frames,
    rle,
    video_sample,
    write_frame_folder,
    write_image,
    write_video,
)

H, W = 48, 64


def write_hostile_media(root: Path) -> Path:
    """The media the cases name, under ``root``: v.mp4 (8 frames, 48x64), frames/, img.jpg, uhd.png (4K),
    odd_frames/ (holds a '²1.jpg'), twin_frames/ (frame_1.jpg and frame_01.jpg)."""
    frames = indexed_frames(8, H, W)
    write_video(root / "v.mp4", frames)
    write_frame_folder(root / "frames", frames)
    write_image(root / "img.jpg", frames[0])
    write_image(root / "uhd.png", np.zeros((2160, 3840, 3), np.uint8))
    odd = write_frame_folder(root / "odd_frames", frames[:3])
    (odd / "²1.jpg").write_bytes((odd / "frame_1.jpg").read_bytes())  # '²'.isdigit() but int('²') fails
    twins = write_frame_folder(root / "twin_frames", frames[:3])
    (twins / "frame_01.jpg").write_bytes((twins / "frame_1.jpg").read_bytes())
    return root


def box():
    return rle(np.pad(np.ones((8, 8), bool), ((4, H - 12), (4, W - 12))))


def _zigzag(height: int, width: int, points: int) -> list[list[float]]:
    """A polygon that crosses the whole frame at every point (a small file, a huge perimeter)."""
    xs = np.where(np.arange(points) % 2 == 0, 0.0, width - 1.0)
    ys = np.linspace(0, height - 1, points)
    return [np.stack([xs, ys], 1).ravel().round(1).tolist()]


def _valid():
    return video_sample("v.mp4", [{2: box()}], sample_id="ok")


def _with(**changes):
    raw = _valid()
    raw.update(changes)
    return raw


def _answer(text):
    raw = _valid()
    raw["conversations"][1]["value"] = text
    return raw


# (JSON text of one sample, expected category, words of the reason)
CASES = {
    "surrogate in an answer": (json.dumps(_answer("A dog \ud83d")), "text_encoding", "conversations[1].value"),
    "surrogate in the media path": (json.dumps(_with(video="v\udc00.mp4")), "text_encoding", "video"),
    "reserved character": (json.dumps(_answer("a \ue000 b")), "reserved_character", "U+E000"),
    "huge uncompressed RLE": (json.dumps(video_sample("v.mp4", [{2: {"size": [100000, 100000],
                                                                      "counts": [4 * 10**9, 4 * 10**9, 2 * 10**9]}}])),
                              "limit", "max_mask_pixels"),
    "huge compressed RLE size": (json.dumps(video_sample("v.mp4", [{2: {"size": [100000, 100000],
                                                                         "counts": "0"}}])),
                                 "limit", "max_mask_pixels"),
    "nested 100,000 deep": ('{"id": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "limit", "nested"),
    "5,000-digit id": ('{"id": ' + "7" * 5000 + ', "video": "v.mp4"}', "limit", "cannot decode"),
    "300-digit id": ('{"id": ' + "7" * 300 + ', "video": "v.mp4"}', "limit", "integers must fit in 64 bits"),
    "5,000-digit frame key": (json.dumps(video_sample("v.mp4", [{2: box()}])).replace('"2":', '"' + "9" * 5000
                                                                                       + '":'),
                              "frame_index", "5000 digits"),
    "5,000-digit polygon coordinate": (json.dumps(video_sample("v.mp4", [{2: box_polygon(1, 9, 1, 9)}]))
                                       .replace("9,", "9" * 5000 + ",", 1), "limit", "cannot decode"),
    "height of 10^400": (json.dumps(_with(height=1, width=1)).replace('"height": 1', '"height": 1e400'),
                         "limit", "height is inf"),
    "integer height of 10^30": (json.dumps(_with(height=10**30, width=10**30)), "limit", "64 bits"),
    "polygon reference of 2^60 pixels": (json.dumps(video_sample("v.mp4", [{2: box_polygon(1, 9, 1, 9)}],
                                                                 height=2**30, width=2**30)),
                                         "limit", "polygon reference size"),
    "frame named ²1.jpg": (json.dumps(video_sample("odd_frames", [{0: box()}])), None, None),
    "frame_1.jpg and frame_01.jpg": (json.dumps(video_sample("twin_frames", [{0: box()}])), "frame_order",
                                     "'frame_01.jpg' and 'frame_1.jpg'"),
    "polygon perimeter bomb": (json.dumps(image_sample("uhd.png", [_zigzag(2160, 3840, 10_000)])), "limit",
                               "perimeter"),
    "too many polygon points": (json.dumps(image_sample("img.jpg", [_zigzag(H, W, 100_002)])), "limit",
                                "100002 points"),
    "129 objects": (json.dumps(video_sample("v.mp4", [{2: box()}] * 129)), "limit", "max_objects=128"),
    "5,001 masks": (json.dumps(video_sample("v.mp4", [{f: box() for f in range(1000)}] * 5 + [{0: box()}])),
                    "limit", "5001 masks"),
    "media path too long for the file system": (json.dumps(_with(video="v" * 300 + ".mp4")), "media_path",
                                                "cannot be looked up"),
}


