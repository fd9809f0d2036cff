"""Packed LLM passes: a micro-batch's samples laid end to end in rows, each attending only to itself.

Contract:
    packed = Packing.of(attention_mask, rows)           # right-padded [B, L] -> the packed layout [R, C]
    packed.pack(x)                 [B, L, ...] -> [R, C, ...]   the real tokens, sample after sample in each row
    packed.unpack(y, fill)         [R, C, ...] -> [B, L, ...]   padding positions get ``fill``
    packed.position_ids            long [R, C]: 0..n_b-1 within each sample (what the sample alone gets)
    packed.attention_mask(impl, dtype)   what the LLM's attention takes to keep the samples apart (below)

The models embed a padded batch as before (every per-sample check of placeholders and features is unchanged),
then pack the embeddings, positions and shifted targets, run the LLM once on [R, C], and compute the loss on
the packed targets: the same token losses as the padded pass, without the padding's compute. The shift happens
before packing (:func:`shifted_targets`), so no target crosses from one sample into the next.

Rows (``rows``): ``"one"`` puts every sample in one row (R = 1, C = N = attention_mask.sum()), for the
backends whose cost follows the samples, not the row (flash-attn's varlen kernel, flex attention's block
mask). ``"fit"`` fills rows as long as the longest sample, first fit by decreasing length, for the dense-mask
backends (sdpa, eager), whose attention costs C^2 per row whatever the mask: one row of N tokens would cost N^2
where the padded batch costs B x L^2 (5x more for the demo's 8 short samples); with rows of C = L no row costs
more than a padded one, and short samples share rows. Positions past a row's fill are padding: target
IGNORE_INDEX, attending only to themselves (a fully masked row would give NaN), attended to by nothing.

Isolation per attention backend (``model.attn_implementation``); transformers 5.x does not derive it from packed
``position_ids`` under sdpa or eager, so refvllm builds it:
    sdpa               bool [R, 1, C, C], causal and block-diagonal (True = attend)
    eager              the same as an additive float mask (0 / dtype min)
    flex_attention     a BlockMask with the same rule (block-sparse: masked blocks are skipped)
    flash_attention_2  no mask: flash-attn's varlen kernel, which transformers selects from packed position ids
                       (one row) without an attention mask
A 4-D mask (or BlockMask) is passed through by transformers' mask creation as it is.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from refvllm.constants import IGNORE_INDEX

PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] labels -> [B, L] next-token targets: position p predicts ``labels[:, p + 1]``; the last position
    predicts nothing (IGNORE_INDEX)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


@dataclass(frozen=True)
class Packing:
    """The packed layout of a right-padded batch (module docstring). ``index`` [T]: flat positions (row-major in
    [B, L]) of the real tokens, sample after sample; ``dest`` [T]: their flat positions in [R, C]; ``sample``
    [R, C]: the sample of each packed position (-1 on padding)."""

    index: torch.Tensor
    dest: torch.Tensor
    sample: torch.Tensor
    position_ids: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, attention_mask: torch.Tensor, rows: str = "one") -> Packing:
        """The layout of ``attention_mask`` [B, L] (1 on tokens; rows must be right-padded) in ``rows``
        ("one" | "fit", module docstring)."""
        if rows not in ("one", "fit"):
            raise ValueError(f"rows must be 'one' or 'fit', got {rows!r}")
        mask = attention_mask.bool()
        b, length = mask.shape
        lengths = mask.sum(1)
        if bool((mask.cumsum(1) != torch.minimum(torch.arange(1, length + 1, device=mask.device)[None],
                                                 lengths[:, None])).any()):
            raise ValueError("packing needs a right-padded batch (ones, then zeros, in every attention_mask row)")
        row_of, offset_of, fills = _assign_rows(lengths.tolist(), rows)  # planned on the host (B numbers)
        num_rows, width = len(fills), max(fills, default=0)
        index = mask.flatten().nonzero().flatten()
        sample = torch.repeat_interleave(torch.arange(b, device=mask.device), lengths)
        column = index % length  # right padding: the column is the position in the sample
        starts = torch.tensor([r * width + o for r, o in zip(row_of, offset_of, strict=True)], dtype=torch.long,
                              device=mask.device)
        dest = starts[sample] + column
        packed_sample = torch.full((num_rows * width,), -1, dtype=torch.long, device=mask.device)
        packed_sample[dest] = sample
        positions = torch.zeros(num_rows * width, dtype=torch.long, device=mask.device)
        positions[dest] = column
        return cls(index, dest, packed_sample.view(num_rows, width), positions.view(num_rows, width), (b, length))

    @property
    def packed_shape(self) -> tuple[int, int]:
        """(R, C): rows and their width."""
        return tuple(self.sample.shape)

    def pack(self, x: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[B, L, ...] -> [R, C, ...] (the real tokens, sample after sample; ``fill`` at row padding)."""
        rows, width = self.packed_shape
        out = x.new_full((rows * width, *x.shape[2:]), fill)
        out[self.dest] = x.flatten(0, 1)[self.index]
        return out.unflatten(0, (rows, width))

    def unpack(self, y: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[R, C, ...] -> [B, L, ...], ``fill`` at the padding positions."""
        b, length = self.shape
        out = y.new_full((b * length, *y.shape[2:]), fill)
        out[self.index] = y.flatten(0, 1)[self.dest]
        return out.unflatten(0, (b, length))

    def attention_mask(self, implementation: str, dtype: torch.dtype = torch.float32):
        """The mask that keeps the packed samples apart under ``implementation`` (module docstring)."""
        if implementation == "flash_attention_2":
            return None
        if implementation == "flex_attention":
            return self._block_mask()
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"packing has no isolating mask for attention {implementation!r}; "
                             f"use one of {PACKING_ATTENTION}")
        width = self.packed_shape[1]
        pos = torch.arange(width, device=self.sample.device)
        real = self.sample >= 0
        same = (self.sample[:, :, None] == self.sample[:, None, :]) & real[:, :, None]
        allowed = (same & (pos[None, :] <= pos[:, None])) | torch.diag_embed(~real)  # padding: itself only
        allowed = allowed[:, None]
        if implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)

    def _block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        sample = self.sample

        def same_sample_causal(b, h, q, kv):
            return (sample[b, q] == sample[b, kv]) & (kv <= q)

        rows, width = self.packed_shape
        return create_block_mask(same_sample_causal, B=rows, H=None, Q_LEN=width, KV_LEN=width,
                                 device=sample.device)


def rows_for(implementation: str) -> str:
    """The row layout for an attention backend: "one" where the cost follows the samples, "fit" for the
    dense-mask backends (module docstring)."""
    return "one" if implementation in ("flash_attention_2", "flex_attention") else "fit"


def _assign_rows(sizes: list[int], rows: str) -> tuple[list[int], list[int], list[int]]:
    """(row of each sample, its offset in the row, each row's fill). "fit": first fit by decreasing size into
    rows of the largest size (ties in sample order, so the layout is deterministic)."""
    if rows == "one":
        return [0] * len(sizes), [0, *itertools.accumulate(sizes)][:-1], [sum(sizes)]
    capacity = max(sizes, default=0)
    row_of, offset_of, fills = [0] * len(sizes), [0] * len(sizes), []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        row = next((r for r, fill in enumerate(fills) if fill + sizes[i] <= capacity), len(fills))
        if row == len(fills):
            fills.append(0)
        row_of[i], offset_of[i] = row, fills[row]
        fills[row] += sizes[i]
    return row_of, offset_of, fills


# --------------------------------------------------------------------------------------------- the LM pass


def label_positions(targets: torch.Tensor | None, logits_at: str, device: torch.device) -> torch.Tensor | None:
    """The positions whose logits the loss needs (``logits_at="labels"``): every p where some row's target
    (:func:`shifted_targets`) is set, for the LLM's ``logits_to_keep``; None for ``"all"`` or without targets."""
    if logits_at not in ("all", "labels"):
        raise ValueError(f"logits_at must be 'all' or 'labels', got {logits_at!r}")
    if targets is None or logits_at == "all":
        return None
    return (targets != IGNORE_INDEX).any(0).nonzero().flatten().to(device)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None,
                    loss_normalizer: float | None) -> torch.Tensor:
    """Summed cross-entropy (float32) of the shifted ``targets`` [B, L], divided by ``loss_normalizer`` when
    given, else by their count. ``logits`` [B, L, V] at every position (``keep`` None) or [B, K, V] at the
    positions ``keep`` of :func:`label_positions`."""
    targets = targets.to(logits.device)
    if keep is not None:
        targets = targets[:, keep]
    token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
    denom = loss_normalizer if loss_normalizer is not None else (targets != IGNORE_INDEX).sum().clamp(min=1)
    return token_loss / denom


def decoder_and_head(lm):
    """``(decoder, head)`` of a (PEFT-wrapped or plain) transformers causal LM: what its own forward runs before
    and after it slices positions (``self.model``, ``get_output_embeddings()``; LoRA layers injected in either
    stay in the path), so the head can run at exactly the label positions; None for a model whose forward does
    more than ``head(hidden)`` (logit soft-capping or scaling) or lacks the two."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    decoder, head = getattr(base, "model", None), base.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


def attention_implementation(lm) -> str:
    """The attention backend the (PEFT-wrapped or plain) transformers model was built with."""
    return getattr(lm.config, "_attn_implementation", None) or "eager"


def causal_lm_pass(lm, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                   logits_at: str = "all", loss_normalizer: float | None = None, pack: bool = False,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One teacher-forced pass of the causal LM ``lm`` on ``embeds`` [B, L, D] -> (loss or None, logits).

    ``position_ids``: None (the LM's own 1-D positions) or the multi-axis positions [A, B, L] of an mRoPE model,
    computed per sample on the padded batch. ``pack``: run the real tokens packed (module docstring; the rows
    :func:`rows_for` the LM's attention backend); an mRoPE model then gets [1 + A, R, C], the per-sample text
    positions first (transformers' convention for packed mRoPE inputs: its mask creation reads them). Loss and
    gradients equal the padded pass's to float tolerance. Logits: [B, L, V] (``logits_at="all"``, packed ones
    unpacked, zeros at padding); with ``logits_at="labels"`` [1, T, V] at exactly the T positions with a target
    (row-major, padded or packed rows alike: :func:`decoder_and_head`), or, for a model that cannot be split
    there, [B or R, K, V] at the positions where any row has one (:func:`label_positions`).
    """
    targets = None if labels is None else shifted_targets(labels)
    kwargs = {"attention_mask": attention_mask}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    implementation = attention_implementation(lm)
    packing = Packing.of(attention_mask, rows_for(implementation)) if pack else None
    if packing is not None:
        embeds = packing.pack(embeds)
        targets = None if targets is None else packing.pack(targets, fill=IGNORE_INDEX)
        kwargs["attention_mask"] = packing.attention_mask(implementation, embeds.dtype)
        kwargs["position_ids"] = packing.position_ids if position_ids is None else torch.cat(
            [packing.position_ids[None], packing.pack(position_ids.permute(1, 2, 0)).permute(2, 0, 1)])
    split = decoder_and_head(lm) if logits_at == "labels" and targets is not None else None
    if split is not None:  # the head at exactly the label positions, row by row: [1, T, V]
        decoder, head = split
        hidden = decoder(inputs_embeds=embeds, use_cache=False, **kwargs).last_hidden_state
        where = (targets != IGNORE_INDEX).to(hidden.device)
        logits = head(hidden[where][None])  # not a view of the head's output (FSDP hooks outputs)
        return next_token_loss(logits, targets.to(hidden.device)[where][None], None, loss_normalizer), logits
    keep = label_positions(targets, logits_at, embeds.device)  # also rejects an unknown logits_at
    if keep is not None:  # the LLM's own logits_to_keep: the positions where any row has a label
        kwargs["logits_to_keep"] = keep
    logits = lm(inputs_embeds=embeds, use_cache=False, **kwargs).logits
    loss = None if targets is None else next_token_loss(logits, targets, keep, loss_normalizer)
    if packing is not None and keep is None:
        logits = packing.unpack(logits)
    return loss, logits
