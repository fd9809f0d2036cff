"""Text and tensors of one sample: chat template, placeholder expansion, labels, normalised pixels.

Contract (docs/architecture.md, "One processed sample"):

    proc = Processor.from_config(cfg)              # or Processor(tokenizer, layout, spec, max_length, ...)
    item = proc.encode(decoded)                    # training: input_ids, labels, pixel_values, region_*, ...
    item = proc.encode_prompt(decoded)             # generation: the prompt up to the last user turn + reference

How the text is built, robustly for any tokenizer and chat template:

1. In each turn's text, ``<video>``/``<image>`` and ``<region>`` are replaced by marker strings made of a
   private-use character (U+E000) that no tokenizer merges with anything, because the markers are cut out
   before tokenising; every turn's content is wrapped in begin/end markers the same way (answer markers for
   the assistant contents that are learned, text markers for the rest).
2. The conversation is rendered with ``tokenizer.apply_chat_template(messages, tokenize=False)``.
3. The rendered string is split at the markers; each text piece is tokenised on its own
   (``add_special_tokens=False``: the template already wrote every special token). Pieces of the sample's own
   text are tokenised with ``split_special_tokens=True``: text from data never becomes a special token, so an
   answer holding ``<|im_end|>\n<|im_start|>user`` cannot forge a turn (it is read as the characters it is);
   only the template's own pieces can hold special tokens. Each placeholder
   marker becomes a run of sentinel ids: ``TokenLayout.num_visual_tokens(F)`` x ``VISUAL_TOKEN_ID`` and, for
   the k-th ``<region>``, ``TokenLayout.num_region_tokens(len(plan.object_frames[k]))`` x ``REGION_TOKEN_ID``.
4. Labels are the assistant contents' tokens plus the template's tokens after each content up to and
   including the first special token (the end-of-turn token, e.g. ``<|im_end|>`` or ``<|eot_id|>``);
   -100 everywhere else (system, user turns, assistant headers, sentinels).

Because every assistant content is a piece of its own, no token straddles a header/content boundary, and the
prompt built by :meth:`Processor.encode_prompt` (``add_generation_prompt=True``) tokenises exactly like the
prefix of the training sequence. Pieces are tokenised independently, which is exact for byte-level BPE
tokenizers (Qwen2.x, Llama-3, GPT-style); a tokenizer that prepends a dummy space to every call (Llama-2's
legacy sentencepiece) gets a space token after each placeholder, as in LLaVA.

A visual placeholder is expected once, in a user turn; when the sample has frames and no user turn holds one,
it is put at the start of the first user turn followed by a newline (LLaVA's convention). ``<objectN>`` text
before ``<region>`` stays text. A sample longer than ``max_length`` after expansion is rejected with a
:class:`~refvllm.errors.DataError`, never cut. The processor opens no files except the tokenizer's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from refvllm.config import Config
from refvllm.constants import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    REGION_PLACEHOLDER,
    REGION_TOKEN_ID,
    RESERVED_CHARACTER,
    VIDEO_PLACEHOLDER,
    VISUAL_TOKEN_ID,
)
from refvllm.data.collate import Collator, batch_frames
from refvllm.data.decode import FrameSize
from refvllm.data.types import DecodedSample, Sample, Turn
from refvllm.errors import ConfigError, DataError
from refvllm.layout import TokenLayout, VisualSpec, load_visual_spec, make_token_layout

_RESERVED = RESERVED_CHARACTER  # markers are built from it, so sample text may not contain it (schema.py)
_VIS = _RESERVED + "V" + _RESERVED
_REG = _RESERVED + "R" + _RESERVED
_ANS_BEGIN = _RESERVED + "A" + _RESERVED
_ANS_END = _RESERVED + "E" + _RESERVED
_TXT_BEGIN = _RESERVED + "T" + _RESERVED  # content that is not learned (user turns, prompt-side answers)
_TXT_END = _RESERVED + "U" + _RESERVED
_MARKER_SPLIT = re.compile("(" + "|".join(re.escape(m) for m in (_VIS, _REG, _ANS_BEGIN, _ANS_END, _TXT_BEGIN,
                                                                   _TXT_END)) + ")")
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in (VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER, REGION_PLACEHOLDER)))


@dataclass
class _Marked:
    """Chat messages with markers in place of placeholders, and what the markers stand for."""

    messages: list[dict[str, str]]
    num_visual: int  # visual markers inserted (0 or 1)
    num_regions: int  # region markers inserted (objects 0..num_regions-1, in order)
    num_answers: int  # assistant contents wrapped in answer markers
    num_texts: int  # other contents wrapped in text markers


class Processor:
    """Turns a :class:`DecodedSample` into the model's tensors (see the module docstring).

    ``num_frames`` and ``mask_resize`` are not used by the processor itself; they are the decode settings that
    go with it (the dataset and inference read them from here so that both decode like training did).
    """

    # What a <region> placeholder becomes around its tokens (data.prompt.region; families.make_processor sets
    # it from the config): "{region}" marks the tokens.
    region_format = "{region}"

    @property
    def _region_text(self) -> str:
        return self.region_format.replace("{region}", _REG)

    def __init__(self, tokenizer, layout: TokenLayout, spec: VisualSpec, max_length: int, num_frames: int,
                 mask_resize: str):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"the tokenizer of '{tokenizer.name_or_path}' has no chat template (model.llm_path)")
        self.tokenizer = tokenizer
        self.layout = layout
        self.spec = spec
        self.max_length = max_length
        self.num_frames = num_frames
        self.mask_resize = mask_resize
        self._special_ids = _special_token_ids(tokenizer)
        # (x / 255 - mean) / std as one multiply-add per element: x * scale + bias
        std = torch.tensor(spec.std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, 3, 1, 1)
        self._bias = (-torch.tensor(spec.mean, dtype=torch.float64) / std).to(torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, cfg: Config) -> Processor:
        """The tokenizer of ``model.llm_path`` (AutoTokenizer), the vision tower's spec and the token layout.
        Both paths may be local directories or hub ids (resolved like transformers does, see refvllm.hub)."""
        from transformers import AutoTokenizer

        from refvllm.hub import check_model, config_revision, first_line

        spec = load_visual_spec(cfg.model)
        path, revision = cfg.model.llm_path, config_revision(cfg.model, "llm")
        check_model(path, "model.llm_path", revision)  # one clear line for an id neither here nor on the hub
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code,
                                                      revision=revision)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.llm_path: cannot load a tokenizer from '{path}': {first_line(e)}") from None
        return cls(tokenizer, make_token_layout(cfg.model, spec), spec, cfg.data.max_length, cfg.data.num_frames,
                   cfg.data.mask_resize)

    def save_pretrained(self, out) -> None:
        """The files another process needs to tokenise like this one (the tokenizer, its chat template)."""
        self.tokenizer.save_pretrained(str(out))

    @property
    def frame_size(self) -> FrameSize:
        """The frame size decoding must produce for this processor: the tower's square ``image_size`` here
        (a pretrained VLM's processor keeps the aspect ratio)."""
        return FrameSize(side=self.spec.image_size)

    @property
    def pad_token_id(self) -> int:
        """Id used to pad ``input_ids``: the tokenizer's pad token, else its eos token.

        Padded positions are masked out (attention 0, label -100), so any valid id is correct; the eos is used
        only for tokenizers that define no pad token (e.g. Llama-3).
        """
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        if pad is None:
            raise ConfigError(f"the tokenizer of '{self.tokenizer.name_or_path}' has neither a pad nor an eos token")
        return int(pad)

    # ------------------------------------------------------------------ batches

    # The visual part of a batch of this processor's items (refvllm.data.collate's module docstring).
    batch_visuals = staticmethod(batch_frames)

    def collator(self, padding_side: str = "right") -> Collator:
        """The picklable collate function of this processor's items (a DataLoader's ``collate_fn``)."""
        return Collator(self.pad_token_id, padding_side, self.batch_visuals)

    def collate(self, items: list, padding_side: str = "right") -> dict:
        """Items of :meth:`encode` / :meth:`encode_prompt` (or Skipped records) as one batch."""
        return self.collator(padding_side)(items)

    def dummy_item(self) -> dict:
        """A text-only item with no label token (two pad ids): the trainer's stand-in for a micro-batch whose
        samples were all skipped. Its loss is exactly zero; the model's zero-weighted dummy path still runs
        every trainable module, so the process takes part in the gradient all-reduce (DDP) and the micro-step
        count (DeepSpeed)."""
        size, pad = self.spec.image_size, self.pad_token_id
        no_rows = torch.zeros(0, dtype=torch.long)
        return {"input_ids": torch.tensor([pad, pad]), "labels": torch.tensor([IGNORE_INDEX, IGNORE_INDEX]),
                "pixel_values": torch.zeros(0, 3, size, size),
                "region_masks": torch.zeros(0, size, size, dtype=torch.bool),
                "region_frame_index": no_rows, "region_object_index": no_rows, "num_objects": 0, "sample_index": -1,
                "sample_id": "<dummy>"}

    # ------------------------------------------------------------------ public API

    def encode(self, decoded: DecodedSample) -> dict:
        """One training sample (docs/architecture.md, "One processed sample").

        Returns ``input_ids`` long [L], ``labels`` long [L], ``pixel_values`` float32 [F, 3, S, S],
        ``region_masks`` bool [M, S, S], ``region_frame_index`` long [M] (0..F-1), ``region_object_index``
        long [M] (0..O-1), ``num_objects`` int O, ``sample_index`` int, ``sample_id`` str.
        Raises DataError (naming the sample) when the text does not fit ``max_length`` or the conversation
        does not match the decoded sample, or when it has no assistant turn to learn from.
        """
        sample = decoded.sample
        marked = self._mark(sample, sample.turns, decoded.frames.shape[0], with_answers=True)
        if marked.num_regions != len(decoded.plan.object_frames):
            raise _error(sample, f"{marked.num_regions} {REGION_PLACEHOLDER} placeholders but "
                                 f"{len(decoded.plan.object_frames)} objects", "region_count")
        if marked.num_answers == 0:
            raise _error(sample, "the conversation has no assistant turn to learn from", "conversation_order")
        input_ids, labels = self._tokenize(decoded, marked, add_generation_prompt=False)
        return {"input_ids": input_ids, "labels": labels, **self._visual_tensors(decoded, marked.num_regions),
                "sample_index": sample.index, "sample_id": sample.id}

    def encode_prompt(self, decoded: DecodedSample, turn: int | None = None) -> dict:
        """The generation prompt for the user turn ``sample.turns[turn]`` (default: the last user turn).

        The prompt is ``turns[:turn + 1]`` (earlier assistant turns as written) rendered with
        ``add_generation_prompt=True``. Only the objects whose ``<region>`` occurs in those turns are kept
        (objects are numbered by first mention, so they are objects 0..O'-1), so the prompt's region tokens
        match its masks. Returns the keys of :meth:`encode` without ``labels``, plus ``reference``: the text
        of the assistant turn that answers ``turn`` in the sample, or None. Items batch with
        ``collate(items, pad_id, padding_side="left")``.
        """
        sample = decoded.sample
        turn = _prompt_turn(sample, turn)
        turns = sample.turns[: turn + 1]
        marked = self._mark(sample, turns, decoded.frames.shape[0], with_answers=False)
        if marked.num_regions > len(decoded.plan.object_frames):
            raise _error(sample, f"{marked.num_regions} {REGION_PLACEHOLDER} placeholders but "
                                 f"{len(decoded.plan.object_frames)} objects", "region_count")
        input_ids, _ = self._tokenize(decoded, marked, add_generation_prompt=True)
        after = sample.turns[turn + 1] if turn + 1 < len(sample.turns) else None
        reference = after.text if after is not None and after.role == "assistant" else None
        return {"input_ids": input_ids, **self._visual_tensors(decoded, marked.num_regions),
                "sample_index": sample.index, "sample_id": sample.id, "reference": reference}

    def estimate_tokens(self, sample: Sample) -> int:
        """The length :meth:`encode` would give ``sample``, from its JSON alone (no media opened): the text
        tokens exactly (rendered and tokenised as in training), the visual and region tokens for the planned
        frame count ``num_frames`` (1 for an image; a shorter video gets fewer, so this is an upper bound
        there). The token-budget batcher (``train.max_tokens``) groups samples by it. DataError as encode."""
        frames = self.num_frames if sample.media_type == "video" else 1
        marked = self._mark(sample, sample.turns, frames, with_answers=True)
        pieces = _MARKER_SPLIT.split(self._render(sample, marked, add_generation_prompt=False))
        texts, markers = pieces[0::2], [None, *pieces[1::2]]
        text = sum(len(t) for t in self._tokenize_pieces(texts, _content_pieces(markers)))
        regions = sum(self.layout.num_region_tokens(min(len(obj), frames))
                      for obj in sample.objects[: marked.num_regions])
        return text + self.planned_visual_tokens(sample, frames) + regions

    def planned_visual_tokens(self, sample: Sample, num_frames: int) -> int:
        """Ids the visual placeholder of ``sample`` becomes for ``num_frames`` planned frames (the count
        :meth:`_visual_ids` gives once the media are decoded)."""
        return self.layout.num_visual_tokens(num_frames)

    # ------------------------------------------------------------------ text

    def _mark(self, sample: Sample, turns: list[Turn], num_frames: int, with_answers: bool) -> _Marked:
        """Chat messages with placeholders replaced by markers (and assistant contents wrapped in markers)."""
        messages, num_visual, num_regions, num_answers, num_texts = [], 0, 0, 0, 0
        for i, turn in enumerate(turns):
            if _RESERVED in turn.text:
                raise _error(sample, f"turn {i} contains the reserved character U+E000", "reserved_character")
            found = _PLACEHOLDER.findall(turn.text)
            if found and turn.role != "user":
                category = "region_in_answer" if found[0] == REGION_PLACEHOLDER else "placeholder"
                raise _error(sample, f"turn {i} ({turn.role}) contains {found[0]}; placeholders belong in user turns",
                             category)
            num_regions += found.count(REGION_PLACEHOLDER)
            num_visual += len(found) - found.count(REGION_PLACEHOLDER)
            text = _PLACEHOLDER.sub(lambda m: self._region_text if m.group(0) == REGION_PLACEHOLDER else _VIS,
                                    turn.text)
            if with_answers and turn.role == "assistant":
                text, num_answers = _ANS_BEGIN + text + _ANS_END, num_answers + 1
            else:
                text, num_texts = _TXT_BEGIN + text + _TXT_END, num_texts + 1
            messages.append({"role": turn.role, "content": text})
        if num_visual > 1:
            raise _error(sample, f"{num_visual} {VIDEO_PLACEHOLDER}/{IMAGE_PLACEHOLDER} placeholders; at most one",
                         "placeholder")
        if num_visual == 1 and num_frames == 0:
            raise _error(sample, f"a {VIDEO_PLACEHOLDER}/{IMAGE_PLACEHOLDER} placeholder but no frames", "placeholder")
        if num_visual == 0 and num_frames > 0:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise _error(sample, "the conversation has no user turn", "conversation_order")
            first_user["content"] = _VIS + "\n" + first_user["content"]
            num_visual = 1
        return _Marked(messages, num_visual, num_regions, num_answers, num_texts)

    def _render(self, sample: Sample, marked: _Marked, add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(marked.messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except TemplateError as e:  # templates reject e.g. non-alternating roles with raise_exception
            raise _error(sample, f"the chat template rejected the conversation: {e}", "chat_template") from None
        expected = {_VIS: marked.num_visual, _REG: marked.num_regions, _ANS_BEGIN: marked.num_answers,
                    _ANS_END: marked.num_answers, _TXT_BEGIN: marked.num_texts, _TXT_END: marked.num_texts}
        for marker, count in expected.items():
            if text.count(marker) != count:
                raise ConfigError(f"the chat template of '{self.tokenizer.name_or_path}' did not keep every "
                                  f"message's content once (found {text.count(marker)} of {count} markers)")
        return text

    def _tokenize(self, decoded: DecodedSample, marked: _Marked,
                  add_generation_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Render, split at the markers, tokenise the pieces, insert sentinel runs, label the answers.

        Returns ``input_ids`` long [L] and ``labels`` long [L] (all -100 without answers).
        """
        sample = decoded.sample
        pieces = _MARKER_SPLIT.split(self._render(sample, marked, add_generation_prompt))
        texts, markers = pieces[0::2], [None, *pieces[1::2]]  # re.split with one group: text, marker, ..., text
        token_lists = self._tokenize_pieces(texts, _content_pieces(markers))
        ids: list[int] = []
        labels: list[int] = []
        region, in_answer, want_end = 0, False, False
        for marker, tokens in zip(markers, token_lists, strict=True):
            if marker == _VIS:
                visual = self._visual_ids(decoded)
                ids += visual
                labels += [IGNORE_INDEX] * len(visual)
            elif marker == _REG:
                n = self.layout.num_region_tokens(len(decoded.plan.object_frames[region]))
                ids += [REGION_TOKEN_ID] * n
                labels += [IGNORE_INDEX] * n
                region += 1
            elif marker == _ANS_BEGIN:
                in_answer, want_end = True, False
            elif marker == _ANS_END:
                in_answer, want_end = False, True
            ids += tokens
            if in_answer:
                labels += tokens
            elif want_end:  # the template's text right after an answer
                labels += self._label_through_end_token(tokens)
                want_end = False
            else:
                labels += [IGNORE_INDEX] * len(tokens)
        if len(ids) > self.max_length:
            raise _error(sample, f"{len(ids)} tokens > max_length {self.max_length}", "too_long")
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def _visual_ids(self, decoded: DecodedSample) -> list[int]:
        """The ids the visual placeholder becomes: ``TokenLayout.num_visual_tokens(F)`` sentinels, which the
        model fills with projector rows (a pretrained VLM's processor writes the VLM's own ids)."""
        return [VISUAL_TOKEN_ID] * self.layout.num_visual_tokens(decoded.frames.shape[0])

    def _tokenize_pieces(self, texts: list[str], content: list[bool]) -> list[list[int]]:
        """Token ids of each piece: the sample's own text (``content``) with special-token strings split into
        ordinary tokens, the template's pieces as usual."""
        out: list[list[int]] = [[] for _ in texts]
        for is_content in (False, True):
            which = [k for k, c in enumerate(content) if c == is_content and texts[k]]
            if which:
                ids = self.tokenizer([texts[k] for k in which], add_special_tokens=False,
                                     split_special_tokens=is_content)["input_ids"]
                for k, tokens in zip(which, ids, strict=True):
                    out[k] = tokens
        return out

    def _label_through_end_token(self, tokens: list[int]) -> list[int]:
        """Labels of the piece after an answer: its tokens up to and including the first special token.

        Tokens between the content and that token (e.g. a newline some templates write) are labelled too: the
        model has to generate them before it can end the turn.
        """
        for j, t in enumerate(tokens):
            if t in self._special_ids:
                return tokens[: j + 1] + [IGNORE_INDEX] * (len(tokens) - j - 1)
        raise ConfigError(f"the chat template of '{self.tokenizer.name_or_path}' writes no special "
                          "end-of-turn token after an assistant turn")

    # ------------------------------------------------------------------ tensors

    def _visual_tensors(self, decoded: DecodedSample, num_objects: int) -> dict:
        """Normalised pixels and the masks of objects 0..num_objects-1 (see :meth:`encode` for shapes)."""
        keep = decoded.mask_object < num_objects
        return {
            "pixel_values": self.normalize(decoded.frames),
            "region_masks": torch.from_numpy(np.ascontiguousarray(decoded.masks[keep], dtype=bool)),
            "region_frame_index": torch.from_numpy(decoded.mask_frame[keep].astype(np.int64)),
            "region_object_index": torch.from_numpy(decoded.mask_object[keep].astype(np.int64)),
            "num_objects": num_objects,
        }

    def normalize(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [F, S, S, 3] -> float32 [F, 3, S, S], ``(x / 255 - mean) / std`` per channel."""
        size = self.spec.image_size
        if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
            raise ValueError(f"frames must be uint8 [F, {size}, {size}, 3]; got {tuple(frames.shape)}")
        # Transpose while converting (numpy, one pass), then scale in place: much faster than arithmetic on a
        # permuted torch view.
        x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32))
        return x.mul_(self._scale).add_(self._bias)


def _content_pieces(markers: list[str | None]) -> list[bool]:
    """For each text piece (the one after ``markers[k]``): does it belong to a turn's content (the sample's own
    text) rather than to the chat template?"""
    inside, out = False, []
    for marker in markers:
        if marker in (_ANS_BEGIN, _TXT_BEGIN):
            inside = True
        elif marker in (_ANS_END, _TXT_END):
            inside = False
        out.append(inside)
    return out


def _special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of every special token: the named ones and added tokens flagged special (e.g. <|im_end|>)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(ids)


def _prompt_turn(sample: Sample, turn: int | None) -> int:
    """Index of the user turn to answer: ``turn`` checked, or the last user turn."""
    users = [i for i, t in enumerate(sample.turns) if t.role == "user"]
    if not users:
        raise _error(sample, "the conversation has no user turn", "conversation_order")
    if turn is None:
        return users[-1]
    if turn not in users:
        raise ValueError(f"turn {turn} of sample {sample.index} is not a user turn (user turns: {users})")
    return turn


def _error(sample: Sample, reason: str, category: str) -> DataError:
    """A DataError naming the sample; ``category`` is the summary key (as in schema.py, e.g. 'too_long')."""
    return DataError(reason, sample.index, sample.id, category)
