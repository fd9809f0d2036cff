"""Batches of processed samples: frames and masks concatenated with index tensors, text padded.

Contract (docs/architecture.md, "A batch"): ``collate(items, pad_token_id, padding_side="right") -> dict``.
``items`` are :meth:`Processor.encode` / :meth:`Processor.encode_prompt` dicts or :class:`Skipped` records
(the dataset's bad-sample policy); skipped items are dropped and reported in ``num_skipped``/``skipped``.

Output, with B kept samples, L the longest text, N_F = sum of F, N_M = sum of M, N_O = sum of O:

| key | shape / type | meaning |
| --- | --- | --- |
| ``batch_size`` | int | B (0 when every item was skipped: see below) |
| ``input_ids`` | long [B, L] | padded with ``pad_token_id`` (right, or left for generation) |
| ``attention_mask`` | long [B, L] | 1 on tokens, 0 on padding |
| ``labels`` | long [B, L] | padded with -100; only when the items have labels (``encode``) |
| ``pixel_values`` | float [N_F, 3, S, S] | all frames, sample-major |
| ``frame_sample_index`` | long [N_F] | sample (0..B-1) of each frame |
| ``frames_per_sample`` | long [B] | F of each sample (0 allowed) |
| ``region_masks`` | bool [N_M, S, S] | all masks, sample-major, each sample's object-major then frame |
| ``region_frame_index`` | long [N_M] | row of the mask's frame in ``pixel_values`` |
| ``region_object_index`` | long [N_M] | global object id 0..N_O-1 (sample-major, annotation order) |
| ``object_sample_index`` | long [N_O] | sample of each object |
| ``objects_per_sample`` | long [B] | O of each sample |
| ``sample_index`` | long [B] | position of each sample in its file |
| ``sample_id`` | list[str] | id of each sample |
| ``references`` | list[str or None] | only when the items are prompts (``encode_prompt``) |
| ``num_skipped`` | int | items dropped by the bad-sample policy |
| ``skipped`` | list[dict] | ``{"index", "id", "reason"}`` of each dropped item |

Empty batch: when every item was skipped, ``batch_size`` is 0 and the tensors have no rows (``input_ids``,
``attention_mask`` and ``labels`` [0, 0], ``pixel_values`` [0, 3, 0, 0], ``region_masks`` [0, 0, 0], index
tensors [0]); ``num_skipped``/``skipped`` still report the dropped items. The trainer recognises it by
``batch["batch_size"] == 0`` and must not feed it to the model as a normal batch.
"""

from __future__ import annotations

import torch

from refvllm.constants import IGNORE_INDEX
from refvllm.data.types import Skipped


def collate(items: list, pad_token_id: int, padding_side: str = "right", visuals=None) -> dict:
    """Batch processed samples (see the module docstring for every output and its shape). ``visuals`` batches
    the visual tensors of the kept items (a processor's ``batch_visuals``; default: the assembled family's
    frames and masks, :func:`batch_frames`)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
    kept = [x for x in items if not isinstance(x, Skipped)]
    skipped = [x.as_dict() for x in items if isinstance(x, Skipped)]
    batch = {"batch_size": len(kept), **_text(kept, pad_token_id, padding_side),
             **(visuals or batch_frames)(kept),
             "sample_index": torch.tensor([x["sample_index"] for x in kept], dtype=torch.long),
             "sample_id": [x["sample_id"] for x in kept]}
    if kept and "reference" in kept[0]:
        batch["references"] = [x.get("reference") for x in kept]
    batch["num_skipped"] = len(skipped)
    batch["skipped"] = skipped
    return batch


class Collator:
    """Picklable ``collate`` with fixed padding, for ``DataLoader(collate_fn=Collator(pad_id))`` in workers
    (``visuals``: as :func:`collate`'s, a module-level function or static method so that it pickles)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right", visuals=None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.visuals = visuals

    def __call__(self, items: list) -> dict:
        return collate(items, self.pad_token_id, self.padding_side, self.visuals)


def _text(kept: list[dict], pad_token_id: int, padding_side: str) -> dict:
    """``input_ids``, ``attention_mask`` and (when every item has them) ``labels``, all long [B, L]."""
    with_labels = [("labels" in x) for x in kept]
    if any(with_labels) and not all(with_labels):
        raise ValueError("cannot batch training samples (with labels) together with prompts (without)")
    has_labels = all(with_labels)  # an empty batch keeps a [0, 0] labels tensor, as a training batch would
    length = max((len(x["input_ids"]) for x in kept), default=0)
    out = {"input_ids": torch.full((len(kept), length), pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(kept), length), dtype=torch.long)}
    if has_labels:
        out["labels"] = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(kept):
        n = len(item["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        out["input_ids"][row, cols] = item["input_ids"]
        out["attention_mask"][row, cols] = 1
        if has_labels:
            out["labels"][row, cols] = item["labels"]
    return out


def batch_frames(kept: list[dict]) -> dict:
    """The assembled family's visual part: frames and masks concatenated, with their index tensors offset to
    batch-global rows (module docstring)."""
    sizes = {tuple(x["pixel_values"].shape[1:]) for x in kept if x["pixel_values"].shape[0]}
    if len(sizes) > 1:
        raise ValueError(f"samples of one batch have frames of different sizes: {sorted(sizes)}")
    rows = torch.arange(len(kept), dtype=torch.long)
    frames = torch.tensor([x["pixel_values"].shape[0] for x in kept], dtype=torch.long)
    objects = torch.tensor([int(x["num_objects"]) for x in kept], dtype=torch.long)
    masks = torch.tensor([len(x["region_frame_index"]) for x in kept], dtype=torch.long)
    mask_sample = torch.repeat_interleave(rows, masks)
    # Rows before each sample, looked up per mask: local index + offset of the mask's sample.
    frame_offset = (torch.cumsum(frames, 0) - frames)[mask_sample]
    object_offset = (torch.cumsum(objects, 0) - objects)[mask_sample]
    return {
        "pixel_values": _cat([x["pixel_values"] for x in kept], torch.zeros((0, 3, 0, 0))),
        "frame_sample_index": torch.repeat_interleave(rows, frames),
        "frames_per_sample": frames,
        "region_masks": _cat([x["region_masks"] for x in kept], torch.zeros((0, 0, 0), dtype=torch.bool)),
        "region_frame_index": _cat([x["region_frame_index"] for x in kept], _no_rows()) + frame_offset,
        "region_object_index": _cat([x["region_object_index"] for x in kept], _no_rows()) + object_offset,
        "object_sample_index": torch.repeat_interleave(rows, objects),
        "objects_per_sample": objects,
    }


def _cat(tensors: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` that returns ``empty`` (the right rank and dtype, no rows) for an empty batch."""
    return torch.cat(tensors) if tensors else empty


def _no_rows() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)
