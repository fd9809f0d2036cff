"""parse_sample: every sample kind, every static rule, and random mutations that may only raise DataError."""

import copy
import math

import pytest
from helpers_media import (
    box_mask,
    box_polygon,
    image_sample,
    indexed_frames,
    rle,
    uncompressed_rle,
    video_sample,
    write_frame_folder,
    write_image,
    write_video,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refvllm.data.decode import decode_sample
from refvllm.data.schema import parse_sample
from refvllm.data.types import Turn
from refvllm.errors import DataError

H, W = 48, 64
BOX = box_mask(H, W, 10, 20, 8, 30)


def single_frame():
    return video_sample("v.mp4", [{3: rle(BOX)}], sample_id=11)


def multi_frame():
    raw = video_sample("frames", [{0: uncompressed_rle(BOX), 5: None, 7: rle(BOX)},
                                  {"0002": box_polygon(1, 9, 2, 12)}],
                       question="<video>\nIs <object1><region> left of <object2><region>?", height=H, width=W,
                       type="relation", chance=0.5)
    raw["conversations"] += [{"from": "human", "value": "And <region>?"}, {"from": "gpt", "value": "Yes."}]
    raw["annotation"].append({"4": {"segmentation": rle(BOX)}})
    return raw


def image_referring():
    return image_sample("img.jpg", [box_polygon(2, 12, 3, 20), rle(BOX)], sample_id="im")


def video_key_image():
    return video_sample("img.jpg", [{0: rle(BOX)}], sample_id="vk")


def video_only():
    return video_sample("v.mp4", sample_id="vid")


def image_only():
    return {"id": "io", "image": "img.jpg", "conversations": [{"role": "user", "content": "What is shown?"},
                                                              {"role": "assistant", "content": "Shapes."}]}


BASES = [single_frame, multi_frame, image_referring, video_key_image, video_only, image_only]


def test_video_referring_single_frame():
    s = parse_sample(single_frame(), 0)
    assert (s.kind, s.media, s.media_type, s.id, s.index) == ("video_referring", "v.mp4", "video", "11", 0)
    assert s.turns == [Turn("user", "<video>\nWhat about <region>?"), Turn("assistant", "An answer.")]
    assert list(s.objects[0]) == [3] and s.num_regions == 1 and s.meta == {}


def test_video_referring_multi_frame_normalisation():
    s = parse_sample(multi_frame(), 7)
    assert s.kind == "video_referring" and s.num_regions == 3
    assert [list(o) for o in s.objects] == [[0, 7], [2], [4]]  # null frame dropped, "0002" -> 2
    assert (s.height, s.width) == (H, W)
    assert s.meta == {"type": "relation", "chance": 0.5}
    assert [t.role for t in s.turns] == ["user", "assistant", "user", "assistant"]


def test_image_kinds():
    s = parse_sample(image_referring(), 1)
    assert (s.kind, s.media_type, s.num_regions) == ("image_referring", "image", 2)
    assert s.turns[0].text.startswith("<image>\n")
    s = parse_sample(video_key_image(), 2)  # `video` pointing at an image: an image; <video> becomes <image>
    assert (s.kind, s.media_type) == ("image_referring", "image")
    assert s.turns[0].text == "<image>\nWhat about <region>?"
    s = parse_sample(image_only(), 3)
    assert (s.kind, s.id) == ("image", "io") and s.turns[0] == Turn("user", "<image>\nWhat is shown?")


def test_video_understanding_and_missing_placeholder():
    s = parse_sample(video_only(), 4)
    assert (s.kind, s.objects) == ("video", [])
    raw = video_only()
    raw["conversations"][0]["value"] = "What happens?"
    assert parse_sample(raw, 0).turns[0].text == "<video>\nWhat happens?"
    raw = video_only()
    del raw["id"]
    raw["annotation"] = []
    assert parse_sample(raw, 9).id == "9" and parse_sample(raw, 9).kind == "video"


def test_image_object_without_frame_key():
    raw = image_sample("img.jpg", [rle(BOX)])
    raw["annotation"] = [{"segmentation": rle(BOX)}]
    assert list(parse_sample(raw, 0).objects[0]) == [0]


def _set(path, value):
    def mutate(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return raw
    return mutate


def _delete(*path):
    def mutate(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return raw
    return mutate


def _question(text):
    return _set(("conversations", 0, "value"), text)


def _answer(text):
    return _set(("conversations", 1, "value"), text)


def _annotation(value):
    return _set(("annotation",), value)


SEG = {"segmentation": rle(BOX)}
BAD = [
    (lambda r: [r], "not_object", "must be a JSON object, got an array"),
    (_set(("id",), [1]), "bad_id", "'id' must be"),
    (_set(("id",), True), "bad_id", "'id' must be"),
    (_set(("id",), " "), "bad_id", "'id' must be"),
    (_set(("image",), "a.jpg"), "both_media", "both 'video' and 'image'"),
    (_delete("video"), "no_media", "neither 'video' nor 'image'"),
    (_set(("video",), "../v.mp4"), "media_path", "leaves the data root"),
    (_set(("video",), "/data/v.mp4"), "media_path", "is absolute"),
    (_set(("video",), 5), "media_path", "must be a path string"),
    (_delete("conversations"), "conversation_format", "no 'conversations'"),
    (_set(("conversations",), {"from": "human"}), "conversation_format", "must be a list"),
    (_set(("conversations",), []), "conversation_empty", "is empty"),
    (_set(("conversations", 0), "hi"), "conversation_format", "turn 0 must be an object"),
    (_set(("conversations", 1, "value"), 5), "conversation_format", "turn 1 text"),
    (_set(("conversations", 1, "from"), "system"), "unknown_speaker", "unknown speaker 'system'"),
    (_delete("conversations", 0, "from"), "unknown_speaker", "no speaker"),
    (_answer("  \n"), "empty_turn", "turn 1 has empty text"),
    (_set(("conversations", 0, "from"), "gpt"), "conversation_order", "turn 0 is from the gpt"),
    (_set(("conversations", 1, "from"), "human"), "conversation_order", "turn 1 is from the human"),
    (lambda r: {**r, "conversations": r["conversations"] + [{"from": "human", "value": "more?"}]},
     "conversation_order", "ends with a human turn"),
    (_question("<image>\n<region>?"), "placeholder", "use <video>"),
    (_question("<video><video>\n<region>?"), "placeholder", "2 <video>/<image> placeholders"),
    (lambda r: {**r, "conversations": [{"from": "human", "value": "<region>?"}, {"from": "gpt", "value": "a"},
                                       {"from": "human", "value": "<video> b"}, {"from": "gpt", "value": "c"}]},
     "placeholder", "in turn 2; it must be in the first human turn"),
    (_answer("see <video>"), "placeholder", "turn 1 (gpt) contains <video>"),
    (_answer("it is <region>"), "region_in_answer", "turn 1 (gpt) contains <region>"),
    (_question("<video>\n<region> and <region>?"), "region_count", "2 <region> placeholder(s) but 'annotation' has 1"),
    (_delete("annotation"), "region_count", "1 <region> placeholder(s) but 'annotation' has 0"),
    (_annotation({"3": SEG}), "annotation_format", "'annotation' must be a list"),
    (_annotation([[SEG]]), "annotation_format", "object 0 of 'annotation' must be an object"),
    (_annotation([{"3": 5}]), "annotation_format", "object 0 frame 3: expected"),
    (_annotation([{"3": {"mask": 1}}]), "annotation_format", "without a segmentation key"),
    (_annotation([SEG]), "annotation_format", "must sit under a frame index key"),
    (_annotation([{"a": SEG}]), "frame_index", "frame key 'a' is not a frame index"),
    (_annotation([{"1.5": SEG}]), "frame_index", "frame key '1.5'"),
    (_annotation([{"-1": SEG}]), "frame_index", "frame index '-1' is negative"),
    (_annotation([{"3": SEG, "03": SEG}]), "frame_index", "frame 3 appears twice"),
    (_annotation([{"3": None, "4": {"segmentation": None}}]), "no_mask", "object 0 has no mask"),
    (_annotation([{}]), "no_mask", "object 0 has no mask"),
    (_annotation([{"3": {"segmentation": {"size": [H, W], "counts": 5}}}]), "rle_malformed", "object 0 frame 3: "),
    (_annotation([{"3": {"segmentation": [[1, 2, 3, 4]]}}]), "polygon_malformed", "at least 6"),
    (_annotation([{"3": {"segmentation": "abc"}}]), "segmentation_type", "an RLE object, a polygon list or null"),
    (_set(("height",), 48), "sample_size", "only one of 'height' and 'width'"),
    (lambda r: {**r, "height": -1, "width": 5}, "sample_size", "'height' must be a positive integer"),
    (lambda r: {**r, "height": 5, "width": "64"}, "sample_size", "'width' must be a positive integer"),
]


@pytest.mark.parametrize("mutate, category, text", BAD)
def test_bad_samples(mutate, category, text):
    with pytest.raises(DataError) as info:
        parse_sample(mutate(single_frame()), 5)
    e = info.value
    assert e.category == category, e.reason
    assert text in e.reason
    assert e.index == 5
    assert e.sample_id == (None if category in ("not_object", "bad_id") else "11")


def test_image_frame_other_than_zero():
    raw = image_sample("img.jpg", [rle(BOX)])
    raw["annotation"] = [{"1": SEG}]
    with pytest.raises(DataError, match="frame 1 of an image") as info:
        parse_sample(raw, 0)
    assert info.value.category == "frame_index"


def test_float_sizes_with_integer_values_are_accepted():
    raw = {**single_frame(), "height": 48.0, "width": 64}
    assert parse_sample(raw, 0).height == 48


# ---------------------------------------------------------------------------------------------- mutations


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema_media")
    frames = indexed_frames(8, H, W)
    write_video(root / "v.mp4", frames)
    write_frame_folder(root / "frames", frames)
    write_image(root / "img.jpg", frames[0])
    return root


LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["<region>", "<video>", "<image>", "human", "gpt", "user", "../v.mp4", "/v.mp4", "0", "-1",
                     "img.jpg", "frames", "v.mp4", "PP0", ""]),
)
VALUES = st.recursive(LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


def _paths(node, prefix=()):
    """Every (container, key) location in a nested JSON value."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield node, key
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield node, i
            yield from _paths(value, prefix + (i,))


def _mutate_once(raw, data):
    locations = list(_paths(raw))
    if not locations:
        return data.draw(VALUES)
    container, key = data.draw(st.sampled_from(locations))
    value = container[key]
    op = data.draw(st.sampled_from(["delete", "replace", "number", "string", "swap", "duplicate"]))
    if op == "delete":
        del container[key]
    elif op == "replace":
        container[key] = data.draw(VALUES)
    elif op == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        container[key] = data.draw(st.sampled_from([-1, 0, 10**9, -value, value + 1, value * 3, math.inf, 0.5]))
    elif op == "string" and isinstance(value, str):
        pos = data.draw(st.integers(0, len(value)))
        cut = data.draw(st.integers(0, 3))
        container[key] = value[:pos] + data.draw(st.text(max_size=3)) + value[pos + cut:]
    elif op == "swap" and isinstance(container, list) and len(container) > 1:
        other = data.draw(st.integers(0, len(container) - 1))
        container[key], container[other] = container[other], container[key]
    elif op == "duplicate" and isinstance(container, list):
        container.append(copy.deepcopy(value))
    return raw


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_mutations_only_raise_data_error(media_root, data):
    raw = copy.deepcopy(data.draw(st.sampled_from(BASES))())
    for _ in range(data.draw(st.integers(1, 3))):
        raw = _mutate_once(raw, data)
    try:
        sample = parse_sample(raw, 3)
    except DataError as e:
        assert e.category and e.index == 3
        return
    try:
        decoded = decode_sample(sample, media_root, num_frames=4, image_size=16)
    except DataError as e:
        assert e.category and e.index == 3 and e.sample_id == sample.id
        return
    assert decoded.frames.shape[1:] == (16, 16, 3)
    assert decoded.masks.shape[0] == decoded.mask_frame.shape[0] == decoded.mask_object.shape[0]


def test_unmutated_bases_decode(media_root):
    for base in BASES:
        sample = parse_sample(base(), 0)
        decoded = decode_sample(sample, media_root, num_frames=4, image_size=16)
        assert sorted(set(decoded.mask_object.tolist())) == list(range(sample.num_regions))
