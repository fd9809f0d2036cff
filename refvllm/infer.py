"""Ask questions about objects in a video or image: a Python API and ``refvllm infer``.

Python::

    from refvllm.infer import Query, RefInference
    engine = RefInference.from_pretrained("runs/demo/train/checkpoint-300")  # or an export / training output dir
    engine.ask("clip.mp4", [mask], "What colour is <region>?", frame_idx=3)        # mask: bool [H, W]
    engine.ask_batch([Query("clip.mp4", [m1, m2], "Is <region> left of <region>?"), ...])

Command line::

    refvllm infer --model DIR --video FILE_OR_FOLDER (--mask-png FILE ... [--frame-idx N ...] | --mask-json FILE)
                  --question TEXT [--ablate-regions] [key=value overrides, e.g. eval.max_new_tokens=64]

The query goes through the training data path: :func:`~refvllm.data.schema.parse_sample` (every rule of the
format), :func:`~refvllm.data.decode.decode_sample` with the model's own ``data.num_frames`` and
``data.mask_resize`` (so the frame plan, the mask frames inside it and the mask resizing are those of training),
:meth:`~refvllm.data.processor.Processor.encode_prompt`, left-padded :func:`~refvllm.data.collate.collate`, and
:meth:`~refvllm.model.refvlm.RefVLM.generate` with its KV cache. Greedy by default; ``eval.do_sample``,
``eval.temperature``, ``eval.top_p`` and ``eval.max_new_tokens`` set the generation.

Masks: one per object, in the order of the question's ``<region>`` placeholders (the k-th ``<region>`` is the
k-th object, as in training). A mask is a bool/0-1 array [H, W] at the media's resolution applied at
``frame_idx``, or a dict ``{frame: mask array or segmentation}`` (segmentation in the seed's forms: RLE,
uncompressed RLE, polygons). The question must hold exactly one ``<region>`` per mask: a mismatch is an error,
never a guess, because the model only knows which object is meant from where its ``<region>`` stands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refvllm.constants import REGION_PLACEHOLDER
from refvllm.data.masks import encode_rle
from refvllm.data.media import IMAGE_EXTENSIONS
from refvllm.data.types import Sample
from refvllm.errors import ConfigError, DataError

QUERY_ID = "query"
_DUMMY_ANSWER = "?"  # the parser wants a conversation that ends with an answer; it is cut before encoding


@dataclass
class Query:
    """One question: media path, masks (one per object, see the module docstring), question, default frame."""

    video: str | Path
    masks: Sequence[Any]
    question: str
    frame_idx: int = 0


@dataclass
class Generation:
    """What the model answered to one prompt. ``error`` is set (and ``text`` empty) for a sample that could not
    be prepared; ``num_tokens`` counts the generated tokens up to and including the end-of-turn token."""

    index: int
    id: str
    text: str = ""
    num_tokens: int = 0
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mask_to_rle(mask: Any, where: str = "mask") -> dict:
    """A 2-D mask (non-zero = object) as a JSON-ready COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise DataError(f"{where}: a mask must be 2-D [H, W], got shape {tuple(array.shape)}")
    return encode_rle(array != 0)


def _segmentation(value: Any, where: str) -> Any:
    """An array becomes an RLE; a segmentation (dict/list as in the seed's format) is passed to the parser."""
    if isinstance(value, np.ndarray | torch.Tensor):
        return mask_to_rle(value.cpu().numpy() if isinstance(value, torch.Tensor) else value, where)
    return value


def annotation_from_masks(masks: Sequence[Any], frame_idx: int = 0) -> list[dict[str, dict]]:
    """The seed's ``annotation`` list for :class:`Query` masks (array at ``frame_idx``, or {frame: mask})."""
    annotation = []
    for k, mask in enumerate(masks):
        if isinstance(mask, dict):
            obj = {str(f): {"segmentation": _segmentation(m, f"object {k} frame {f}")} for f, m in mask.items()}
        else:
            obj = {str(frame_idx): {"segmentation": _segmentation(mask, f"object {k}")}}
        annotation.append(obj)
    return annotation


def check_region_count(question: str, num_objects: int) -> None:
    """DataError unless the question has exactly one ``<region>`` per object."""
    found = question.count(REGION_PLACEHOLDER)
    if found != num_objects:
        raise DataError(f"the question has {found} {REGION_PLACEHOLDER} placeholder(s) but {num_objects} mask(s) "
                        f"were given; write one {REGION_PLACEHOLDER} where each object is meant, in mask order "
                        f"(e.g. 'What colour is {REGION_PLACEHOLDER}?')")


def query_sample(query: Query, index: int = 0) -> tuple[Sample, Path]:
    """The query as a parsed :class:`Sample` (one user turn) and the data root its media is relative to."""
    from refvllm.data.schema import parse_sample

    path = Path(query.video)
    if not path.exists():
        raise DataError(f"media '{path}' does not exist")
    check_region_count(query.question, len(query.masks))
    media_key = "image" if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS else "video"
    raw = {"id": f"{QUERY_ID}-{index}", media_key: path.name,
           "conversations": [{"from": "human", "value": query.question}, {"from": "gpt", "value": _DUMMY_ANSWER}]}
    if query.masks:
        raw["annotation"] = annotation_from_masks(query.masks, query.frame_idx)
    sample = parse_sample(raw, index)
    sample.turns = sample.turns[:-1]
    return sample, path.resolve().parent


def prepare_prompt(processor, sample: Sample, data_root: str | Path) -> dict:
    """Decode ``sample`` as training did (the processor's frame count and mask resizing) and encode its prompt
    (up to the last user turn). Returns :meth:`Processor.encode_prompt`'s dict; DataError naming the sample."""
    from refvllm.data.decode import decode_sample

    decoded = decode_sample(sample, data_root, processor.num_frames, processor.frame_size,
                            processor.mask_resize)
    return processor.encode_prompt(decoded)


class RefInference:
    """Batched generation with a loaded model: the one implementation used by ``refvllm infer`` and ``eval``.

    ``cfg``, ``model`` and ``processor`` are what :func:`refvllm.checkpoint.load_for_inference` returns. The model
    is moved to ``device`` (default: CUDA when available) and put in eval mode.
    """

    def __init__(self, cfg, model, processor, device: str | torch.device | None = None):
        self.cfg, self.model, self.processor = cfg, model, processor
        self.device = torch.device(device) if device is not None else default_device()
        self.model.to(self.device).eval()
        self.vision_dtype = next(model.vision.parameters()).dtype
        self.eos_ids = _eos_ids(model, processor.tokenizer)
        self.source: str | None = None  # the checkpoint or export directory it was loaded from

    @classmethod
    def from_pretrained(cls, path: str | Path, overrides: list[str] | None = None,
                        device: str | torch.device | None = None) -> RefInference:
        """Load a training checkpoint (``checkpoint-STEP``), an export directory, or a training output
        directory (its newest complete checkpoint, see :func:`resolve_model_dir`); ``overrides`` are
        ``key=value`` config overrides (e.g. ``eval.max_new_tokens=64``)."""
        from refvllm.checkpoint import load_for_inference, resolve_model_dir

        source = resolve_model_dir(path)
        cfg, model, processor = load_for_inference(source, overrides)
        engine = cls(cfg, model, processor, device)
        engine.source = str(Path(source).resolve())
        return engine

    # ------------------------------------------------------------------ preparing prompts

    def prepare(self, sample: Sample, data_root: str | Path) -> dict:
        """:func:`prepare_prompt` with this engine's processor."""
        return prepare_prompt(self.processor, sample, data_root)

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Every generation setting, explicitly: ``max_new_tokens``/``do_sample`` (and ``temperature``/``top_p``
        when sampling) from ``eval.*``, everything else that could change the answer turned off (see
        :func:`neutral_generation_settings`). What this returns is what the metrics file records."""
        e = self.cfg.eval
        kwargs: dict[str, Any] = {**neutral_generation_settings(), "max_new_tokens": e.max_new_tokens,
                                  "do_sample": e.do_sample}
        if e.do_sample:
            kwargs.update(temperature=e.temperature, top_p=e.top_p)
        kwargs.update(overrides)
        if not kwargs.get("do_sample"):  # greedy: no sampling parameter at all (transformers warns on them)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    # ------------------------------------------------------------------ generating

    def _to_device(self, batch: dict) -> dict:
        out = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        # Frames go in the vision tower's own dtype (a bf16 tower); the model makes every other cast.
        out["pixel_values"] = out["pixel_values"].to(self.vision_dtype)
        return out

    @torch.no_grad()
    def generate_items(self, items: list[dict], ablate_regions: bool = False, **generation: Any) -> list[Generation]:
        """Generate for prepared prompts (:meth:`prepare` dicts) as one left-padded batch, in order."""
        if not items:
            return []
        batch = self._to_device(self.processor.collate(items, padding_side="left"))
        new_ids = self.model.generate(batch, ablate_regions=ablate_regions, eos_token_id=self.eos_ids,
                                      **self.generation_kwargs(**generation))
        return [self._decode(item, row) for item, row in zip(items, new_ids.cpu(), strict=True)]

    def _decode(self, item: dict, row: torch.Tensor) -> Generation:
        """Text of one row of new ids, cut after the first end-of-turn id (the rest is padding)."""
        ids = row.tolist()
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        kept = ids if end is None else ids[:end]
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Generation(int(item["sample_index"]), str(item["sample_id"]), text,
                          len(ids) if end is None else end + 1)

    def ask_batch(self, queries: Sequence[Query], ablate_regions: bool = False, **generation: Any) -> list[str]:
        """Answers to ``queries``, generated in batches of ``eval.batch_size``. Raises DataError for a bad query."""
        answers: list[str] = []
        size = self.cfg.eval.batch_size
        for start in range(0, len(queries), size):
            items = []
            for i, query in enumerate(queries[start:start + size], start):
                sample, root = query_sample(query, i)
                items.append(self.prepare(sample, root))
            answers += [g.text for g in self.generate_items(items, ablate_regions, **generation)]
        return answers

    def ask(self, video: str | Path, masks: Sequence[Any], question: str, frame_idx: int = 0,
            ablate_regions: bool = False, **generation: Any) -> str:
        """The answer to one question about the objects given by ``masks`` (see the module docstring)."""
        return self.ask_batch([Query(video, masks, question, frame_idx)], ablate_regions, **generation)[0]


# Generation settings that change the answer and that a checkpoint's generation_config.json may set (Qwen2.5:
# do_sample, temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05), with the value that turns each off.
# transformers fills every setting a caller leaves at its default from the model's generation config, so
# "greedy" only means greedy when each of them is passed explicitly.
_NEUTRAL_GENERATION = {
    "num_beams": 1, "top_k": None, "top_p": None, "min_p": None, "typical_p": None, "epsilon_cutoff": None,
    "eta_cutoff": None, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": None, "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "penalty_alpha": None, "dola_layers": None, "guidance_scale": None,
    "diversity_penalty": 0.0, "num_beam_groups": 1, "low_memory": None,
}


def neutral_generation_settings() -> dict[str, Any]:
    """The settings of ``_NEUTRAL_GENERATION`` that this transformers version knows (5.17 and 5.24 differ)."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    return {k: v for k, v in _NEUTRAL_GENERATION.items() if hasattr(known, k)}


def _eos_ids(model, tokenizer) -> list[int]:
    """End-of-generation ids: the LLM's generation config (e.g. ``<|im_end|>``) and the tokenizer's eos."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None)
    ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ConfigError(f"neither the generation config nor the tokenizer of '{tokenizer.name_or_path}' names an "
                          "end-of-sequence token; generation would never stop early")
    return sorted(ids)


# ---------------------------------------------------------------------------------------------- CLI


def read_mask_png(path: str | Path) -> np.ndarray:
    """bool [H, W]: the non-zero pixels of a PNG (any channel but alpha)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img)
            has_alpha = img.mode in ("RGBA", "LA", "PA")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"--mask-png '{path}' cannot be read as an image: {e}") from None
    if array.ndim == 3:
        array = (array[..., :-1] if has_alpha else array).any(axis=-1)
    return array != 0


def read_mask_json(path: str | Path) -> list[dict]:
    """The seed's ``annotation`` list from a JSON file: ``[{"<frame>": {"segmentation": ...}}, ...]``
    (one entry per object), or an object holding it under ``"annotation"``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"--mask-json '{path}': {e}") from None
    if isinstance(data, dict) and "annotation" in data:
        data = data["annotation"]
    if not isinstance(data, list):
        raise DataError(f"--mask-json '{path}' must hold a list with one {{frame: {{'segmentation': ...}}}} "
                        "per object (the seed's 'annotation')")
    return data


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refvllm infer", description="Ask a question about objects in a video/image.")
    p.add_argument("--model", required=True, help="training checkpoint (checkpoint-STEP) or export directory")
    p.add_argument("--video", required=True, help="video file, folder of frames, or image")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--mask-png", nargs="+", default=[], metavar="FILE",
                       help="one PNG per object, in <region> order (non-zero = object)")
    masks.add_argument("--mask-json", metavar="FILE", help="the seed's annotation list: one {frame: segmentation} "
                                                           "per object")
    p.add_argument("--frame-idx", type=int, nargs="+", default=[0], metavar="N",
                   help="frame of each --mask-png (one value for all, or one per PNG; default 0); "
                        "--mask-json names its own frames")
    p.add_argument("--question", required=True, help="the question; one <region> per object")
    p.add_argument("--ablate-regions", action="store_true", help="replace the region tokens with zeros")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. eval.max_new_tokens=64)")
    return p


def _cli_masks(args: argparse.Namespace) -> list[Any]:
    """Per object: ``{frame: segmentation}`` from --mask-json, or ``{frame: bool array}`` from --mask-png."""
    if args.mask_json:
        return [_json_object(k, obj) for k, obj in enumerate(read_mask_json(args.mask_json))]
    frames = args.frame_idx
    if len(frames) not in (1, len(args.mask_png)):
        raise DataError(f"--frame-idx takes one value or one per --mask-png ({len(args.mask_png)}), got {len(frames)}")
    frames = frames * len(args.mask_png) if len(frames) == 1 else frames
    return [{f: read_mask_png(png)} for png, f in zip(args.mask_png, frames, strict=True)]


def _json_object(k: int, obj: Any) -> dict:
    """One annotation object as ``{frame: segmentation}`` (the parser checks the rest)."""
    if not isinstance(obj, dict) or not all(isinstance(v, dict) and "segmentation" in v or v is None
                                            for v in obj.values()):
        raise DataError(f"--mask-json object {k} must map frame indices to {{'segmentation': ...}}")
    return {f: v["segmentation"] for f, v in obj.items() if v is not None}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    masks = _cli_masks(args)
    engine = RefInference.from_pretrained(args.model, args.overrides, args.device)
    print(engine.ask(args.video, masks, args.question, ablate_regions=args.ablate_regions))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
