"""Hostile inputs: every malformed sample is a DataError of a specific category (never another exception, never a
native crash), within the per-sample limits; plus a property test over raw JSON text.

The cases are those a 700K-sample file assembled from many sources holds (issue "Hostile inputs").
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers_media import box_polygon, image_sample, video_sample
from hostile_cases import CASES, H, W, box, write_hostile_media
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from refvllm.data.decode import decode_sample
from refvllm.data.index import decode_sample_json
from refvllm.data.limits import DataLimits
from refvllm.data.processor import Processor
from refvllm.data.schema import parse_sample
from refvllm.data.validate import Settings, check_sample
from refvllm.errors import DataError
from refvllm.layout import TokenLayout, VisualSpec
from refvllm.model.tiny import train_tokenizer

S = 16
SPEC = VisualSpec(image_size=S, patch_size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
LAYOUT = TokenLayout(grid=4, spatial_pool=2, temporal_pool=1, region_max_tokens=4, region_merge="merge")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_hostile_media(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def processor():
    return Processor(train_tokenizer(), LAYOUT, SPEC, max_length=4096, num_frames=4, mask_resize="rescale")


def _check(text: str, root: Path, processor=None, limits: DataLimits | None = None) -> dict:
    """The validate row of a one-sample JSONL file holding ``text``."""
    from refvllm.data.index import SampleIndex

    path = root / "one.jsonl"
    path.write_text(text + "\n", encoding="utf-8", errors="surrogatepass")
    limits = limits or DataLimits()
    settings_ = Settings(str(root), 4, S, "rescale", limits)
    return check_sample(SampleIndex(path, cache_dir=root / "cache", limits=limits), 0, settings_, processor)


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_case_is_a_specific_data_error(root, processor, name):
    text, category, words = CASES[name]
    row = _check(text, root, processor)
    if category is None:  # accepted (and decoded correctly)
        assert row["ok"], row["error"]
        return
    assert not row["ok"] and row["category"] == category, row["error"]
    assert words in row["error"]


def test_polygon_limits_admit_real_outlines(root):
    """A detailed outline (2,000 points around an ellipse of a 4K frame) is well inside the limits."""
    t = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    outline = np.stack([1920 + 1500 * np.cos(t), 1080 + 900 * np.sin(t)], 1).ravel().round(1).tolist()
    row = _check(json.dumps(image_sample("uhd.png", [[outline]])), root)
    assert row["ok"], row["error"]


def test_media_pixel_limit(root):
    row = _check(json.dumps(image_sample("uhd.png", [box_polygon(1, 9, 1, 9)])), root,
                 limits=DataLimits(max_media_pixels=1920 * 1080))
    assert row["category"] == "limit" and "2160x3840" in row["error"]


# ---------------------------------------------------------------------------------------------- property test

HOSTILE_TEXT = st.sampled_from(["\ud83d", "\udfff", "<|im_end|>\n<|im_start|>user\n", "<region>", "<video>",
                                "\ue000", "\x00", "../", "²", "9" * 30, "", " ", "\n"])
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), HOSTILE_TEXT,
    st.sampled_from(["human", "gpt", "v.mp4", "img.jpg", "frames", "odd_frames", "0", "2", "segmentation",
                     "size", "counts", "PP0"]),
)
VALUES = st.recursive(LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6) | HOSTILE_TEXT,
                                                                                    c, max_size=3),
                      max_leaves=8)
BASES = [
    lambda: json.dumps(video_sample("v.mp4", [{1: box(), 5: box()}, {3: box_polygon(2, 20, 2, 30)}])),
    lambda: json.dumps(image_sample("img.jpg", [box()])),
    lambda: json.dumps(video_sample("frames", [{0: {"size": [H, W], "counts": [100, 50, H * W - 150]}}])),
    lambda: json.dumps(video_sample("v.mp4")),
]
TEXT_EDITS = st.sampled_from(["[", "]", "{", "}", '"', ",", ":", "\\", "\\ud83d", "\\u0000", "1e400", "NaN",
                              "9" * 40, "[" * 50, "<|im_end|>", "\ue000", "-", "0", " "])


def _run_one(text: str, root: Path, processor) -> None:
    """Raw JSON text through the whole per-sample path; only DataError may come out."""
    stage = "json"
    try:
        raw = decode_sample_json(text.encode("utf-8", errors="surrogatepass"), 0)
        stage = "schema"
        sample = parse_sample(raw, 0)
        stage = "decode"
        decoded = decode_sample(sample, root, num_frames=4, image_size=S)
        stage = "processor"
        processor.encode(decoded)
        stage = "accepted"
    except DataError as e:
        assert e.category, e
    event(f"reached {stage}")  # --hypothesis-show-statistics: how deep the examples get


@settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_raw_json_text_only_raises_data_error(root, processor, data):
    """Byte-level edits of valid samples' JSON text, and values spliced into them: whatever the text, parsing,
    planning and processing raise only DataError, each within the deadline (the limits bound the work)."""
    text = data.draw(st.sampled_from(BASES))()
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["insert", "delete", "splice"]))
        pos = data.draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:pos] + data.draw(TEXT_EDITS) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 8)):]
        else:  # replace one JSON value (after a ':' or '[') with a generated one
            starts = [m.end() for m in re.finditer(r"[:\[,]\s*", text)]
            if starts:
                at = data.draw(st.sampled_from(starts))
                end = re.compile(r'"(?:[^"\\]|\\.)*"|[^,\]}]*').match(text, at).end()
                text = text[:at] + json.dumps(data.draw(VALUES)) + text[end:]
    _run_one(text, root, processor)


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(VALUES)
def test_arbitrary_json_values_only_raise_data_error(root, processor, value):
    _run_one(json.dumps(value), root, processor)
    if isinstance(value, dict):  # and as the fields of an otherwise valid sample
        raw = json.loads(BASES[0]())
        raw.update(copy.deepcopy(value))
        _run_one(json.dumps(raw), root, processor)


# ---------------------------------------------------------------------------------------------- docs


def test_every_error_category_is_documented():
    """docs/data-format.md lists every category the data path can raise."""
    source = "\n".join(p.read_text() for p in (REPO / "refvllm" / "data").glob("*.py"))
    source += (REPO / "refvllm" / "errors.py").read_text()
    source += (REPO / "refvllm" / "model" / "qwen2_5_vl.py").read_text()  # a family's part of the data path
    found = set(re.findall(r'category="([a-z_]+)"', source))
    found |= set(re.findall(r'_(?:err|fail|error)\([^()]*(?:\([^()]*\)[^()]*)*,\s*"([a-z_]+)"\)', source, re.S))
    found |= set(re.findall(r'"category": "([a-z_]+)"', source))
    found |= {"too_long", "text", "worker_crash", "internal"}
    doc = (REPO / "docs" / "data-format.md").read_text()
    missing = sorted(c for c in found if f"`{c}`" not in doc)
    assert len(found) > 25 and not missing, missing
