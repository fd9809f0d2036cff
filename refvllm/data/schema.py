"""The seed's JSON format (VideoRefer) -> :class:`~refvllm.data.types.Sample`: every static rule, no media opened.

Contract:

    sample = parse_sample(raw, index, limits=DataLimits())   # raw: one decoded JSON value
                                                             # DataError(reason, index, id, category)

First rule, for every value of the sample wherever it came from (:func:`check_json_value`): at most
``limits.max_json_depth`` deep, every integer within int64, every float finite, every string valid Unicode (JSON's
``\\ud83d`` escapes make lone UTF-16 surrogates, which no tokenizer, file system or UTF-8 writer accepts), and no
turn text holding U+E000, the private-use character the processor builds its markers from.

A sample (docs/data-format.md has the full rules, error messages and categories)::

    {"id": 7, "video": "videos/a.mp4",                       # or "image": "images/b.jpg" (never both)
     "conversations": [{"from": "human", "value": "<video>\\nWhat is <region> doing?"},
                       {"from": "gpt", "value": "It jumps."}],
     "annotation": [{"12": {"segmentation": {"size": [720, 1280], "counts": "..."}}, "40": null}],
     "height": 720, "width": 1280,                           # optional; polygons use them
     ...any other key is kept in Sample.meta}

Normalisations (so later stages see one form): roles become 'user'/'assistant'; frame keys become ints (leading
zeros allowed, ``"0012"`` == 12); ``null`` frames are dropped; a missing ``<video>``/``<image>`` placeholder is
put at the start of the first human turn followed by a newline; a ``<video>`` placeholder of an image sample
(allowed because ``video`` may point at an image) is rewritten to ``<image>``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from refvllm.constants import IMAGE_PLACEHOLDER, REGION_PLACEHOLDER, RESERVED_CHARACTER, VIDEO_PLACEHOLDER
from refvllm.data.limits import DEFAULT_LIMITS, INT64_MAX, DataLimits
from refvllm.data.masks import segmentation_form
from refvllm.data.media import IMAGE_EXTENSIONS, check_media_path
from refvllm.data.types import Sample, Turn
from refvllm.errors import DataError

KNOWN_KEYS = ("id", "video", "image", "conversations", "annotation", "height", "width")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in (VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER,
                                                          REGION_PLACEHOLDER)))


def _err(message: str, category: str) -> DataError:
    return DataError(message, category=category)


def parse_sample(raw: Any, index: int, limits: DataLimits = DEFAULT_LIMITS) -> Sample:
    """Check one raw sample against every static rule of the format and return it typed and normalised.

    Raises DataError naming ``index`` and the sample's id (when it has a usable one) with a specific reason
    and a category key (docs/data-format.md).
    """
    if not isinstance(raw, dict):
        raise DataError(f"a sample must be a JSON object, got {_json_type(raw)}", index, None, "not_object")
    try:
        check_json_value(raw, limits.max_json_depth)
    except DataError as e:
        raise e.with_sample(index, None) from None
    sample_id = _sample_id(raw, index)
    try:
        return _parse(raw, index, sample_id, limits)
    except DataError as e:
        raise e.with_sample(index, sample_id) from None


def _parse(raw: dict, index: int, sample_id: str, limits: DataLimits) -> Sample:
    media, media_type = _media(raw)
    turns = _turns(raw.get("conversations"), "conversations" in raw)
    turns = _normalise_placeholders(turns, media_type)
    objects = _objects(raw.get("annotation"), media_type, limits)
    num_regions = sum(t.text.count(REGION_PLACEHOLDER) for t in turns)
    if num_regions != len(objects):
        raise _err(f"the conversation has {num_regions} {REGION_PLACEHOLDER} placeholder(s) but 'annotation' has "
                   f"{len(objects)} object(s); the k-th {REGION_PLACEHOLDER} names the k-th object",
                   "region_count")
    height, width = _size(raw)
    return Sample(index=index, id=sample_id, kind=f"{media_type}_referring" if objects else media_type,
                  media=media, media_type=media_type, turns=turns, objects=objects, height=height, width=width,
                  meta={k: v for k, v in raw.items() if k not in KNOWN_KEYS})


def check_json_value(value: Any, max_depth: int) -> None:
    """DataError (category ``limit`` or ``text_encoding``) unless ``value`` is at most ``max_depth`` deep, every
    int fits int64, every float is finite and every string (dict keys too) is valid Unicode.

    The check recurses at most ``max_depth`` levels (it stops at the first level too deep), with the scalar
    tests inlined, since it runs on every sample; the path of the first bad value is only worked out when there
    is one (:func:`_find_bad_value`).
    """
    container = type(value) in (dict, list)
    if not _values_ok(value, 1, max_depth) if container else _bad_scalar(value):
        _raise_bad_value(value, max_depth)


def _values_ok(node: dict | list, depth: int, max_depth: int) -> bool:
    """True when ``node`` (at ``depth``) and everything in it pass :func:`check_json_value`."""
    if depth > max_depth:
        return False
    if type(node) is dict:
        if not "".join(node).isascii() and not all(valid_unicode(k) for k in node):  # keys: one C-level test
            return False
        items = node.values()
    else:
        items = node
    for v in items:
        t = type(v)
        if t is str:
            if not v.isascii() and not valid_unicode(v):
                return False
        elif t is float:
            if v - v != 0.0:  # inf - inf and nan - nan are nan: the fastest finiteness test in Python
                return False
        elif t is int:
            if not -INT64_MAX - 1 <= v <= INT64_MAX:
                return False
        elif (t is dict or t is list) and not _values_ok(v, depth + 1, max_depth):
            return False
    return True


def _bad_scalar(v: Any) -> bool:
    t = type(v)
    if t is str:
        return not v.isascii() and not valid_unicode(v)
    if t is int:
        return not -INT64_MAX - 1 <= v <= INT64_MAX
    return t is float and not math.isfinite(v)


def raw_sample_id(raw: Any) -> str | None:
    """The id of a raw (maybe invalid) sample as printable text, when it has a string or integer id: lone
    surrogates escaped, integers beyond 30 digits summarised. For messages about samples that failed."""
    value = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(value, str):
        return value if value.isascii() or valid_unicode(value) else ascii(value)[1:-1]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if abs(value) < 10 ** 30 else f"<integer of about {value.bit_length() * 0.30103:.0f} digits>"
    return None


def valid_unicode(text: str) -> bool:
    """False when ``text`` holds a lone UTF-16 surrogate (U+D800..U+DFFF), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raise_bad_value(value: Any, max_depth: int) -> None:
    """Raise the DataError that names the first value :func:`check_json_value` rejects, with its JSON path."""
    path, bad, what = _find_bad_value(value, max_depth)
    if what == "depth":
        raise DataError(f"the sample's JSON is nested more than data.limits.max_json_depth={max_depth} deep "
                        f"(at {path})", category="limit")
    if what == "key" or isinstance(bad, str):
        name = "a key" if what == "key" else "text"
        raise DataError(f"{name} at {path} holds a lone UTF-16 surrogate (e.g. a caption cut in the middle of an "
                        f"emoji): {ascii(bad)[:60]}; text must be valid Unicode", category="text_encoding")
    if isinstance(bad, float):
        raise DataError(f"the number at {path} is {bad} (JSON numbers must be finite)", category="limit")
    raise DataError(f"the integer at {path} has {len(str(abs(bad)))} digits; integers must fit in 64 bits",
                    category="limit")


def _find_bad_value(value: Any, max_depth: int) -> tuple[str, Any, str]:
    """(JSON path like ``conversations[1].value``, the value, 'depth' | 'key' | 'scalar') of the first value
    :func:`check_json_value` rejects (the slow walk, run only when there is one)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, (dict, list)) and depth > max_depth:
            return path or "the top", v, "depth"
        if isinstance(v, dict):
            for k, item in v.items():
                where = f"{path}.{k}" if path else k
                if not valid_unicode(k):
                    return ascii(where), k, "key"
                stack.append((item, where, depth + 1))
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{j}]", depth + 1) for j, item in enumerate(v))
        elif _bad_scalar(v):
            return path or "the top", v, "scalar"
    raise AssertionError("check_json_value rejected a value _find_bad_value accepts")


def _json_type(v: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(v), type(v).__name__)


def _sample_id(raw: dict, index: int) -> str:
    """The sample's id as a string (str(index) when absent); DataError for ids that are not str/int."""
    value = raw.get("id")
    if value is None:
        return str(index)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"'id' must be a non-empty string or an integer, got {_json_type(value)}", index, None,
                    "bad_id")


# ---------------------------------------------------------------------------------------------- media


def _media(raw: dict) -> tuple[str, str]:
    """(relative path, 'video' | 'image'). A ``video`` key with an image extension is an image."""
    video, image = raw.get("video"), raw.get("image")
    if video is not None and image is not None:
        raise _err("the sample has both 'video' and 'image'; give exactly one", "both_media")
    if video is None and image is None:
        raise _err("the sample has neither 'video' nor 'image'", "no_media")
    key, path = ("video", video) if video is not None else ("image", image)
    if not isinstance(path, str):
        raise _err(f"'{key}' must be a path string, got {_json_type(path)}", "media_path")
    check_media_path(path)
    if key == "video" and path.lower().endswith(IMAGE_EXTENSIONS):
        return path, "image"
    return path, key


# ---------------------------------------------------------------------------------------------- conversation


def _turns(conversations: Any, present: bool) -> list[Turn]:
    """Typed turns: user first, strictly alternating, assistant last, every text non-empty."""
    if not present:
        raise _err("the sample has no 'conversations'", "conversation_format")
    if not isinstance(conversations, list):
        raise _err(f"'conversations' must be a list of turns, got {_json_type(conversations)}",
                   "conversation_format")
    if not conversations:
        raise _err("'conversations' is empty", "conversation_empty")
    turns = [_turn(i, t) for i, t in enumerate(conversations)]
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise _err(f"turn {i} is from the {_seed_role(turn.role)} but the {_seed_role(expected)} should speak "
                       "there (turns start with human and alternate human/gpt)", "conversation_order")
    if turns[-1].role != "assistant":
        raise _err("the conversation ends with a human turn; it must end with a gpt answer", "conversation_order")
    return turns


def _seed_role(role: str) -> str:
    return "human" if role == "user" else "gpt"


def _turn(i: int, turn: Any) -> Turn:
    if not isinstance(turn, dict):
        raise _err(f"turn {i} must be an object with 'from' and 'value', got {_json_type(turn)}",
                   "conversation_format")
    role = turn.get("from", turn.get("role"))
    if role is None:
        raise _err(f"turn {i} has no speaker ('from')", "unknown_speaker")
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise _err(f"turn {i} has unknown speaker {role!r:.40} (expected human/gpt or user/assistant)",
                   "unknown_speaker")
    text = turn["value"] if "value" in turn else turn.get("content")
    if not isinstance(text, str):
        raise _err(f"turn {i} text ('value') must be a string, got {_json_type(text)}", "conversation_format")
    if not text.strip():
        raise _err(f"turn {i} has empty text", "empty_turn")
    if RESERVED_CHARACTER in text:
        raise _err(f"turn {i} contains U+E000, a private-use character refvllm reserves for its placeholder "
                   "markers", "reserved_character")
    return Turn(ROLES[role.lower()], text)


def _normalise_placeholders(turns: list[Turn], media_type: str) -> list[Turn]:
    """One ``<video>``/``<image>`` (matching the media) in the first user turn; none in assistant turns."""
    own = VIDEO_PLACEHOLDER if media_type == "video" else IMAGE_PLACEHOLDER
    found: list[int] = []
    for i, turn in enumerate(turns):
        tags = _PLACEHOLDER.findall(turn.text)
        if turn.role == "assistant" and tags:
            category = "region_in_answer" if tags[0] == REGION_PLACEHOLDER else "placeholder"
            raise _err(f"turn {i} (gpt) contains {tags[0]}; placeholders belong in human turns", category)
        if media_type == "video" and IMAGE_PLACEHOLDER in tags:
            raise _err(f"turn {i} has {IMAGE_PLACEHOLDER} but the sample is a video; use {VIDEO_PLACEHOLDER}",
                       "placeholder")
        found += [i] * sum(tag != REGION_PLACEHOLDER for tag in tags)
    if len(found) > 1:
        raise _err(f"the conversation has {len(found)} {VIDEO_PLACEHOLDER}/{IMAGE_PLACEHOLDER} placeholders; "
                   "give at most one, in the first human turn", "placeholder")
    if found and found[0] != 0:
        raise _err(f"the {own} placeholder is in turn {found[0]}; it must be in the first human turn",
                   "placeholder")
    first = turns[0].text.replace(VIDEO_PLACEHOLDER, own) if found else f"{own}\n{turns[0].text}"
    return [Turn("user", first), *turns[1:]]


# ---------------------------------------------------------------------------------------------- annotation


def _objects(annotation: Any, media_type: str, limits: DataLimits) -> list[dict[int, Any]]:
    """``annotation`` -> one {frame index: segmentation} per object, null frames dropped, frames sorted."""
    if annotation is None:
        return []
    if not isinstance(annotation, list):
        raise _err(f"'annotation' must be a list with one object per {REGION_PLACEHOLDER}, got "
                   f"{_json_type(annotation)}", "annotation_format")
    if len(annotation) > limits.max_objects:
        raise _err(f"'annotation' has {len(annotation)} objects, more than data.limits.max_objects="
                   f"{limits.max_objects}", "limit")
    objects = [_object(k, obj, media_type) for k, obj in enumerate(annotation)]
    masks = sum(len(obj) for obj in objects)
    if masks > limits.max_masks:
        raise _err(f"the objects have {masks} masks together, more than data.limits.max_masks={limits.max_masks}",
                   "limit")
    return objects


def _object(k: int, obj: Any, media_type: str) -> dict[int, Any]:
    if not isinstance(obj, dict):
        raise _err(f"object {k} of 'annotation' must be an object mapping frame indices to "
                   f"{{'segmentation': ...}}, got {_json_type(obj)}", "annotation_format")
    if "segmentation" in obj:  # an image's object written without its frame key
        if media_type != "image":
            raise _err(f"object {k}: 'segmentation' must sit under a frame index key (e.g. \"0\")",
                       "annotation_format")
        obj = {"0": obj}
    frames: dict[int, Any] = {}
    seen: set[int] = set()
    for key, entry in obj.items():
        frame = _frame_index(k, key)
        if frame in seen:
            raise _err(f"object {k}: frame {frame} appears twice (keys written differently)", "frame_index")
        seen.add(frame)
        if media_type == "image" and frame != 0:
            raise _err(f"object {k}: frame {frame} of an image (an image has only frame 0)", "frame_index")
        seg = _segmentation(k, frame, entry)
        if seg is not None:
            segmentation_form(seg, where=f"object {k} frame {frame}")
            frames[frame] = seg
    if not frames:
        raise _err(f"object {k} has no mask: every frame's segmentation is null", "no_mask")
    return dict(sorted(frames.items()))


_MAX_FRAME_DIGITS = 9  # a frame index below 10^9 (a day of video at 10,000 fps); more digits are an error


def _try_int(key: Any) -> int | None:
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key) if len(key.lstrip("0")) <= _MAX_FRAME_DIGITS else None
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 10 ** _MAX_FRAME_DIGITS:
        return key
    return None


def _frame_index(k: int, key: Any) -> int:
    """A frame key as a non-negative int: decimal digits (leading zeros allowed) or an int."""
    frame = _try_int(key)
    if frame is None:
        text = str(key)
        if re.fullmatch(r"\s*-\d+\s*", text):
            raise _err(f"object {k}: frame index {text!r} is negative", "frame_index")
        if text.isascii() and text.isdigit():
            raise _err(f"object {k}: frame index {text[:20]}... ({len(text)} digits) is too large", "frame_index")
        raise _err(f"object {k}: frame key {text!r:.40} is not a frame index (a non-negative integer written as "
                   "a string, e.g. \"12\")", "frame_index")
    return frame


def _segmentation(k: int, frame: int, entry: Any) -> Any:
    """The segmentation of one frame entry (``{"segmentation": seg}`` or null); None = absent."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or "segmentation" not in entry:
        raise _err(f"object {k} frame {frame}: expected {{\"segmentation\": ...}} or null, got "
                   f"{_json_type(entry)}{' without a segmentation key' if isinstance(entry, dict) else ''}",
                   "annotation_format")
    return entry["segmentation"]


def _size(raw: dict) -> tuple[int | None, int | None]:
    """The sample's optional ``height``/``width`` (both or neither; positive integers)."""
    height, width = raw.get("height"), raw.get("width")
    if height is None and width is None:
        return None, None
    if height is None or width is None:
        raise _err("the sample gives only one of 'height' and 'width'; give both or neither", "sample_size")
    return _positive_int("height", height), _positive_int("width", width)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _err(f"'{name}' must be a positive integer, got {value!r:.40}", "sample_size")
    return value
