"""Masks: every segmentation form, every malformed form, size mismatch policy, 'any coverage' resizing."""

import warnings

import numpy as np
import pytest
from helpers_media import box_mask, box_polygon, rle, uncompressed_rle
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from refvllm.data.masks import (
    MaskRescaleWarning,
    decode_mask,
    resize_mask_any,
    resize_rle_any,
    rle_area,
    rle_counts_from_string,
    segmentation_form,
    to_rle,
)
from refvllm.errors import DataError

H, W = 24, 32
BOX = box_mask(H, W, 4, 10, 6, 20)  # 6 x 14 = 84 pixels


def test_forms_decode_to_the_same_mask():
    for seg, form in [(rle(BOX), "rle"), (uncompressed_rle(BOX), "rle_uncompressed")]:
        assert segmentation_form(seg) == form
        got = decode_mask(seg, H, W)
        assert got.dtype == bool and got.shape == (H, W)
        np.testing.assert_array_equal(got, BOX)
    # a polygon around the pixel corners covers the box (pycocotools rasterises the boundary inclusively)
    poly = decode_mask(box_polygon(4, 10, 6, 20), H, W)
    assert segmentation_form(box_polygon(4, 10, 6, 20)) == "polygon"
    assert poly[4:10, 6:20].all() and poly.sum() <= (7 * 15)
    assert not poly[:3].any() and not poly[:, :5].any()


def test_flat_polygon_and_bytes_counts_are_accepted():
    flat = box_polygon(4, 10, 6, 20)[0]
    np.testing.assert_array_equal(decode_mask(flat, H, W), decode_mask([flat], H, W))
    seg = rle(BOX)
    np.testing.assert_array_equal(decode_mask({**seg, "counts": seg["counts"].encode()}, H, W), BOX)


def test_mask_starting_with_ones_and_full_and_empty_masks():
    for mask in [box_mask(H, W, 0, 5, 0, 5), np.ones((H, W), bool), np.zeros((H, W), bool)]:
        for seg in (rle(mask), uncompressed_rle(mask)):
            np.testing.assert_array_equal(decode_mask(seg, H, W), mask)
            assert rle_area(to_rle(seg, H, W)) == int(mask.sum())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_counts_parser_matches_pycocotools(h, w, density, seed):
    mask = np.random.default_rng(seed).random((h, w)) < density
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle_counts_from_string(encoded["counts"])
    assert counts.sum() == h * w
    rebuilt = np.repeat(np.arange(counts.size) % 2, counts).reshape(w, h).T.astype(bool)
    np.testing.assert_array_equal(rebuilt, mask)


def test_counts_parser_handles_large_counts():
    big = np.zeros((2000, 3000), np.uint8)
    big[0, 0] = big[-1, -1] = 1
    counts = rle_counts_from_string(mask_utils.encode(np.asfortranarray(big))["counts"])
    assert counts.tolist() == [0, 1, 2000 * 3000 - 2, 1]


def _good():
    return rle(BOX)


MALFORMED = [
    ({"size": [H, W]}, "rle_malformed", "needs 'size' and 'counts'"),
    ({"counts": "abc"}, "rle_malformed", "needs 'size' and 'counts'"),
    ({"size": [H], "counts": "PP"}, "rle_malformed", "'size' must be [height, width]"),
    ({"size": [H, 0], "counts": "PP"}, "rle_malformed", "'size' must be"),
    ({"size": [H, True], "counts": "PP"}, "rle_malformed", "'size' must be"),
    ({"size": [H, W], "counts": 5}, "rle_malformed", "must be a string or a list"),
    ({"size": [H, W], "counts": _good()["counts"][:-1]}, "rle_malformed", ""),
    ({"size": [H, W], "counts": _good()["counts"] + "1"}, "rle_malformed", "cover"),
    ({"size": [H, W], "counts": "\x7f\x7f"}, "rle_malformed", "outside"),
    ({"size": [H, W], "counts": "é"}, "rle_malformed", "non-ASCII"),
    ({"size": [H, W], "counts": "oooooooo0"}, "rle_malformed", "too large"),
    ({"size": [H, W], "counts": "P"}, "rle_malformed", "truncated"),
    ({"size": [H, W], "counts": "0@"}, "rle_malformed", "negative"),
    ({"size": [H, W], "counts": [H * W - 1]}, "rle_malformed", "cover"),
    ({"size": [H, W], "counts": [H * W + 5, -5]}, "rle_malformed", "negative"),
    ({"size": [H, W], "counts": [1.5, H * W - 1.5]}, "rle_malformed", "flat list of integers"),
    ({"size": [H, W], "counts": [[1], [2]]}, "rle_malformed", "flat list of integers"),
    ({"size": [H, W], "counts": [1, "a"]}, "rle_malformed", "flat list of integers"),
    ([], "polygon_malformed", "empty polygon"),
    ([[1, 2, 3, 4]], "polygon_malformed", "at least 6"),
    ([[1, 2, 3, 4, 5, 6, 7]], "polygon_malformed", "even number"),
    ([[1, 2, 3, "4", 5, 6]], "polygon_malformed", "flat list of numbers"),
    ([[1, 2, 3, True, 5, 6]], "polygon_malformed", "flat list of numbers"),
    ([[1, 2, 3, float("nan"), 5, 6]], "polygon_malformed", "non-finite"),
    ([[0, 0, 1e30, 0, 5, 5]], "polygon_malformed", "outside"),
    ([[0, 0, 10, 0, 10, -40]], "polygon_malformed", "outside"),
    ("PP", "segmentation_type", "RLE object, a polygon list or null"),
    (5, "segmentation_type", "got a number"),
]


@pytest.mark.parametrize("seg, category, text", MALFORMED)
def test_malformed_segmentations_raise_data_error(seg, category, text):
    with pytest.raises(DataError) as info:
        decode_mask(seg, H, W, where="object 1 frame 3")
    assert info.value.category == category
    assert text in info.value.reason
    assert info.value.reason.startswith("object 1 frame 3: ")


def test_same_aspect_rle_is_rescaled_with_a_warning():
    half = box_mask(H // 2, W // 2, 2, 5, 3, 10)
    with pytest.warns(MaskRescaleWarning, match="12x16 differs from the media's 24x32"):
        got = decode_mask(rle(half), H, W)
    np.testing.assert_array_equal(got, box_mask(H, W, 4, 10, 6, 20))
    with pytest.raises(DataError) as info:
        decode_mask(rle(half), H, W, mask_resize="error")
    assert info.value.category == "mask_size" and "data.mask_resize=error" in info.value.reason


def test_huge_mask_sizes_are_rejected_before_decoding():
    huge = {"size": [H * 100, W * 100], "counts": [H * W * 10000]}  # 100x per side: 10,000x the pixels
    with pytest.raises(DataError, match="too large to rescale") as info:
        decode_mask(huge, H, W)
    assert info.value.category == "mask_size"
    with pytest.raises(DataError, match="longer than 2"):
        decode_mask({"size": [1 << 17, 1 << 16], "counts": [1 << 33]}, H, W)


def test_other_aspect_is_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: it is an error
        with pytest.raises(DataError) as info:
            decode_mask(rle(np.zeros((H, H), bool)), H, W)
    assert info.value.category == "mask_size" and "different aspect ratio" in info.value.reason


def test_polygon_reference_size():
    # drawn on a 12x16 version of the frame: scaled x2 when the sample says so
    with pytest.warns(MaskRescaleWarning):
        scaled = decode_mask(box_polygon(2, 5, 3, 10), H, W, poly_size=(12, 16))
    np.testing.assert_array_equal(scaled, decode_mask(box_polygon(4, 10, 6, 20), H, W))
    with pytest.raises(DataError) as info:
        decode_mask(box_polygon(2, 5, 3, 10), H, W, poly_size=(12, 12))
    assert info.value.category == "mask_size"


def _resize_any_reference(mask, size):
    """Brute force: target pixel set iff a source pixel of its bin (down) or under its centre (up) is set.
    ``size``: a side, or (height, width)."""
    h, w = mask.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size

    def bins(n, size):
        if n >= size:
            return [range(i * n // size, (i + 1) * n // size) for i in range(size)]
        return [[int((i + 0.5) * n / size)] for i in range(size)]

    rows, cols = bins(h, out_h), bins(w, out_w)
    return np.array([[mask[np.ix_(list(r), list(c))].any() for c in cols] for r in rows])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_resize_any_matches_reference_and_keeps_objects(h, w, size, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < 0.05
    mask[rng.integers(h), rng.integers(w)] = True
    got = resize_mask_any(mask, size)
    assert got.shape == (size, size) and got.dtype == bool
    np.testing.assert_array_equal(got, _resize_any_reference(mask, size))
    assert got.any()


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 50),
       st.sampled_from(["random", "full", "pixel", "empty"]), st.integers(0, 2**32 - 1))
def test_resize_from_rle_runs_equals_dense_resize(h, w, size, kind, seed):
    rng = np.random.default_rng(seed)
    mask = {"random": lambda: rng.random((h, w)) < rng.random(), "full": lambda: np.ones((h, w), bool),
            "pixel": lambda: box_mask(h, w, h - 1, h, w // 2, w // 2 + 1),
            "empty": lambda: np.zeros((h, w), bool)}[kind]()
    got = resize_rle_any(to_rle(rle(mask), h, w), size)
    assert got.shape == (size, size) and got.dtype == bool
    np.testing.assert_array_equal(got, resize_mask_any(mask, size))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_rectangular_targets_match_the_reference_from_runs_and_dense(h, w, out_h, out_w, seed):
    """(height, width) targets (a pretrained VLM keeps the aspect ratio): each axis binned on its own."""
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < rng.random()
    dense = resize_mask_any(mask, (out_h, out_w))
    np.testing.assert_array_equal(dense, _resize_any_reference(mask, (out_h, out_w)))
    np.testing.assert_array_equal(resize_rle_any(to_rle(rle(mask), h, w), (out_h, out_w)), dense)
    assert dense.any() == mask.any()


def test_resize_any_single_pixel_and_empty():
    mask = np.zeros((720, 1280), bool)
    mask[719, 1279] = True
    small = resize_mask_any(mask, 27)
    assert small.sum() == 1 and small[26, 26]
    assert not resize_mask_any(np.zeros((50, 70), bool), 16).any()
    assert resize_mask_any(np.ones((3, 5), bool), 8).all()
    with pytest.raises(ValueError):
        resize_mask_any(np.zeros((2, 2, 2), bool), 4)
