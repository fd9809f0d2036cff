"""`refvllm show`: planned frames with mask overlays and the conversation, as a PNG; clear errors; memory bounded
by the display, not the media."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from helpers_media import box_mask, image_sample, rle, write_image
from PIL import Image

from refvllm import cli
from refvllm.data import show
from refvllm.data.masks import encode_rle
from refvllm.data.synthetic import generate
from refvllm.data.types import Turn
from refvllm.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
MAGENTA = np.array([255, 0, 255])  # OBJECT_COLOURS[0]: object 0's outline


@pytest.fixture(autouse=True)
def _index_cache_in_tmp(tmp_path, monkeypatch):
    """SampleIndex caches offsets under $XDG_CACHE_HOME: keep them out of the user's home (subprocesses too)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("show")
    generate(root, 0, 8, seed=0)  # one eval sample of each of the 8 types
    return root, json.loads((root / "eval.json").read_text())


def _index_of(samples: list[dict], qtype: str) -> int:
    return next(i for i, s in enumerate(samples) if s["type"] == qtype)


def _magenta_pixels(png: Path) -> int:
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(pixels - MAGENTA).sum(axis=-1) < 60).sum())


def _any_downsample(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Reference for show's masks: OR over the display bins (bin of source index i of n is i * d // n)."""
    rows = [np.flatnonzero(np.arange(mask.shape[0]) * h // mask.shape[0] == j)[0] for j in range(h)]
    cols = [np.flatnonzero(np.arange(mask.shape[1]) * w // mask.shape[1] == j)[0] for j in range(w)]
    return np.logical_or.reduceat(np.logical_or.reduceat(mask, rows, axis=0), cols, axis=1)


def _run_show(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refvllm", "show", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------- the view


def test_view_holds_the_planned_frames_and_the_exact_masks(data):
    root, samples = data
    i = _index_of(samples, "motion")
    view = show.load_view(root / "eval.json", root, i, num_frames=8)
    assert view.frames.shape == (8, 64, 64, 3) and view.frames.dtype == np.uint8  # small media: not resized
    assert view.media_size == (64, 64)
    assert len(view.masks) == 1
    raw = samples[i]["annotation"][0]
    kept = sorted(int(f) for f, v in raw.items() if v["segmentation"] is not None)
    assert sorted(view.masks[0]) == view.plan.object_frames[0] == kept  # 3-6 masks all fit in 8 frames
    assert set(kept) <= set(view.plan.frame_indices)
    for f, mask in view.masks[0].items():
        seg = raw[str(f)]["segmentation"]
        if isinstance(seg, dict) and isinstance(seg["counts"], str):
            expected = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
            np.testing.assert_array_equal(mask, expected)
        assert mask.shape == (64, 64) and mask.any()


def test_large_media_is_read_at_display_size(tmp_path):
    height, width = 1200, 700
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    frame = np.broadcast_to(ramp[None, :, None], (height, width, 3)).copy()
    write_image(tmp_path / "tall.png", frame)
    thin = box_mask(height, width, 100, 1100, 350, 351)  # one pixel wide: must survive the downsampling
    block = box_mask(height, width, 0, 600, 0, 700)
    (tmp_path / "d.json").write_text(json.dumps([image_sample("tall.png", [rle(thin), rle(block)])]))
    view = show.load_view(tmp_path / "d.json", tmp_path, 0)
    h, w = show.display_size(height, width)
    assert (h, w) == (512, 299) and view.media_size == (height, width)
    assert view.frames.shape == (1, h, w, 3)
    expected_frame = np.broadcast_to(np.linspace(0, 255, w)[None, :, None], (h, w, 3))
    assert np.abs(view.frames[0].astype(float) - expected_frame).max() <= 2  # box average of a ramp
    for k, mask in enumerate((thin, block)):
        np.testing.assert_array_equal(view.masks[k][0], _any_downsample(mask, h, w))
    assert view.masks[0][0].sum() > 0 and view.masks[1][0][: h // 2].all() and not view.masks[1][0][-1].any()
    out = show.draw(view, tmp_path / "tall_view.png")
    assert _magenta_pixels(out) > 20


def test_display_size_keeps_the_aspect_and_never_enlarges():
    assert show.display_size(64, 48) == (64, 48)
    assert show.display_size(8000, 8000) == (512, 512)
    assert show.display_size(1080, 1920) == (288, 512)
    assert show.display_size(1, 100_000) == (1, 512)


@pytest.mark.parametrize("shape, size", [((37, 53), (37, 53)), ((37, 53), (5, 9)), ((60, 7), (19, 1)),
                                         ((1, 40), (1, 3))])
def test_masks_are_painted_from_the_runs_with_any_coverage(shape, size, monkeypatch):
    monkeypatch.setattr(show, "RUN_CHUNK", 5)  # several chunks even for these small masks
    rng = np.random.default_rng(sum(shape) + sum(size))
    for density in (0.0, 0.02, 0.3, 0.9, 1.0):
        mask = rng.random(shape) < density
        got = show.rle_to_display(encode_rle(mask), size)
        assert got.shape == size and got.dtype == bool
        np.testing.assert_array_equal(got, _any_downsample(mask, *size))


def test_frames_are_box_averaged():
    frame = np.zeros((4, 6, 3), np.uint8)
    frame[:, :3] = 200
    frame[1, 4] = 90
    small = show._shrink_frame(frame, (2, 2))
    assert small.shape == (2, 2, 3) and small.dtype == np.uint8
    np.testing.assert_array_equal(small[..., 0], [[200, 15], [200, 0]])  # bins of 2 x 3 pixels: 90 / 6 = 15


def test_objects_beyond_the_drawing_limit_are_counted_not_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(show, "MAX_DRAWN_OBJECTS", 2)
    frame = np.full((40, 40, 3), 80, np.uint8)
    write_image(tmp_path / "im.png", frame)
    segs = [rle(box_mask(40, 40, 5 * k, 5 * k + 10, 5, 30)) for k in range(3)]
    (tmp_path / "d.json").write_text(json.dumps([image_sample("im.png", segs)]))
    view = show.load_view(tmp_path / "d.json", tmp_path, 0)
    assert len(view.masks) == 2 and len(view.plan.object_frames) == 3
    assert show._legend_entries(view) == 3
    assert show.draw(view, tmp_path / "x.png").is_file()


# --------------------------------------------------------------------------------------------- drawing


def test_cli_renders_overlays_for_referring_samples_only(data, tmp_path, capsys):
    root, samples = data
    for qtype, has_masks in (("relation", True), ("motion", True), ("image_shape", True), ("image_count", False)):
        out = tmp_path / f"{qtype}.png"
        argv = ["show", str(root / "eval.json"), "--data-root", str(root), "--index",
                str(_index_of(samples, qtype)), "--out", str(out)]
        assert cli.main(argv) == 0
        assert capsys.readouterr().out.strip() == str(out)
        image = Image.open(out)
        assert image.format == "PNG" and image.width >= 700 and image.height >= 250
        assert (_magenta_pixels(out) > 20) is has_masks, qtype


def test_data_root_defaults_to_the_data_files_folder(data, tmp_path):
    root, samples = data
    out = tmp_path / "sub" / "x.png"
    assert show.main([str(root / "eval.json"), "--index", "0", "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("text", ["a caption \ud83d cut in half", "costs $\\frac$ here", "a $x^$ b", "nul \x00"])
def test_any_text_is_drawn(data, tmp_path, text):
    """Lone surrogates (from JSON "\\ud83d") and text that is not valid mathtext must not crash drawing."""
    root, samples = data
    view = show.load_view(root / "eval.json", root, 0)
    sample = dataclasses.replace(view.sample, id="id \udc80", turns=[Turn("user", text), Turn("assistant", text)])
    out = show.draw(dataclasses.replace(view, sample=sample), tmp_path / "t.png")
    assert Image.open(out).format == "PNG"
    if "\ud83d" in text:
        assert "a caption \\ud83d cut" in show._conversation_text(sample, 80)[0]
    assert "\\udc80" in show._header(dataclasses.replace(view, sample=sample))


def test_long_text_is_cut(data):
    root, samples = data
    view = show.load_view(root / "eval.json", root, 0)
    sample = dataclasses.replace(view.sample, turns=[Turn("user", "word " * 200_000), Turn("assistant", "ok")])
    lines = show._conversation_text(sample, 100)
    assert len(lines) == show.MAX_TEXT_LINES and "more lines not shown" in lines[-1]


# --------------------------------------------------------------------------------------------- errors


def test_bad_index_is_a_clear_error(data, tmp_path, capsys):
    root, samples = data
    with pytest.raises(DataError, match=r"--index 8 is out of range: .* has 8 samples"):
        show.main([str(root / "eval.json"), "--data-root", str(root), "--index", "8", "--out", str(tmp_path / "a.png")])
    assert cli.main(["show", str(root / "eval.json"), "--index", "8", "--out", str(tmp_path / "a.png")]) == 1
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        show.main([str(root / "eval.json"), "--index", "0", "--out", str(tmp_path / "a.png"), "--num-frames", "0"])
    assert e.value.code == 2


def test_bad_sample_names_the_sample(data, tmp_path, capsys):
    root, samples = data
    broken = dict(samples[_index_of(samples, "shape")], id="broken", video="videos/missing.mp4")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([samples[0], broken]))
    out = tmp_path / "b.png"
    assert cli.main(["show", str(path), "--data-root", str(root), "--index", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "sample 1" in err and "broken" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case, expected", [
    ("folder", "is a folder"),
    ("not_png", "must be a .png file"),
    ("under_a_file", "is not a folder"),
    ("negative_index", "--index must be >= 0"),
])
def test_usage_errors_exit_2_with_one_line(data, tmp_path, case, expected):
    root, samples = data
    (tmp_path / "a_file").write_text("x")
    out, index = {"folder": (tmp_path, "0"), "not_png": (tmp_path / "x.jpg", "0"),
                  "under_a_file": (tmp_path / "a_file" / "sub" / "x.png", "0"),
                  "negative_index": (tmp_path / "x.png", "-1")}[case]
    proc = _run_show(str(root / "eval.json"), "--index", index, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.jpg").exists()


def test_unwritable_out_folder_is_a_usage_error_before_any_work(data, tmp_path, monkeypatch, capsys):
    root, samples = data
    monkeypatch.setattr(show.os, "access", lambda path, mode: False)  # as root, chmod would not stop us
    monkeypatch.setattr(show, "load_view", lambda *a, **k: pytest.fail("the work started"))
    with pytest.raises(SystemExit) as e:
        show.main([str(root / "eval.json"), "--index", "0", "--out", str(tmp_path / "new" / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write in" in err and str(tmp_path) in err
    assert not (tmp_path / "new").exists()


def test_out_checks_accept_new_folders_and_existing_files(tmp_path):
    assert show.out_problem(str(tmp_path / "a" / "b" / "x.png")) is None
    (tmp_path / "x.PNG").write_bytes(b"")
    assert show.out_problem(str(tmp_path / "x.PNG")) is None
    assert "NUL" in show.out_problem("x\0.png")
    (tmp_path / "new\nline").write_text("a file")
    problem = show.out_problem(str(tmp_path / "new\nline" / "x.png"))
    assert "is not a folder" in problem and "\n" not in problem  # one line: paths are quoted with repr


# --------------------------------------------------------------------------------------------- memory


PEAK_RSS_BOUND = 1.5 * 2**30  # bytes, python and its imports included; before the display-size fix: 13 GB


@pytest.mark.slow
def test_an_8000_pixel_image_is_shown_in_bounded_memory(tmp_path):
    n = 8000
    ramp = np.linspace(0, 255, n).astype(np.uint8)  # smooth: a small JPEG, quick to write
    pixels = np.empty((n, n, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = ramp[None, :], ramp[:, None], 128
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=85)
    del pixels
    segs = [encode_rle(box_mask(n, n, 2000 * k, 2000 * k + 2500, 1000 + 1500 * k, 3000 + 1500 * k))
            for k in range(3)]
    (tmp_path / "big.json").write_text(json.dumps([image_sample("big.jpg", segs)]))
    out = tmp_path / "big.png"
    # A fresh wrapper process whose only child is the show run: RUSAGE_CHILDREN is then that run's peak
    # (the test process itself may have waited for larger children).
    wrapper = ("import resource, subprocess, sys; "
               "rc = subprocess.run([sys.executable, '-m', 'refvllm', *sys.argv[1:]]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    proc = subprocess.run([sys.executable, "-c", wrapper, "show", str(tmp_path / "big.json"), "--index", "0",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    peak_kib, rc = (int(v) for v in proc.stdout.split()[-2:])
    assert rc == 0, proc.stderr
    assert peak_kib * 1024 < PEAK_RSS_BOUND, f"peak RSS {peak_kib / 2**20:.2f} GiB"
    assert Image.open(out).format == "PNG" and _magenta_pixels(out) > 20
