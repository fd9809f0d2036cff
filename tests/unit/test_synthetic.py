"""The synthetic referring data: real media, exact masks, balanced answers that need the mask, determinism."""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

import av
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from refvllm import cli
from refvllm.data import synthetic
from refvllm.data.synthetic import COLOURS, DIRECTIONS, QUESTION_TYPES, SHAPES, generate, plan_sample
from refvllm.errors import ConfigError

NUM_TRAIN, NUM_EVAL = 48, 16
# pycocotools' decode trips a numpy 2 deprecation inside its Cython code; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True)
def _index_cache_in_tmp(tmp_path, monkeypatch):
    """SampleIndex caches offsets under $XDG_CACHE_HOME: keep them out of the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, NUM_TRAIN, NUM_EVAL, seed=0)
    return out


def _load(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text())


def _all(root: Path) -> list[dict]:
    return _load(root, "train") + _load(root, "eval")


def _frames(root: Path, sample: dict) -> np.ndarray:
    """uint8 [F, H, W, 3] of the sample's media, read independently of the project's readers."""
    if "image" in sample:
        return np.asarray(Image.open(root / sample["image"]).convert("RGB"))[None]
    path = root / sample["video"]
    if path.is_dir():
        return np.stack([np.asarray(Image.open(path / name)) for name in sorted(os.listdir(path))])
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _decode(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
    if isinstance(seg["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def _masks(sample: dict) -> list[dict[int, np.ndarray]]:
    """Per object: {frame: bool [64, 64]} of its non-null segmentations."""
    return [{int(f): _decode(v["segmentation"], 64, 64) for f, v in obj.items() if v["segmentation"] is not None}
            for obj in sample.get("annotation", [])]


def _centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _kind(sample: dict) -> str:
    if "annotation" not in sample:
        return "image" if "image" in sample else "video"
    if "image" in sample:
        return "image_referring"
    frames = max(len(obj) for obj in sample["annotation"])
    return "video_referring_multi" if frames > 1 else "video_referring_single"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_kind_storage_and_mask_encoding_is_present(data_dir):
    samples = _all(data_dir)
    assert {_kind(s) for s in samples} == {"video_referring_single", "video_referring_multi", "image_referring",
                                           "video", "image"}
    assert {s["type"] for s in _load(data_dir, "eval")} == set(QUESTION_TYPES)
    media = [s.get("video") or s["image"] for s in samples]
    assert any((data_dir / m).is_dir() and (data_dir / m / "00000.jpg").is_file() for m in media)
    codecs = set()
    for m in media:
        if m.endswith(".mp4"):
            with av.open(str(data_dir / m)) as c:
                codecs.add(c.streams.video[0].codec_context.name)
    assert codecs == {"h264", "mpeg4"}
    segs = [v["segmentation"] for s in samples for obj in s.get("annotation", []) for v in obj.values()]
    found = {"null" if g is None else "polygon" if isinstance(g, list) else
             "uncompressed" if isinstance(g["counts"], list) else "rle" for g in segs}
    assert found == {"null", "polygon", "uncompressed", "rle"}
    for s in samples:  # polygons need the sample's size
        if any(isinstance(v["segmentation"], list) for obj in s.get("annotation", []) for v in obj.values()):
            assert (s["height"], s["width"]) == (64, 64)


def test_records_follow_the_seed_format(data_dir):
    for s in _all(data_dir):
        qtype = QUESTION_TYPES[s["type"]]
        turns = s["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        placeholder = "<image>" if "image" in s else "<video>"
        assert turns[0]["value"].startswith(placeholder + "\n")
        assert all(placeholder not in t["value"] for t in turns[1:])
        regions = sum(t["value"].count("<region>") for t in turns)
        assert regions == len(s.get("annotation", [])) == (2 if s["type"] == "relation" else int(qtype.needs_region))
        assert turns[-1]["value"] in qtype.answers
        assert s["chance"] == pytest.approx(1 / len(qtype.answers), abs=1e-6)
        assert s["needs_region"] is qtype.needs_region
        if "image" in s and "annotation" in s:
            assert all(list(obj) == ["0"] for obj in s["annotation"])
        for obj in s.get("annotation", []):
            assert any(v["segmentation"] is not None for v in obj.values())


def test_multi_turn_dialogues_only_in_train_with_region_in_a_later_turn(tmp_path):
    planned = [plan_sample(0, "train", i) for i in range(200)]
    multi = [p for p in planned if len(p.turns) == 2]
    assert 10 <= len(multi) <= 60
    assert all("<region>" not in p.turns[0][0] and "<region>" in p.turns[1][0] for p in multi)
    assert all(len(plan_sample(0, "eval", i).turns) == 1 for i in range(100))


def test_masks_match_the_rendered_media(data_dir):
    """Decode the written media and masks independently: the mask covers the asked object, and the answer
    follows from it (colour inside the mask, centroid travel, left/right order, fill ratio of the shape)."""
    fill = {"square": 1.0, "circle": 0.78, "triangle": 0.52}
    checked = collections.Counter()
    for s in _all(data_dir):
        answer, frames, masks = s["conversations"][-1]["value"], _frames(data_dir, s), _masks(s)
        assert frames.shape[1:] == (64, 64, 3)
        for obj in masks:
            assert all(0 <= f < len(frames) and m.any() for f, m in obj.items())
        if s["type"] in ("colour", "image_colour"):
            for f, m in masks[0].items():
                mean = frames[f][m].mean(axis=0)
                assert min(COLOURS, key=lambda c: np.abs(np.subtract(COLOURS[c], mean)).sum()) == answer
        elif s["type"] == "motion":
            first, last = min(masks[0]), max(masks[0])
            (x0, y0), (x1, y1) = _centre(masks[0][first]), _centre(masks[0][last])
            dx, dy = DIRECTIONS[answer]
            along, across = (x1 - x0) * dx + (y1 - y0) * dy, abs((x1 - x0) * dy) + abs((y1 - y0) * dx)
            assert along >= 12 and across < along / 2
        elif s["type"] == "relation":
            (xa, _), (xb, _) = (_centre(next(iter(obj.values()))) for obj in masks)
            assert (xa < xb) == (answer == "yes") and abs(xa - xb) >= 12
        elif s["type"] in ("shape", "image_shape"):
            m = next(iter(masks[0].values()))
            ys, xs = np.nonzero(m)
            assert m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)) == pytest.approx(fill[answer], abs=0.04)
        checked[s["type"]] += 1
    assert set(checked) == set(QUESTION_TYPES)


def test_answers_are_balanced_and_not_predictable_from_the_question():
    for split in ("train", "eval"):
        planned = [plan_sample(0, split, i) for i in range(400)]
        by_type = collections.defaultdict(list)
        for p in planned:
            by_type[p.qtype.name].append(p)
        for name, items in by_type.items():
            answers = collections.Counter(p.turns[-1][1] for p in items)
            assert set(answers) == set(QUESTION_TYPES[name].answers)
            assert max(answers.values()) - min(answers.values()) <= 1, (split, name, answers)
            per_question = collections.defaultdict(collections.Counter)
            for p in items:
                per_question[p.turns[-1][0].replace("<object0>", "").replace("<object1>", "")][p.turns[-1][1]] += 1
            for question, counts in per_question.items():  # every question form sees every answer
                assert len(counts) == len(QUESTION_TYPES[name].answers), (name, question, counts)


def _direction(obj) -> str:
    dx, dy = int(np.sign(obj.xs[-1] - obj.xs[0])), int(np.sign(obj.ys[-1] - obj.ys[0]))
    return next(d for d, v in DIRECTIONS.items() if v == (dx, dy))


def test_every_referring_scene_shows_all_answers_so_a_blind_guess_is_at_chance():
    """Without the mask the media cannot tell which object is meant: each scene holds every possible answer."""
    for i in range(150):
        p = plan_sample(3, "train", i)
        objects = p.scene.objects
        if p.qtype.name in ("colour", "image_colour"):
            assert sorted(o.colour for o in objects) == sorted(COLOURS)
        elif p.qtype.name in ("shape", "image_shape"):
            assert sorted(o.shape for o in objects) == sorted(SHAPES)
        elif p.qtype.name == "motion":
            assert sorted(_direction(o) for o in objects) == sorted(DIRECTIONS)
            for o in objects:  # moves over a third of the frame, objects of >= 2 x 2 patches
                assert abs(o.xs[-1] - o.xs[0]) + abs(o.ys[-1] - o.ys[0]) >= 64 / 3 and o.size >= 16
        elif p.qtype.name.endswith("count"):
            assert synthetic.COUNT_WORDS[len(objects)] == p.turns[-1][1]


def test_same_seed_same_bytes_and_prefix_stable(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, 8, 8, seed=5)
    generate(b, 8, 8, seed=5)
    assert _tree_digest(a) == _tree_digest(b)
    generate(c, 0, 4, seed=5)  # eval only; the first 4 eval samples of the larger run
    assert _load(c, "train") == [] and _load(c, "eval") == _load(a, "eval")[:4]
    d = tmp_path / "d"
    generate(d, 0, 4, seed=6)
    assert _load(d, "eval") != _load(c, "eval")


def test_uncompressed_rle_round_trips_through_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((7, 5)) < rng.random()
        seg = synthetic.encode_uncompressed_rle(mask)
        assert sum(seg["counts"]) == mask.size
        np.testing.assert_array_equal(_decode(seg, 7, 5), mask)
    mask = np.zeros((7, 5), bool)
    mask[0, 0] = True  # starts with a 1: the first (zero-length) run is 0
    assert synthetic.encode_uncompressed_rle(mask)["counts"][:2] == [0, 1]


def test_cli_writes_files_and_rejects_bad_counts(tmp_path, capsys):
    assert cli.main(["synth", str(tmp_path / "o"), "--train", "3", "--eval", "2", "--seed", "1"]) == 0
    assert "train: 3 samples" in capsys.readouterr().out
    assert len(_load(tmp_path / "o", "train")) == 3 and len(_load(tmp_path / "o", "eval")) == 2
    with pytest.raises(ConfigError, match="--train/--eval"):
        synthetic.main([str(tmp_path / "p"), "--train", "-1"])
    assert cli.main(["synth", str(tmp_path / "p"), "--num-frames", "1"]) == 1
    assert "--num-frames" in capsys.readouterr().err


def test_output_passes_the_project_validator(data_dir):
    validate = pytest.importorskip("refvllm.data.validate")
    for split in ("train", "eval"):
        assert validate.main([str(data_dir / f"{split}.json"), "--data-root", str(data_dir)]) == 0


_GENERATE_ON_CPUS = """
import os, sys
os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: int(sys.argv[2])]))
from refvllm.data.synthetic import generate
generate(sys.argv[1], 40, 0, seed=0)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs to vary the encoders' automatic thread counts")
def test_same_bytes_whatever_the_number_of_cpus(tmp_path):
    """x264 and swscale choose thread counts from the CPUs they may use (and the machine's load); the videos
    must not depend on it (they did: a busy machine wrote other bytes for the same seed)."""
    import subprocess
    import sys

    for name, cpus in (("one", 1), ("two", 2)):
        subprocess.run([sys.executable, "-c", _GENERATE_ON_CPUS, str(tmp_path / name), str(cpus)], check=True,
                       timeout=300)
    assert _tree_digest(tmp_path / "one") == _tree_digest(tmp_path / "two")


def test_same_frames_same_video_whatever_was_encoded_before(tmp_path):
    """x264's macroblock tree made the bytes of a video depend on what the process had encoded before (about
    one encode in ten differed; 400 encodes of 5 clips were needed to be sure it was gone): write_video turns
    it off. 60 encodes of 3 clips in a scrambled order must give one file per clip."""
    clips = [synthetic.render(plan_sample(0, "train", i).scene)[0] for i in (32, 23, 5)]
    order = np.random.default_rng(0).integers(len(clips), size=60)
    digests = collections.defaultdict(set)
    for j, k in enumerate(order):
        path = tmp_path / f"{j}.mp4"
        synthetic.write_video(path, clips[k], "h264")
        digests[k].add(hashlib.sha256(path.read_bytes()).hexdigest())
        path.unlink()
    assert all(len(d) == 1 for d in digests.values()), {k: len(d) for k, d in digests.items()}
