"""Evaluation files -> seed-format samples plus what scoring needs.

Three formats, all turned into the project's seed format (``conversations`` of ``human``/``gpt`` turns, the
last ``gpt`` turn being the reference answer, ``annotation`` one dict per object) so that one parser
(:func:`refvllm.data.schema.parse_sample`) checks them and one data path decodes them:

- ``seed``: the training format itself. The last turn must be the assistant's (the reference); earlier turns are
  the context. Optional keys per sample: ``type`` (question type), ``options`` (multiple choice), ``chance``
  and ``needs_region`` (written by the synthetic generator), ``frame_idx`` (for single-frame mode).
- ``bench-q`` (VideoRefer-Bench-Q): ``video`` (a frame folder or video file), ``Question`` (with ``<region>``
  placeholders), ``type``, ``options`` (``["(A) ...", ...]``), ``Answer`` (``"(A) ..."``), ``frame_idx``,
  ``annotation``. The prompt is the question, the options one per line and the instruction line
  (``data.prompt.choice_instruction`` of the checkpoint's config; default :data:`CHOICE_INSTRUCTION`).
- ``bench-d`` (VideoRefer-Bench-D): ``video``, ``caption`` (the reference description), ``frame_idx``,
  ``annotation`` (32 masked frames per object). The prompt asks to describe the ``<region>`` object(s).

- ``caption`` (region captioning, e.g. HC-STVG region captioning): ``video`` or ``image``, the reference
  ``caption`` (a string) or ``captions`` (a list of strings), and the objects as ``annotation`` or as
  ``boxes`` (per object ``{frame index: [x1, y1, x2, y2]}`` in pixels of ``height`` x ``width`` or of the
  media, each read as a 4-point polygon); optional ``question`` (the prompt, with one ``<region>`` per object;
  default: the Bench-D request), ``type``, ``frame_idx``. Scored by BLEU-4, ROUGE-L and CIDEr-D
  (:mod:`refvllm.eval.captioning`).

Mode ``multi`` keeps every mask of the annotation; mode ``single`` keeps, per object, only the mask at
``frame_idx`` (an object without a mask there is a bad sample).

A malformed entry never stops the reading: :func:`read_eval_file` returns it as a :class:`BadEntry` (index, id,
type when known, reason), and the evaluation reports and counts it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refvllm.config import PromptConfig
from refvllm.constants import IMAGE_PLACEHOLDER, REGION_PLACEHOLDER, VIDEO_PLACEHOLDER
from refvllm.errors import DataError

FORMATS = ("seed", "bench-q", "bench-d", "caption")
MODES = ("multi", "single")
CHOICE_INSTRUCTION = PromptConfig.choice_instruction  # the default of data.prompt.choice_instruction
DESCRIBE_TYPE = "description"  # the question type given to Bench-D and untyped caption entries
UNTYPED = "all"  # the type of seed samples that carry none


@dataclass
class EvalEntry:
    """One evaluation question in seed form.

    ``raw``: a seed-format sample dict (the last turn is the reference); ``reference``: the expected answer
    text; ``options``: option strings of a multiple-choice question, else None; ``chance`` / ``needs_region``:
    known facts about the question (None when unknown); ``extra``: fields copied to the predictions file.
    """

    index: int
    id: str
    type: str
    raw: dict[str, Any]
    reference: str
    options: list[str] | None = None
    chance: float | None = None
    needs_region: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadEntry:
    """An entry that cannot be evaluated: reported and counted, never silently dropped."""

    index: int
    id: str
    type: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "type": self.type, "reason": self.reason}


def load_records(path: str | Path) -> list[Any]:
    """The entries of a JSON array or a JSONL file (one object per line; blank lines skipped).

    Raises DataError naming the file (and the line for JSONL) when it cannot be read or parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"evaluation file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"'{path}' is not valid JSON: {e}") from None
        return data
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"'{path}' line {line_no} is not valid JSON: {e}") from None
    return records


def _frame_key(entry: dict[str, Any]) -> str:
    """``frame_idx`` as the annotation's string key ("3" for 3 or "3"); DataError when absent or not an integer."""
    if "frame_idx" not in entry:
        raise DataError("single-frame mode needs 'frame_idx'")
    value = entry["frame_idx"]
    try:
        number = int(value)
        if isinstance(value, bool) or (isinstance(value, float) and value != number) or number < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"'frame_idx' must be a non-negative integer, got {value!r}") from None
    return str(number)


def _int_key(frame: Any) -> str:
    text = str(frame).strip()
    return str(int(text)) if text.isdigit() else text


def select_mode(annotation: Any, entry: dict[str, Any], mode: str) -> Any:
    """The annotation for ``mode``: unchanged for ``multi``; for ``single`` each object keeps only ``frame_idx``."""
    if mode == "multi":
        return annotation
    key = _frame_key(entry)
    if not isinstance(annotation, list):
        raise DataError(f"'annotation' must be a list of objects, got {type(annotation).__name__}")
    single = []
    for k, obj in enumerate(annotation):
        if not isinstance(obj, dict):
            raise DataError(f"object {k} of 'annotation' must map frame indices to masks, got {obj!r:.60}")
        # "03" and "3" name the same frame; keep the file's own key so the parser sees what the file says
        frames = {_int_key(f): (f, v) for f, v in obj.items()}
        if key not in frames:
            raise DataError(f"object {k} has no mask at frame_idx {key} (single-frame mode)")
        file_key, seg = frames[key]
        if seg is None or (isinstance(seg, dict) and seg.get("segmentation") is None):
            raise DataError(f"object {k} has no mask at frame_idx {key} (single-frame mode)")
        single.append({file_key: seg})
    return single


def _require(entry: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataError(f"missing key(s) {', '.join(repr(k) for k in missing)}")


def _seed_raw(entry: dict[str, Any], prompt: str, answer: str, annotation: Any, media: str = "video"
              ) -> dict[str, Any]:
    """A seed-format sample: one human turn (media placeholder + prompt) and the reference as the gpt turn."""
    placeholder = VIDEO_PLACEHOLDER if media == "video" else IMAGE_PLACEHOLDER
    raw = {"id": entry.get("id"), media: entry[media], "annotation": annotation, "conversations": [
        {"from": "human", "value": f"{placeholder}\n{prompt}"},
        {"from": "gpt", "value": answer},
    ]}
    for key in ("height", "width"):
        if key in entry:
            raw[key] = entry[key]
    return raw


def choice_prompt(question: str, options: list[str], instruction: str = CHOICE_INSTRUCTION) -> str:
    """Question, the options one per line, and the instruction line (none when empty)."""
    return "\n".join([question.strip(), *[str(o).strip() for o in options], *([instruction] if instruction else [])])


def describe_prompt(num_objects: int, media: str = "video") -> str:
    """The Bench-D request: describe the highlighted object(s), one ``<region>`` per object."""
    where = "video" if media == "video" else "image"
    if num_objects == 1:
        return f"Please give a detailed description of the highlighted object {REGION_PLACEHOLDER} in the {where}."
    regions = ", ".join([REGION_PLACEHOLDER] * num_objects)
    return f"Please give a detailed description of the highlighted objects {regions} in the {where}."


def _check_options(options: Any) -> list[str]:
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise DataError(f"'options' must be a list of at least two strings, got {options!r}")
    return options


def bench_q_entry(entry: dict[str, Any], index: int, mode: str,
                  instruction: str = CHOICE_INSTRUCTION) -> EvalEntry:
    """A VideoRefer-Bench-Q entry as an :class:`EvalEntry` (chance = 1 / number of options)."""
    _require(entry, ("video", "Question", "options", "Answer", "annotation"))
    options = _check_options(entry["options"])
    prompt = choice_prompt(str(entry["Question"]), options, instruction)
    raw = _seed_raw(entry, prompt, str(entry["Answer"]), select_mode(entry["annotation"], entry, mode))
    qtype = _type_of(entry)
    extra = {"video": entry["video"], "Answer": entry["Answer"], "frame_idx": entry.get("frame_idx")}
    return EvalEntry(index, _entry_id(entry, index), qtype, raw, str(entry["Answer"]), options,
                     chance=1.0 / len(options), needs_region=True, extra=extra)


def bench_d_entry(entry: dict[str, Any], index: int, mode: str) -> EvalEntry:
    """A VideoRefer-Bench-D entry as an :class:`EvalEntry`; the reference is its ``caption``."""
    _require(entry, ("video", "caption", "annotation"))
    annotation = select_mode(entry["annotation"], entry, mode)
    if not isinstance(annotation, list) or not annotation:
        raise DataError("'annotation' must be a non-empty list of objects")
    raw = _seed_raw(entry, describe_prompt(len(annotation)), str(entry["caption"]), annotation)
    extra = {"video": entry["video"], "caption": entry["caption"], "frame_idx": entry.get("frame_idx")}
    return EvalEntry(index, _entry_id(entry, index), DESCRIBE_TYPE, raw, str(entry["caption"]), None,
                     needs_region=True, extra=extra)


def _box_annotation(boxes: Any) -> list[dict[str, Any]]:
    """``boxes`` (per object ``{frame: [x1, y1, x2, y2]}``) as seed annotation objects of 4-point polygons."""
    if not isinstance(boxes, list) or not boxes:
        raise DataError("'boxes' must be a non-empty list of objects, each {frame index: [x1, y1, x2, y2]}")
    annotation = []
    for k, obj in enumerate(boxes):
        if not isinstance(obj, dict) or not obj:
            raise DataError(f"object {k} of 'boxes' must map frame indices to [x1, y1, x2, y2]")
        frames = {}
        for frame, box in obj.items():
            numbers = isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
            if not numbers or box[2] <= box[0] or box[3] <= box[1]:
                raise DataError(f"object {k} frame {frame}: a box must be [x1, y1, x2, y2] with x2 > x1, y2 > y1; "
                                f"got {box!r:.80}")
            x1, y1, x2, y2 = (float(v) for v in box)
            frames[str(frame)] = {"segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]}
        annotation.append(frames)
    return annotation


def _captions(entry: dict[str, Any]) -> list[str]:
    refs = entry["captions"] if "captions" in entry else [entry.get("caption")]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise DataError("'caption' must be a non-empty string, or 'captions' a non-empty list of them")
    return refs


def caption_entry(entry: dict[str, Any], index: int, mode: str) -> EvalEntry:
    """A region-captioning entry as an :class:`EvalEntry`: the reference is its first caption, all of them are
    kept for the corpus metrics (``extra["captions"]``)."""
    media = "video" if "video" in entry else "image"
    _require(entry, (media,))
    if ("annotation" in entry) == ("boxes" in entry):
        raise DataError("a caption entry needs its objects as 'annotation' or as 'boxes' (one of the two)")
    refs = _captions(entry)
    annotation = entry["annotation"] if "annotation" in entry else _box_annotation(entry["boxes"])
    annotation = select_mode(annotation, entry, mode)
    if not isinstance(annotation, list) or not annotation:
        raise DataError("'annotation' must be a non-empty list of objects")
    question = entry.get("question")
    if question is not None and (not isinstance(question, str) or
                                 question.count(REGION_PLACEHOLDER) != len(annotation)):
        raise DataError(f"'question' must be a string with one {REGION_PLACEHOLDER} per object "
                        f"({len(annotation)}); got {question!r:.80}")
    prompt = question or describe_prompt(len(annotation), media)
    raw = _seed_raw(entry, prompt, refs[0], annotation, media)
    extra = {media: entry[media], "captions": refs, "frame_idx": entry.get("frame_idx")}
    qtype = DESCRIBE_TYPE if entry.get("type") is None else str(entry["type"])
    return EvalEntry(index, _entry_id(entry, index), qtype, raw, refs[0], None, needs_region=True, extra=extra)


def seed_entry(entry: dict[str, Any], index: int, mode: str) -> EvalEntry:
    """A seed-format sample as an :class:`EvalEntry`: the last (assistant) turn is the reference."""
    _require(entry, ("conversations",))
    turns = entry["conversations"]
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict) or turns[-1].get("from") != "gpt":
        raise DataError("an evaluation sample's last turn must be the assistant's ('gpt') reference answer")
    raw = dict(entry)
    if "annotation" in entry:
        raw["annotation"] = select_mode(entry["annotation"], entry, mode)
    elif mode == "single":
        raise DataError("single-frame mode needs an 'annotation'")
    options = _check_options(entry["options"]) if "options" in entry else None
    chance = entry.get("chance")
    is_number = isinstance(chance, (int, float)) and not isinstance(chance, bool)
    if chance is not None and not (is_number and 0 <= chance <= 1):
        raise DataError(f"'chance' must be a number in [0, 1], got {chance!r}")
    needs_region = entry.get("needs_region")
    if needs_region is not None and not isinstance(needs_region, bool):
        raise DataError(f"'needs_region' must be true or false, got {needs_region!r}")
    if chance is None and options:
        chance = 1.0 / len(options)
    return EvalEntry(index, _entry_id(entry, index), _type_of(entry), raw, str(turns[-1].get("value")),
                     options, chance=chance, needs_region=needs_region)


_READERS = {"seed": seed_entry, "bench-q": bench_q_entry, "bench-d": bench_d_entry, "caption": caption_entry}


def _type_of(entry: dict[str, Any]) -> str:
    return UNTYPED if entry.get("type") is None else str(entry["type"])


def _entry_id(entry: dict[str, Any], index: int) -> str:
    return str(entry["id"]) if entry.get("id") is not None else str(index)


def to_entry(record: Any, index: int, fmt: str, mode: str,
             choice_instruction: str = CHOICE_INSTRUCTION) -> EvalEntry | BadEntry:
    """One file record as an EvalEntry, or a BadEntry with the reason (never raises DataError)."""
    if not isinstance(record, dict):
        return BadEntry(index, str(index), None, f"entry must be a JSON object, got {type(record).__name__}")
    try:
        reader = _READERS[fmt]
        entry = (reader(record, index, mode, choice_instruction) if reader is bench_q_entry
                 else reader(record, index, mode))
    except DataError as e:
        qtype = DESCRIBE_TYPE if fmt == "bench-d" or (fmt == "caption" and record.get("type") is None) \
            else record.get("type")
        return BadEntry(index, _entry_id(record, index), None if qtype is None else str(qtype), e.reason)
    entry.raw["id"] = entry.id
    return entry


def read_eval_file(path: str | Path, fmt: str, mode: str,
                   choice_instruction: str = CHOICE_INSTRUCTION) -> list[EvalEntry | BadEntry]:
    """Every entry of ``path`` in ``fmt`` (:data:`FORMATS`) and ``mode`` ('multi' | 'single');
    ``choice_instruction``: the line after a multiple-choice question's options (``data.prompt``)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown evaluation format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if mode not in MODES:
        raise DataError(f"unknown mask mode {mode!r}; choose one of {', '.join(MODES)}")
    records = load_records(path)
    if not isinstance(records, list):
        raise DataError(f"'{path}' must hold a JSON array or JSON lines")
    return [to_entry(record, i, fmt, mode, choice_instruction) for i, record in enumerate(records)]
