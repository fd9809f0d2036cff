"""decode_sample on real media: planned frames only, masks at S x S in object-major order, empty masks, errors."""

import numpy as np
import pytest
from helpers_media import (
    box_mask,
    box_polygon,
    frame_index_of,
    image_sample,
    indexed_frames,
    rle,
    uncompressed_rle,
    video_sample,
    write_frame_folder,
    write_image,
    write_video,
)

from refvllm.data import media as media_module
from refvllm.data.decode import decode_sample, decode_sample_report
from refvllm.data.masks import MaskRescaleWarning, resize_mask_any
from refvllm.data.schema import parse_sample
from refvllm.errors import DataError

H, W, N, S = 48, 64, 16, 16
A = box_mask(H, W, 4, 12, 4, 20)  # 128 px
B = box_mask(H, W, 30, 40, 40, 60)  # 200 px
EMPTY = np.zeros((H, W), bool)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    frames = indexed_frames(N, H, W)
    write_video(root / "v.mp4", frames)
    write_frame_folder(root / "folder", frames[:10])
    write_image(root / "img.jpg", frames[3])
    return root


def _decode(raw, root, num_frames=4, image_size=S, **kw):
    return decode_sample_report(parse_sample(raw, 2), root, num_frames, image_size, **kw)


def test_video_referring_layout(root):
    raw = video_sample("v.mp4", [{1: rle(A), 9: uncompressed_rle(A)}, {9: rle(B)}], sample_id="two")
    decoded, areas = _decode(raw, root)
    assert decoded.plan.frame_indices == [1, 6, 9, 14]  # uniform [2, 6, 10, 14] with mask frames 1 and 9
    assert decoded.plan.object_frames == [[1, 9], [9]]
    assert decoded.frames.shape == (4, S, S, 3) and decoded.frames.dtype == np.uint8
    assert frame_index_of(decoded.frames) == [1, 6, 9, 14]
    assert decoded.masks.shape == (3, S, S) and decoded.masks.dtype == bool
    assert decoded.mask_frame.tolist() == [0, 2, 2] and decoded.mask_object.tolist() == [0, 0, 1]
    assert decoded.mask_frame.dtype == np.int64 and decoded.mask_object.dtype == np.int64
    np.testing.assert_array_equal(decoded.masks[0], resize_mask_any(A, S))
    np.testing.assert_array_equal(decoded.masks[2], resize_mask_any(B, S))
    assert areas == [{1: 128, 9: 128}, {9: 200}]


def test_a_frame_size_from_the_media_keeps_the_aspect_ratio(root):
    """A FrameSize computed from the media's size (what a pretrained VLM's family passes), bicubic frames."""
    from PIL import Image

    from refvllm.data.decode import FrameSize

    raw = video_sample("v.mp4", [{1: rle(A)}, {9: rle(B)}])
    size = FrameSize(of_media=lambda h, w: (h // 2 + 4, w // 2 + 8), resample="bicubic")
    decoded, _ = _decode(raw, root, image_size=size)
    assert decoded.frames.shape == (4, 28, 40, 3) and decoded.masks.shape == (2, 28, 40)
    np.testing.assert_array_equal(decoded.masks[1], resize_mask_any(B, (28, 40)))
    full = decode_sample_report(parse_sample(raw, 2), root, 4, FrameSize(of_media=lambda h, w: (h, w)))[0]
    np.testing.assert_array_equal(decoded.frames[0],
                                  np.asarray(Image.fromarray(full.frames[0]).resize((40, 28), Image.BICUBIC)))


def test_only_planned_frames_are_decoded(root, monkeypatch):
    seen = []
    real = media_module.VideoFileReader.read
    monkeypatch.setattr(media_module.VideoFileReader, "read", lambda self, idx: seen.append(list(idx)) or
                        real(self, idx))
    decode_sample(parse_sample(video_sample("v.mp4", [{5: rle(A)}]), 0), root, 4, S)
    assert seen == [[2, 5, 10, 14]]


def test_empty_masks_are_dropped_and_an_object_without_any_is_an_error(root):
    decoded, areas = _decode(video_sample("v.mp4", [{2: rle(EMPTY), 7: rle(A)}]), root)
    assert decoded.plan.object_frames == [[7]] and areas == [{2: 0, 7: 128}]
    with pytest.raises(DataError) as info:
        _decode(video_sample("v.mp4", [{2: rle(EMPTY), 7: box_polygon(60, 70, 80, 90)}], sample_id="e"), root)
    e = info.value
    assert (e.category, e.index, e.sample_id) == ("polygon_malformed", 2, "e")  # outside the frame
    with pytest.raises(DataError) as info:
        _decode(video_sample("v.mp4", [{2: rle(EMPTY), 7: uncompressed_rle(EMPTY)}], sample_id="e"), root)
    e = info.value
    assert (e.category, e.index, e.sample_id) == ("empty_mask", 2, "e")
    assert e.reason == "object 0 has no non-empty mask (all 2 of its masks are empty)"


def test_polygons_use_the_sample_size_or_the_media_size(root):
    decoded, areas = _decode(video_sample("v.mp4", [{3: box_polygon(4, 12, 4, 20)}]), root)
    assert decoded.masks[0].any() and areas[0][3] >= 128
    with pytest.warns(MaskRescaleWarning):
        _, half = _decode(video_sample("v.mp4", [{3: box_polygon(2, 6, 2, 10)}], height=H // 2, width=W // 2), root)
    assert half == areas
    with pytest.raises(DataError) as info:
        _decode(video_sample("v.mp4", [{3: box_polygon(2, 6, 2, 10)}], height=H, width=H), root)
    assert info.value.category == "mask_size"


def test_mask_size_errors_name_object_frame_and_sample(root):
    with pytest.raises(DataError) as info:
        _decode(video_sample("v.mp4", [{3: rle(A)}, {5: rle(np.ones((10, 10), bool))}], sample_id="m"), root)
    e = info.value
    assert (e.category, e.index, e.sample_id) == ("mask_size", 2, "m")
    assert e.reason.startswith("object 1 frame 5: mask size 10x10 does not match the media's 48x64")
    with pytest.raises(DataError) as info:
        _decode(video_sample("v.mp4", [{3: rle(box_mask(24, 32, 2, 6, 2, 10))}]), root, mask_resize="error")
    assert info.value.category == "mask_size"


def test_mask_frame_past_the_end(root):
    with pytest.raises(DataError) as info:
        _decode(video_sample("v.mp4", [{3: rle(A), N: rle(A)}]), root)
    assert info.value.category == "frame_index" and f"mask frame {N} is past the end" in info.value.reason


def test_frame_folder_image_and_understanding(root):
    decoded, _ = _decode(video_sample("folder", [{8: rle(B)}]), root, num_frames=3)
    assert decoded.plan.frame_indices == [1, 5, 8] and frame_index_of(decoded.frames) == [1, 5, 8]
    decoded, areas = _decode(image_sample("img.jpg", [rle(A), box_polygon(30, 40, 40, 60)]), root)
    assert decoded.frames.shape == (1, S, S, 3) and frame_index_of(decoded.frames) == [3]
    assert decoded.mask_frame.tolist() == [0, 0] and decoded.mask_object.tolist() == [0, 1]
    assert areas[0] == {0: 128}
    decoded, areas = _decode(video_sample("v.mp4"), root, num_frames=32)
    assert decoded.frames.shape == (N, S, S, 3) and decoded.masks.shape == (0, S, S) and areas == []
