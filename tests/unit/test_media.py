"""Media readers on real generated files, path safety, the frame plan, frame resizing."""

import numpy as np
import pytest
from helpers_media import frame_index_of, indexed_frames, write_frame_folder, write_image, write_video
from hypothesis import given, settings
from hypothesis import strategies as st

from refvllm.data import media as media_module
from refvllm.data.media import (
    VIDEO_STRATEGIES,
    FrameFolderReader,
    ImageReader,
    VideoFileReader,
    check_media_path,
    natural_key,
    open_media,
    plan_frames,
    resize_frames,
    uniform_indices,
)
from refvllm.data.types import Sample, Turn
from refvllm.errors import DataError

N = 16


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    frames = indexed_frames(N)
    write_video(root / "v.mp4", frames, gop=4)
    write_frame_folder(root / "folder", frames[:12])
    write_frame_folder(root / "pngs", frames[:3], ext=".png")
    write_image(root / "img.jpg", frames[5])
    (root / "garbage.mp4").write_bytes(b"not a video at all" * 100)
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken jpeg")
    data = (root / "v.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "empty").mkdir()
    return root


def _sample(media_path, media_type="video"):
    return Sample(index=4, id="x", kind=media_type, media=media_path, media_type=media_type,
                  turns=[Turn("user", "q"), Turn("assistant", "a")])


@pytest.mark.parametrize("strategy", VIDEO_STRATEGIES)
def test_video_strategies_read_the_requested_frames(media, strategy):
    reader = VideoFileReader(media / "v.mp4", strategy)
    assert (reader.num_frames, reader.height, reader.width) == (N, 48, 64)
    for indices in ([0], [3, 4, 5], [1, 7, 8, 15], [15], list(range(N)), [2, 9]):
        frames = reader.read(indices)
        assert frames.dtype == np.uint8 and frames.shape == (len(indices), 48, 64, 3)
        assert frame_index_of(frames) == indices


def test_frame_folder_natural_order_and_formats(media):
    reader = FrameFolderReader(media / "folder")
    assert [p.name for p in reader.files[:3]] == ["frame_0.jpg", "frame_1.jpg", "frame_2.jpg"]
    assert reader.files[-1].name == "frame_11.jpg" and reader.num_frames == 12
    assert frame_index_of(reader.read([2, 10, 11])) == [2, 10, 11]
    assert frame_index_of(FrameFolderReader(media / "pngs").read([0, 2])) == [0, 2]
    assert sorted(["f10.jpg", "f9.jpg", "F1.jpg"], key=natural_key) == ["F1.jpg", "f9.jpg", "f10.jpg"]


def test_image_reader(media):
    reader = ImageReader(media / "img.jpg")
    assert (reader.num_frames, reader.height, reader.width) == (1, 48, 64)
    assert frame_index_of(reader.read([0])) == [5]


def test_open_media_dispatch(media):
    assert isinstance(open_media(media, _sample("v.mp4")), VideoFileReader)
    assert isinstance(open_media(media, _sample("folder")), FrameFolderReader)
    assert isinstance(open_media(media, _sample("img.jpg", "image")), ImageReader)


@pytest.mark.parametrize("path, media_type, category", [
    ("missing.mp4", "video", "media_not_found"),
    ("garbage.mp4", "video", "media_corrupt"),
    ("garbage.jpg", "image", "media_corrupt"),
    ("empty", "video", "media_empty"),
    ("folder", "image", "media_corrupt"),
    ("../v.mp4", "video", "media_path"),
])
def test_bad_media_raise_data_error_naming_the_sample(media, path, media_type, category):
    with pytest.raises(DataError) as info:
        open_media(media, _sample(path, media_type)).read([0])
    assert info.value.category == category
    assert (info.value.index, info.value.sample_id) == (4, "x")


def test_truncated_video_is_a_data_error(media):
    with pytest.raises(DataError) as info:
        reader = open_media(media, _sample("truncated.mp4"))
        reader.read(list(range(reader.num_frames)))
    assert info.value.category in ("media_corrupt", "media_empty")


def test_frame_folder_with_mismatched_frame(media, tmp_path):
    folder = write_frame_folder(tmp_path / "f", indexed_frames(3))
    write_image(folder / "frame_3.jpg", indexed_frames(1, 32, 32)[0])
    reader = FrameFolderReader(folder)
    assert frame_index_of(reader.read([0, 1])) == [0, 1]
    with pytest.raises(DataError, match="first frame is 48x64"):
        reader.read([3])


def test_read_out_of_range(media):
    with pytest.raises(DataError) as info:
        VideoFileReader(media / "v.mp4").read([3, N])
    assert info.value.category == "frame_index"


@pytest.mark.parametrize("path", ["/etc/passwd", "../x.mp4", "a/../../x.mp4", "a\\..\\x.mp4", "C:\\x.mp4",
                                  "C:x.mp4", "\\\\server\\share\\x.mp4", "", "  ", "a\x00b"])
def test_unsafe_media_paths(path):
    with pytest.raises(DataError) as info:
        check_media_path(path)
    assert info.value.category == "media_path"


@pytest.mark.parametrize("path", ["a.mp4", "videos/a.mp4", "a..b/c.mp4", "./a.mp4", "dir/frames"])
def test_safe_media_paths(path):
    assert check_media_path(path) == path


# ---------------------------------------------------------------------------------------------- frame plan


def test_plan_uniform_without_masks_and_short_videos():
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    assert plan_frames(100, 4, []).frame_indices == [12, 37, 62, 87]
    plan = plan_frames(5, 8, [[4, 1]])
    assert plan.frame_indices == [0, 1, 2, 3, 4] and plan.object_frames == [[1, 4]]
    assert plan_frames(1, 16, [[0], [0]]).frame_indices == [0]  # an image


def test_mask_frames_replace_the_nearest_uniform_frame():
    plan = plan_frames(100, 4, [[40]])
    assert plan.frame_indices == [12, 40, 62, 87]  # 40 is nearest to 37
    plan = plan_frames(100, 4, [[38, 39]])  # both near slot 37: neither evicts the other
    assert plan.frame_indices == [12, 38, 39, 87] and plan.object_frames == [[38, 39]]
    plan = plan_frames(100, 4, [[0], [99]])
    assert plan.frame_indices == [0, 37, 62, 99] and plan.object_frames == [[0], [99]]


def test_too_many_mask_frames_keep_a_uniform_subset_per_object():
    plan = plan_frames(1000, 4, [list(range(0, 100)), [500], list(range(900, 1000))])
    # quotas (4, 1, 4) shrink largest-first, the earlier object first on ties: (1, 1, 2)
    assert plan.object_frames == [[50], [500], [925, 975]]
    assert plan.frame_indices == [50, 500, 925, 975]
    shared = plan_frames(1000, 4, [list(range(0, 800, 100))] * 3)  # same frames: subsets coincide
    assert shared.object_frames[0] == shared.object_frames[1] == shared.object_frames[2]
    assert shared.frame_indices == shared.object_frames[0] == [100, 300, 500, 700]


def test_plan_errors():
    with pytest.raises(DataError) as info:
        plan_frames(10, 4, [[3], [10]])
    assert info.value.category == "frame_index" and "object 1: mask frame 10" in info.value.reason
    with pytest.raises(DataError) as info:
        plan_frames(100, 2, [[1], [50], [90]])
    assert info.value.category == "frame_budget"
    with pytest.raises(DataError) as info:
        plan_frames(0, 4, [])
    assert info.value.category == "media_empty"


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_plan_invariants(data):
    num_total = data.draw(st.integers(1, 300))
    budget = data.draw(st.integers(1, 20))
    num_objects = data.draw(st.integers(0, 4))
    objects = [data.draw(st.lists(st.integers(0, num_total - 1), min_size=1, max_size=30)) for _ in range(num_objects)]
    try:
        plan = plan_frames(num_total, budget, objects)
    except DataError as e:  # only when no `budget` frames hold a mask frame of every object
        assert e.category == "frame_budget" and _min_hitting_set(objects) > budget
        return
    frames = plan.frame_indices
    assert frames == sorted(set(frames)) and len(frames) == min(budget, num_total)
    assert all(0 <= f < num_total for f in frames)
    union = set().union(*map(set, objects)) if objects else set()
    for obj, kept in zip(objects, plan.object_frames, strict=True):
        assert kept and set(kept) <= set(obj) and set(kept) <= set(frames) and kept == sorted(kept)
        if len(union) <= budget:
            assert set(kept) == set(obj)
    assert plan == plan_frames(num_total, budget, objects)  # deterministic



def _min_hitting_set(objects: list[list[int]]) -> int:
    """Brute force: the fewest frames holding a frame of every object. Every way of grouping the objects is tried;
    a group can share one frame when its frame sets have a common frame."""
    best = len(objects)

    def place(i: int, groups: list[set[int]]) -> None:
        nonlocal best
        if len(groups) >= best:
            return
        if i == len(objects):
            best = len(groups)
            return
        for g, common in enumerate(groups):
            if common & set(objects[i]):
                place(i + 1, [*groups[:g], common & set(objects[i]), *groups[g + 1:]])
        place(i + 1, [*groups, set(objects[i])])

    place(0, [])
    return best


def _check_plan(plan, num_total: int, budget: int, objects: list[list[int]]) -> None:
    frames = plan.frame_indices
    assert frames == sorted(set(frames)) and len(frames) == min(budget, num_total)
    assert all(0 <= f < num_total for f in frames)
    assert len(plan.object_frames) == len(objects)
    for obj, kept in zip(objects, plan.object_frames, strict=True):
        assert kept and kept == sorted(set(kept)) and set(kept) <= set(obj) and set(kept) <= set(frames)


def test_objects_sharing_mask_frames_fit_the_budget():
    # 17 objects on the 16 frames of a ring (object k on frames k and k + 1 mod 16) fit whole
    ring = [[10 * (k % 16), 10 * ((k + 1) % 16)] for k in range(17)]
    plan = plan_frames(1000, 16, ring)
    assert plan.frame_indices == list(range(0, 160, 10)) and plan.object_frames == [sorted(o) for o in ring]
    assert plan_frames(1000, 16, [list(range(16))] * 17).frame_indices == list(range(16))
    # with two frames of its own each, the quota greedy keeps those (the middle of each object's frames) and
    # runs out; the exact search keeps the ring frames
    ring = [[10 * (k % 16), 10 * ((k + 1) % 16), 500 + 2 * k, 501 + 2 * k] for k in range(17)]
    assert media_module._shrink_quotas([sorted(o) for o in ring], 16) is None
    plan = plan_frames(1000, 16, ring)
    _check_plan(plan, 1000, 16, ring)
    assert all(min(kept) < 500 for kept in plan.object_frames)
    assert plan == plan_frames(1000, 16, ring)  # deterministic


def test_spare_budget_goes_to_the_objects_round_robin():
    # one frame (5) hits objects 0..16; the other 15 frames are spread over the objects' own frames in order
    objects = [[5, 100 + 10 * k, 101 + 10 * k] for k in range(17)]
    assert media_module._shrink_quotas([sorted(o) for o in objects], 16) is None
    plan = plan_frames(1000, 16, objects)
    _check_plan(plan, 1000, 16, objects)
    assert all(5 in kept for kept in plan.object_frames)
    assert [len(kept) for kept in plan.object_frames] == [2] * 15 + [1, 1]


def test_frame_budget_errors_give_the_fewest_frames_needed():
    with pytest.raises(DataError) as info:
        plan_frames(1000, 16, [[3 * k, 3 * k + 1] for k in range(17)])  # 17 objects on disjoint frames
    assert info.value.category == "frame_budget" and info.value.index is None
    assert info.value.reason == (f"objects {', '.join(map(str, range(17)))} share no mask frame, so they need at least "
                                 "17 distinct frames; the frame budget data.num_frames is 16")
    # 9 triangles (objects on {a, b}, {b, c}, {a, c}): any two objects share a frame within a triangle, so at
    # most 9 objects are pairwise disjoint, yet each triangle needs 2 frames
    triangles = [pair for t in range(9) for pair in ([10 * t, 10 * t + 1], [10 * t + 1, 10 * t + 2],
                                                     [10 * t, 10 * t + 2])]
    with pytest.raises(DataError) as info:
        plan_frames(1000, 17, triangles)
    assert info.value.category == "frame_budget"
    assert info.value.reason == ("keeping a mask frame of each of the 27 objects takes 18 distinct frames; the frame "
                                 "budget data.num_frames is 17")
    _check_plan(plan_frames(1000, 18, triangles), 1000, 18, triangles)


def test_frame_budget_error_when_the_search_gives_up(monkeypatch):
    monkeypatch.setattr(media_module, "_COVER_SEARCH_NODES", 3)
    triangles = [pair for t in range(9) for pair in ([10 * t, 10 * t + 1], [10 * t + 1, 10 * t + 2],
                                                     [10 * t, 10 * t + 2])]
    with pytest.raises(DataError) as info:
        plan_frames(1000, 17, triangles)
    assert info.value.category == "frame_budget" and "within the search budget" in info.value.reason


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_plan_fits_exactly_when_a_small_enough_frame_cover_exists(data):
    num_total = data.draw(st.integers(1, 40))
    budget = data.draw(st.integers(1, 6))
    objects = data.draw(st.lists(st.lists(st.integers(0, num_total - 1), min_size=1, max_size=4), max_size=8))
    fits = _min_hitting_set(objects) <= budget
    try:
        plan = plan_frames(num_total, budget, objects)
    except DataError as e:
        assert e.category == "frame_budget" and not fits
        return
    assert fits
    _check_plan(plan, num_total, budget, objects)
    assert plan == plan_frames(num_total, budget, objects)  # deterministic


@pytest.mark.parametrize("shared", [True, False])
def test_plan_many_objects_on_a_long_video(shared):
    # 50 objects, T = 16, 2000 frames: with 16 shared frames the plan needs the exact search (milliseconds);
    # without, the objects spread over the video do not fit and the error lists the disjoint ones
    rng = np.random.default_rng(0)
    hubs = rng.choice(2000, 16, replace=False)
    objects = [{int(f) for f in rng.choice(2000, rng.integers(1, 30))} for _ in range(50)]
    objects = [sorted(o | {int(rng.choice(hubs))} if shared else o) for o in objects]
    try:
        _check_plan(plan_frames(2000, 16, objects), 2000, 16, objects)
        assert shared
    except DataError as e:
        assert not shared and e.category == "frame_budget" and "share no mask frame" in e.reason

def test_resize_frames():
    frames = indexed_frames(3, 48, 64)
    out = resize_frames(frames, 32)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    assert frame_index_of(out) == [0, 1, 2]
    assert resize_frames(out, 32).shape == (3, 32, 32, 3)


def test_resize_frames_to_height_and_width_with_either_filter():
    from PIL import Image

    frames = indexed_frames(2, 48, 64)
    for resample, pil in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        out = resize_frames(frames, (28, 56), resample)
        assert out.shape == (2, 28, 56, 3) and frame_index_of(out) == [0, 1]
        np.testing.assert_array_equal(out[1], np.asarray(Image.fromarray(frames[1]).resize((56, 28), pil)))
    assert np.array_equal(resize_frames(frames, (48, 64)), frames)  # already that size: unchanged
