"""The seed's JSON format (VideoRefer) -> :class:`~refvllm.data.types.Sample`: every static rule, no media opened.

Contract:

    sample = parse_sample(raw, index)     # raw: one decoded JSON value; DataError(reason, index, id, category)

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

from refvllm.constants import IMAGE_PLACEHOLDER, REGION_PLACEHOLDER, VIDEO_PLACEHOLDER
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


def parse_sample(raw: Any, index: int) -> Sample:
    """Check one raw sample against every static rule of the format and return it typed and normalised.

    Raises DataError naming ``index`` and the sample's id (when it has a usable one) with a specific reason
    and a category key (docs/data-format.md).
    """
    if not isinstance(raw, dict):
        raise DataError(f"a sample must be a JSON object, got {_json_type(raw)}", index, None, "not_object")
    sample_id = _sample_id(raw, index)
    try:
        return _parse(raw, index, sample_id)
    except DataError as e:
        raise e.with_sample(index, sample_id) from None


def _parse(raw: dict, index: int, sample_id: str) -> Sample:
    media, media_type = _media(raw)
    turns = _turns(raw.get("conversations"), "conversations" in raw)
    turns = _normalise_placeholders(turns, media_type)
    objects = _objects(raw.get("annotation"), media_type)
    num_regions = sum(t.text.count(REGION_PLACEHOLDER) for t in turns)
    if num_regions != len(objects):
        raise _err(f"the conversation has {num_regions} {REGION_PLACEHOLDER} placeholder(s) but 'annotation' has "
                   f"{len(objects)} object(s); the k-th {REGION_PLACEHOLDER} names the k-th object",
                   "region_count")
    height, width = _size(raw)
    return Sample(index=index, id=sample_id, kind=f"{media_type}_referring" if objects else media_type,
                  media=media, media_type=media_type, turns=turns, objects=objects, height=height, width=width,
                  meta={k: v for k, v in raw.items() if k not in KNOWN_KEYS})


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


def _objects(annotation: Any, media_type: str) -> list[dict[int, Any]]:
    """``annotation`` -> one {frame index: segmentation} per object, null frames dropped, frames sorted."""
    if annotation is None:
        return []
    if not isinstance(annotation, list):
        raise _err(f"'annotation' must be a list with one object per {REGION_PLACEHOLDER}, got "
                   f"{_json_type(annotation)}", "annotation_format")
    return [_object(k, obj, media_type) for k, obj in enumerate(annotation)]


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


def _try_int(key: Any) -> int | None:
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    return None


def _frame_index(k: int, key: Any) -> int:
    """A frame key as a non-negative int: decimal digits (leading zeros allowed) or an int."""
    frame = _try_int(key)
    if frame is None:
        text = str(key)
        if re.fullmatch(r"\s*-\d+\s*", text):
            raise _err(f"object {k}: frame index {text!r} is negative", "frame_index")
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
