"""The synthetic referring data set: real media, exact masks, and questions only the masks can answer.

Contract:
    files = generate("runs/demo/data", num_train=600, num_eval=120, seed=0)
    files.train_file, files.eval_file          # OUT/train.json, OUT/eval.json (seed format, JSON arrays)

    refvllm synth OUT [--train N] [--eval M] [--seed S] [--num-frames F]

What is written under OUT (all paths in the JSON are relative to OUT, the data root):
    videos/<split>-<index>.mp4       64 x 64, ``num_frames`` frames at 8 fps, h264 (most) or mpeg4
    frames/<split>-<index>/00000.jpg ...   some videos as a folder of JPEG frames
    images/<split>-<index>.jpg       64 x 64 JPEG images
    train.json, eval.json            one sample per line inside a JSON array

Every sample is the seed's (VideoRefer) format plus three top-level keys the evaluator reads: ``type`` (one of
:data:`QUESTION_TYPES`), ``chance`` (1 / number of possible answers of that type) and ``needs_region``. The
scored question is the last human turn and its answer the last gpt turn (one lowercase word); eval samples
are single-turn, some train samples are two-turn with ``<region>`` in the second human turn.

Why a region-blind model is at chance: every referring scene shows *all* possible answers at once (4 objects
in the 4 colours for ``colour``, 3 objects in the 3 shapes for ``shape``, 4 objects moving in the 4 directions
for ``motion``), and the answer of each type cycles through a fresh permutation of its answers, so neither the
question text nor the video without the mask tells which answer is meant.

Determinism: sample ``index`` of a split depends only on (seed, split, index): the same seed writes the same
bytes, and the first N samples of a larger run are the samples of a run with N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from refvllm.data.masks import encode_rle, encode_uncompressed_rle
from refvllm.errors import ConfigError
from refvllm.fileio import atomic_write_text

FRAME_SIZE = 64  # media height = width (px); the tiny vision tower's input size, so no resampling blur
GRID = 8  # static objects sit on this pixel grid: whole 8 x 8 patches for the tiny vision tower
NUM_FRAMES = 16
FPS = 8

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 195, 60),
    "blue": (45, 85, 235),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class QuestionType:
    """One kind of scored question: its sample kind, possible answers and question templates."""

    name: str
    kind: str  # one of constants.SAMPLE_KINDS
    answers: tuple[str, ...]
    needs_region: bool  # the answer depends on which object the mask names
    templates: tuple[str, ...]  # "{r}" / "{a}", "{b}" are region references

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess; answers are balanced, so also of any constant answer."""
        return 1.0 / len(self.answers)


_COLOUR_Q = ("What colour is {r}?", "What is the color of {r}?")
_SHAPE_Q = ("What shape is {r}?", "What is the shape of {r}?")
QUESTION_TYPES: dict[str, QuestionType] = {
    q.name: q
    for q in (
        QuestionType("colour", "video_referring", tuple(COLOURS), True, _COLOUR_Q),
        QuestionType("shape", "video_referring", SHAPES, True, _SHAPE_Q),
        QuestionType(
            "motion", "video_referring", tuple(DIRECTIONS), True,
            ("Which direction does {r} move?", "In which direction is {r} moving?"),
        ),
        QuestionType("relation", "video_referring", ("yes", "no"), True, ("Is {a} to the left of {b}?",)),
        QuestionType("image_colour", "image_referring", tuple(COLOURS), True, _COLOUR_Q),
        QuestionType("image_shape", "image_referring", SHAPES, True, _SHAPE_Q),
        QuestionType(
            "video_count", "video", tuple(COUNT_WORDS.values()), False, ("How many objects are in the video?",)
        ),
        QuestionType(
            "image_count", "image", tuple(COUNT_WORDS.values()), False, ("How many objects are in the image?",)
        ),
    )
}

# Relative frequency of each type in a block of samples (blocks are shuffled). Train leans on the types that are
# harder to learn; eval is uniform so that every type gets the same number of scored questions.
TRAIN_MIX = {"colour": 2, "shape": 3, "motion": 3, "relation": 3, "image_colour": 1, "image_shape": 2,
             "video_count": 1, "image_count": 1}
EVAL_MIX = dict.fromkeys(QUESTION_TYPES, 1)
_MIXES = {"train": TRAIN_MIX, "eval": EVAL_MIX}

# How video samples are stored, cycled per type so that the first video of every type is a frame folder.
_VIDEO_STORAGE = ("frames", "h264", "h264", "mpeg4", "h264", "h264", "h264", "mpeg4", "h264", "h264")
_MASK_FORMATS = ("rle", "rle", "rle", "uncompressed", "polygon")
MULTI_TURN_PROB = 0.15  # train only: a count question first, the referring question second
OBJECT_TAG_PROB = 0.25  # write "<objectN><region>" (benchmark style) instead of "<region>"
NULL_FRAME_PROB = 0.3  # motion: hide the target in one middle annotated frame (annotation null)


@dataclass(frozen=True)
class SynthFiles:
    """What :func:`generate` wrote. Media paths inside the JSON files are relative to ``data_root``."""

    data_root: Path
    train_file: Path
    eval_file: Path
    counts: dict[str, dict[str, int]]  # split -> type -> number of samples


@dataclass
class SceneObject:
    """One drawn object. ``xs``/``ys``: int [F] top-left corner per frame; ``visible``: bool [F]."""

    shape: str
    colour: str
    size: int
    xs: np.ndarray
    ys: np.ndarray
    visible: np.ndarray


@dataclass
class Scene:
    """Objects drawn in list order (later ones on top) over ``background`` (uint8 [H, W, 3])."""

    objects: list[SceneObject]
    background: np.ndarray

    @property
    def num_frames(self) -> int:
        return len(self.objects[0].xs)


@dataclass
class PlannedSample:
    """A sample before its media is written: scene, conversation and which (object, frames) are annotated."""

    id: str
    qtype: QuestionType
    scene: Scene
    turns: list[tuple[str, str]]  # (human, gpt); the first human turn carries no media placeholder yet
    targets: list[tuple[int, list[int]]] = field(default_factory=list)  # (object index, annotated frames)
    storage: str = "image"  # image | frames | h264 | mpeg4
    mask_format: str = "rle"  # rle | uncompressed | polygon (per segmentation, falls back to rle, see below)


# --------------------------------------------------------------------------------------------- shapes, render


def shape_polygon(shape: str, x: float, y: float, size: int) -> list[float]:
    """Flat [x1, y1, x2, y2, ...] outline of ``shape`` in the box (x, y, size), pixel-corner coordinates."""
    if shape == "square":
        pts = [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
    elif shape == "triangle":
        pts = [(x + size / 2, y), (x + size, y + size), (x, y + size)]
    elif shape == "circle":
        c, r = size / 2, size / 2
        pts = [(x + c + r * math.cos(2 * math.pi * k / 32), y + c + r * math.sin(2 * math.pi * k / 32))
               for k in range(32)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [round(float(v), 2) for p in pts for v in p]


def rasterize_polygon(poly: list[float], height: int, width: int) -> np.ndarray:
    """bool [height, width]: the pixels pycocotools assigns to ``poly``, so a polygon annotation decodes exactly."""
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
    return mask_utils.decode(rle).astype(bool)


@lru_cache(maxsize=64)
def _shape_stamp(shape: str, size: int) -> np.ndarray:
    """bool [size, size]: the shape rasterised at the origin, pasted at integer offsets when rendering."""
    stamp = rasterize_polygon(shape_polygon(shape, 0, 0, size), size, size)
    stamp.flags.writeable = False
    return stamp


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Draw every frame. Returns (frames uint8 [F, H, W, 3], ids int8 [F, H, W]).

    ``ids[f, y, x]`` is the index of the object visible at that pixel (-1 for background), so the mask of object
    k in frame f is exactly ``ids[f] == k``: occlusion is taken into account.
    """
    h, w, _ = scene.background.shape
    frames = np.repeat(scene.background[None], scene.num_frames, axis=0)
    ids = np.full((scene.num_frames, h, w), -1, dtype=np.int8)
    for k, obj in enumerate(scene.objects):
        stamp = _shape_stamp(obj.shape, obj.size)
        for f in np.flatnonzero(obj.visible):
            x, y, s = int(obj.xs[f]), int(obj.ys[f]), obj.size
            frames[f, y:y + s, x:x + s][stamp] = COLOURS[obj.colour]
            ids[f, y:y + s, x:x + s][stamp] = k
    return frames, ids


# --------------------------------------------------------------------------------------------- mask encodings


def encode_segmentation(mask: np.ndarray, fmt: str, obj: SceneObject, frame: int) -> Any:
    """The segmentation of one visible mask in ``fmt``; None when the object is not visible at all.

    A polygon is written only where it decodes to exactly ``mask`` (the whole shape is visible); an occluded
    object falls back to compressed RLE, so every written mask is the exact rendered one.
    """
    if not mask.any():
        return None
    if fmt == "uncompressed":
        return encode_uncompressed_rle(mask)
    if fmt == "polygon":
        poly = shape_polygon(obj.shape, int(obj.xs[frame]), int(obj.ys[frame]), obj.size)
        if np.array_equal(rasterize_polygon(poly, *mask.shape), mask):
            return [poly]
    return encode_rle(mask)


# --------------------------------------------------------------------------------------------- scene layout


def _background(rng: np.random.Generator) -> np.ndarray:
    """A dark grey background with light static noise (uint8 [H, W, 3])."""
    level = rng.integers(25, 70)
    noise = rng.normal(0.0, 3.0, size=(FRAME_SIZE, FRAME_SIZE, 1))
    return np.clip(level + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)


def _place_static(rng: np.random.Generator, sizes: list[int]) -> list[tuple[int, int]]:
    """Top-left corners on the GRID for boxes of ``sizes`` that do not overlap (they may touch)."""
    boxes: list[tuple[int, int, int]] = []
    for s in sizes:
        free = [(x, y) for x in range(0, FRAME_SIZE - s + 1, GRID) for y in range(0, FRAME_SIZE - s + 1, GRID)
                if all(x + s <= bx or bx + bs <= x or y + s <= by or by + bs <= y for bx, by, bs in boxes)]
        if not free:  # cannot happen for <= 4 boxes of <= 24 px in 64 px, kept as a guard
            raise RuntimeError(f"no room for boxes {sizes}")
        x, y = free[rng.integers(len(free))]
        boxes.append((x, y, s))
    return [(x, y) for x, y, _ in boxes]


def _static_objects(rng, shapes, colours, sizes, num_frames) -> list[SceneObject]:
    corners = _place_static(rng, list(sizes))
    return [
        SceneObject(shape, colour, s, np.full(num_frames, x), np.full(num_frames, y), np.ones(num_frames, bool))
        for shape, colour, s, (x, y) in zip(shapes, colours, sizes, corners, strict=True)
    ]


def _moving_object(rng, shape: str, colour: str, direction: str, num_frames: int, size: int = 16) -> SceneObject:
    """An object crossing 24-32 px (over 1/3 of the frame) in ``direction`` at constant speed."""
    dx, dy = DIRECTIONS[direction]
    travel = int(rng.integers(24, 33))
    span = FRAME_SIZE - size  # top-left corners lie in [0, span]
    along = int(rng.integers(0, span - travel + 1))  # start of the travelled segment on the motion axis
    across = int(rng.integers(0, span + 1))
    t = np.linspace(0.0, 1.0, num_frames)
    start = along if (dx + dy) > 0 else along + travel
    path = np.round(start + (dx + dy) * travel * t).astype(int)
    xs, ys = (path, np.full(num_frames, across)) if dx else (np.full(num_frames, across), path)
    return SceneObject(shape, colour, size, xs, ys, np.ones(num_frames, bool))


def _random_shapes(rng, n: int) -> list[str]:
    return [SHAPES[i] for i in rng.integers(0, len(SHAPES), n)]


def _sizes(rng, n: int) -> list[int]:
    """Object sides: 16 or 24 px (2 x 2 or 3 x 3 patches)."""
    return [int(s) for s in rng.choice([16, 24], n)]


def _spread_frames(rng, num_frames: int, k: int) -> list[int]:
    """k sorted distinct frames including one in the first and one in the last quarter (motion is visible)."""
    q = max(1, num_frames // 4)
    first, last = int(rng.integers(0, q)), int(rng.integers(num_frames - q, num_frames))
    middle = [f for f in range(first + 1, last)]
    chosen = rng.choice(middle, size=min(k - 2, len(middle)), replace=False).tolist() if k > 2 else []
    return sorted({first, last, *map(int, chosen)})


def _visible_fraction(objects: list[SceneObject], k: int) -> np.ndarray:
    """float [F]: the part of object k's shape that is not occluded, per frame."""
    _, ids = render(Scene(objects, np.zeros((FRAME_SIZE, FRAME_SIZE, 3), np.uint8)))
    return (ids == k).sum(axis=(1, 2)) / _shape_stamp(objects[k].shape, objects[k].size).sum()


def _moving_scene(rng, attribute: str, answer: str, num_frames: int, num_masks: tuple[int, int]):
    """Four moving objects in the four colours; the target is the one whose ``attribute`` (colour | motion) is
    ``answer``. Directions are a permutation for ``motion`` (a blind guess is at chance), random otherwise.
    Drawn again until the target is at least half visible in every annotated frame (occlusion is allowed)."""
    while True:
        colours = list(rng.permutation(list(COLOURS)))
        dirs = list(rng.permutation(list(DIRECTIONS)) if attribute == "motion" else rng.choice(list(DIRECTIONS), 4))
        objects = [_moving_object(rng, s, c, d, num_frames) for s, c, d in
                   zip(_random_shapes(rng, 4), colours, dirs, strict=True)]
        target = (dirs if attribute == "motion" else colours).index(answer)
        frames = _spread_frames(rng, num_frames, int(rng.integers(num_masks[0], num_masks[1] + 1)))
        if (_visible_fraction(objects, target)[frames] >= 0.5).all():
            return objects, [(target, frames)]


# --------------------------------------------------------------------------------------------- question plans
# Each planner gets the answer (balanced by the caller) and returns (objects in drawing order, targets), a target
# being (object index, annotated frames) in <region> order.


def _plan_colour(rng, answer: str, num_frames: int, moving: bool | None = None):
    """Four objects in the four colours, static (one mask frame) or moving (2-4 mask frames)."""
    if moving is None:
        moving = bool(rng.random() < 0.5)
    if moving:
        return _moving_scene(rng, "colour", answer, num_frames, (2, 4))
    colours = list(rng.permutation(list(COLOURS)))
    objects = _static_objects(rng, _random_shapes(rng, 4), colours, _sizes(rng, 4), num_frames)
    return objects, [(colours.index(answer), [int(rng.integers(0, num_frames))])]


def _plan_shape(rng, answer: str, num_frames: int):
    """Three static 24 px objects, one of each shape, in distinct colours; one mask frame."""
    shapes = list(rng.permutation(list(SHAPES)))
    colours = list(rng.choice(list(COLOURS), len(shapes), replace=False))
    objects = _static_objects(rng, shapes, colours, [24] * len(shapes), num_frames)
    return objects, [(shapes.index(answer), [int(rng.integers(0, num_frames))])]


def _plan_motion(rng, answer: str, num_frames: int):
    """Four objects moving in the four directions, 3-6 mask frames; sometimes the target vanishes in one."""
    objects, [(target, frames)] = _moving_scene(rng, "motion", answer, num_frames, (3, 6))
    if len(frames) > 2 and rng.random() < NULL_FRAME_PROB:
        objects[target].visible[frames[int(rng.integers(1, len(frames) - 1))]] = False
    return objects, [(target, frames)]


def _plan_relation(rng, answer: str, num_frames: int):
    """Two referred objects whose centres are >= 16 px apart horizontally, plus at most one distractor."""
    n = 2 + int(rng.random() < 0.5)
    while True:
        sizes = _sizes(rng, n)
        objects = _static_objects(rng, _random_shapes(rng, n), list(rng.choice(list(COLOURS), n, replace=False)),
                                  sizes, num_frames)
        cx = [o.xs[0] + o.size / 2 for o in objects]
        if abs(cx[0] - cx[1]) >= 16:
            break
    left, right = (0, 1) if cx[0] < cx[1] else (1, 0)
    a, b = (left, right) if answer == "yes" else (right, left)
    frame = int(rng.integers(0, num_frames))
    return objects, [(a, [frame]), (b, [frame])]


def _plan_count(rng, answer: str, num_frames: int):
    """2-4 static objects in distinct colours; nothing annotated."""
    n = next(k for k, word in COUNT_WORDS.items() if word == answer)
    colours = list(rng.choice(list(COLOURS), n, replace=False))
    return _static_objects(rng, _random_shapes(rng, n), colours, _sizes(rng, n), num_frames), []


_PLANNERS = {
    "colour": _plan_colour, "shape": _plan_shape, "motion": _plan_motion, "relation": _plan_relation,
    "image_colour": lambda rng, a, f: _plan_colour(rng, a, f, moving=False), "image_shape": _plan_shape,
    "video_count": _plan_count, "image_count": _plan_count,
}


# --------------------------------------------------------------------------------------------- sample plan


def _rng(seed: int, split: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), *keys])


def _block(seed: int, split: str, block: int) -> list[str]:
    """The shuffled list of types of block ``block`` (one block = each type repeated by its mix weight)."""
    types = [name for name, weight in _MIXES[split].items() for _ in range(weight)]
    return [types[i] for i in _rng(seed, split, 1, block).permutation(len(types))]


def _type_and_occurrence(seed: int, split: str, index: int) -> tuple[str, int]:
    """Type of sample ``index`` and how many samples of that type come before it in the split."""
    mix = _MIXES[split]
    block_len = sum(mix.values())
    block, pos = divmod(index, block_len)
    types = _block(seed, split, block)
    name = types[pos]
    return name, block * mix[name] + types[:pos].count(name)


def _balanced_answer(seed: int, split: str, qtype: QuestionType, occurrence: int) -> str:
    """Answers of a type run through a fresh random permutation every len(answers) occurrences: exact balance."""
    cycle, pos = divmod(occurrence, len(qtype.answers))
    perm = _rng(seed, split, 2, list(QUESTION_TYPES).index(qtype.name), cycle).permutation(len(qtype.answers))
    return qtype.answers[perm[pos]]


def _region_refs(rng, n: int) -> list[str]:
    if rng.random() < OBJECT_TAG_PROB:
        return [f"<object{k}><region>" for k in range(n)]
    return ["<region>"] * n


def plan_sample(seed: int, split: str, index: int, num_frames: int = NUM_FRAMES) -> PlannedSample:
    """Sample ``index`` of ``split``: scene, conversation and annotated objects (no media written)."""
    name, occurrence = _type_and_occurrence(seed, split, index)
    qtype = QUESTION_TYPES[name]
    answer = _balanced_answer(seed, split, qtype, occurrence)
    rng = _rng(seed, split, 3, index)
    is_image = qtype.kind in ("image", "image_referring")
    frames = 1 if is_image else num_frames
    objects, targets = _PLANNERS[name](rng, answer, frames)
    refs = _region_refs(rng, len(targets)) or [""]  # count questions have no region
    template = qtype.templates[int(rng.integers(len(qtype.templates)))]
    question = template.format(r=refs[0], a=refs[0], b=refs[-1])
    turns = [(question, answer)]
    if split == "train" and qtype.needs_region and rng.random() < MULTI_TURN_PROB:
        medium = "image" if is_image else "video"
        turns.insert(0, (f"How many objects are in the {medium}?", COUNT_WORDS[len(objects)]))
    storage = "image" if is_image else _VIDEO_STORAGE[occurrence % len(_VIDEO_STORAGE)]
    return PlannedSample(
        id=f"{split}-{index:05d}", qtype=qtype, scene=Scene(objects, _background(rng)), turns=turns,
        targets=targets, storage=storage, mask_format=_MASK_FORMATS[int(rng.integers(len(_MASK_FORMATS)))],
    )


# --------------------------------------------------------------------------------------------- media + record


def write_video(path: Path, frames: np.ndarray, codec: str) -> None:
    """Encode uint8 [F, H, W, 3] frames as an mp4 (``codec`` h264 or mpeg4), near-lossless, single-threaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        if codec == "h264":
            # Bit-for-bit the same video for the same seed, whatever the machine and the process's history:
            # "threads" 1 (codec_context.thread_count alone left x264 choosing by the CPU count) and no
            # macroblock tree (mbtree=0): with it, x264 wrote other bytes for the same frames in about one
            # encode in ten, depending on what the process had encoded before (seen in one loop of 400
            # encodes; no other setting tried made it deterministic).
            stream = container.add_stream("libx264", rate=FPS, options={
                "crf": "10", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"})
        else:
            stream = container.add_stream("mpeg4", rate=FPS, options={"qscale": "2"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1  # deterministic bitstream
        for frame in frames:
            # The RGB -> YUV conversion is ours, single-threaded: left to encode(), swscale picks its thread
            # count itself (PyAV's default is "auto"), and two runs of the same seed wrote different videos
            # when the machine was busy.
            yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p", threads=1)
            container.mux(stream.encode(yuv))
        container.mux(stream.encode(None))


def _write_jpeg(path: Path, frame: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path, quality=95, subsampling=0)  # 4:4:4 keeps the colours of small shapes


def write_media(planned: PlannedSample, frames: np.ndarray, out_dir: Path) -> tuple[str, str]:
    """Write the sample's media; returns (JSON key "video" | "image", path relative to ``out_dir``)."""
    if planned.storage == "image":
        rel = f"images/{planned.id}.jpg"
        _write_jpeg(out_dir / rel, frames[0])
        return "image", rel
    if planned.storage == "frames":
        rel = f"frames/{planned.id}"
        for f, frame in enumerate(frames):
            _write_jpeg(out_dir / rel / f"{f:05d}.jpg", frame)
        return "video", rel
    rel = f"videos/{planned.id}.mp4"
    write_video(out_dir / rel, frames, planned.storage)
    return "video", rel


def _annotation(planned: PlannedSample, ids: np.ndarray) -> list[dict[str, Any]]:
    annotation = []
    for k, frames in planned.targets:
        obj = planned.scene.objects[k]
        entry = {}
        for f in frames:
            seg = encode_segmentation(ids[f] == k, planned.mask_format, obj, f)
            entry[str(f)] = {"segmentation": seg}
        annotation.append(entry)
    return annotation


def build_record(planned: PlannedSample, out_dir: Path) -> dict[str, Any]:
    """Render, write the media and return the sample's JSON record."""
    frames, ids = render(planned.scene)
    media_key, rel = write_media(planned, frames, out_dir)
    placeholder = "<image>" if media_key == "image" else "<video>"
    conversations = []
    for t, (human, gpt) in enumerate(planned.turns):
        conversations.append({"from": "human", "value": f"{placeholder}\n{human}" if t == 0 else human})
        conversations.append({"from": "gpt", "value": gpt})
    record: dict[str, Any] = {"id": planned.id, media_key: rel, "conversations": conversations}
    if planned.targets:
        record["annotation"] = _annotation(planned, ids)
        if any(isinstance(v["segmentation"], list) for e in record["annotation"] for v in e.values()):
            record["height"], record["width"] = int(ids.shape[1]), int(ids.shape[2])
    qtype = planned.qtype
    record.update(type=qtype.name, chance=round(qtype.chance, 6), needs_region=qtype.needs_region)
    return record


def _check_region_count(record: dict[str, Any]) -> None:
    """Guard against a template/target mismatch: the k-th <region> must be the k-th annotation entry."""
    n = sum(turn["value"].count("<region>") for turn in record["conversations"])
    if n != len(record.get("annotation", [])):
        raise AssertionError(f"{record['id']}: {n} <region> vs {len(record.get('annotation', []))} objects")


def _write_json_array(path: Path, records: list[dict[str, Any]]) -> None:
    """A JSON array with one sample per line, written to a temporary file and renamed (never half-written)."""
    atomic_write_text(path, "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in records) + "\n]\n")


def generate(out_dir: str | os.PathLike, num_train: int = 600, num_eval: int = 120, seed: int = 0,
             num_frames: int = NUM_FRAMES) -> SynthFiles:
    """Write media and ``train.json``/``eval.json`` under ``out_dir``; deterministic for ``seed``."""
    if num_train < 0 or num_eval < 0:
        raise ConfigError(f"--train/--eval must be >= 0, got {num_train}/{num_eval}")
    if num_frames < 2:
        raise ConfigError(f"--num-frames must be >= 2 (motion needs several frames), got {num_frames}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split, n in (("train", num_train), ("eval", num_eval)):
        records = []
        for i in range(n):
            record = build_record(plan_sample(seed, split, i, num_frames), out)
            _check_region_count(record)
            records.append(record)
        _write_json_array(out / f"{split}.json", records)
        counts[split] = dict(Counter(r["type"] for r in records))
    return SynthFiles(out, out / "train.json", out / "eval.json", counts)


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refvllm synth", description="Write the synthetic referring data set.")
    p.add_argument("out", help="output folder (data root): media, train.json, eval.json")
    p.add_argument("--train", type=int, default=600, help="number of training samples (default 600)")
    p.add_argument("--eval", type=int, default=120, help="number of evaluation samples (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=NUM_FRAMES, help=f"frames per video (default {NUM_FRAMES})")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    files = generate(args.out, args.train, args.eval, args.seed, args.num_frames)
    for split in SPLITS:
        per_type = ", ".join(f"{t}={c}" for t, c in sorted(files.counts[split].items()))
        print(f"{split}: {sum(files.counts[split].values())} samples ({per_type or 'none'})")
    print(f"wrote {files.train_file} and {files.eval_file} in {time.perf_counter() - start:.1f}s")
    return 0
