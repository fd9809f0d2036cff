"""`refvllm show`: planned frames with mask overlays and the conversation, as a PNG; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from refvllm import cli
from refvllm.data import show
from refvllm.data.synthetic import generate
from refvllm.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True)
def _index_cache_in_tmp(tmp_path, monkeypatch):
    """SampleIndex caches offsets under $XDG_CACHE_HOME: keep them out of the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
MAGENTA = np.array([255, 0, 255])  # OBJECT_COLOURS[0]: object 0's outline


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


def test_view_holds_the_planned_frames_and_the_exact_masks(data):
    root, samples = data
    i = _index_of(samples, "motion")
    view = show.load_view(root / "eval.json", root, i, num_frames=8)
    assert view.frames.shape == (8, 64, 64, 3) and view.frames.dtype == np.uint8
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


def test_bad_index_is_a_clear_error(data, tmp_path, capsys):
    root, samples = data
    with pytest.raises(DataError, match=r"--index 8 is out of range: .* has 8 samples"):
        show.main([str(root / "eval.json"), "--data-root", str(root), "--index", "8", "--out", str(tmp_path / "a.png")])
    assert cli.main(["show", str(root / "eval.json"), "--index", "-1", "--out", str(tmp_path / "a.png")]) == 1
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
