"""Packed LLM passes: a micro-batch's samples laid end to end in one row, each attending only to itself.

Contract:
    packed = Packing.of(attention_mask)                 # right-padded [B, L] -> the packed layout
    packed.pack(x)                 [B, L, ...] -> [1, N, ...]    N = attention_mask.sum(): padding is dropped
    packed.unpack(y, fill)         [1, N, ...] -> [B, L, ...]    padding positions get ``fill``
    packed.position_ids            long [1, N]: 0..n_b-1 within each sample (what the sample alone gets)
    packed.attention_mask(impl, dtype)   what the LLM's attention takes to keep the samples apart (below)

The models embed a padded batch as before (every per-sample check of placeholders and features is unchanged),
then pack the embeddings, positions and shifted targets, run the LLM once on [1, N], and compute the loss on
the packed targets: the same token losses as the padded pass, without the padding's compute. The shift happens
before packing (:func:`shifted_targets`), so no target crosses from one sample into the next.

Isolation per attention backend (``model.attn_implementation``); transformers 5.x does not derive it from packed
``position_ids`` under sdpa or eager, so refvllm builds it:
    sdpa               bool [1, 1, N, N], causal and block-diagonal (True = attend)
    eager              the same as an additive float mask (0 / dtype min)
    flex_attention     a BlockMask with the same rule (block-sparse: masked blocks are skipped)
    flash_attention_2  no mask: flash-attn's varlen kernel, which transformers selects from packed position ids
                       without an attention mask
A 4-D mask (or BlockMask) is passed through by transformers' mask creation as it is.
"""

from __future__ import annotations

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
    """The packed layout of a right-padded batch (module docstring). ``index`` [N]: flat positions (row-major in
    [B, L]) of the real tokens; ``sample`` [N]: the sample of each packed token."""

    index: torch.Tensor
    sample: torch.Tensor
    position_ids: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        """The layout of ``attention_mask`` [B, L] (1 on tokens); rows must be right-padded."""
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        if bool((mask.cumsum(1) != torch.minimum(torch.arange(1, mask.shape[1] + 1, device=mask.device)[None],
                                                 lengths[:, None])).any()):
            raise ValueError("packing needs a right-padded batch (ones, then zeros, in every attention_mask row)")
        index = mask.flatten().nonzero().flatten()
        sample = torch.repeat_interleave(torch.arange(mask.shape[0], device=mask.device), lengths)
        position_ids = (index % mask.shape[1])[None]  # right padding: the column is the position in the sample
        return cls(index, sample, position_ids, (mask.shape[0], mask.shape[1]))

    @property
    def num_tokens(self) -> int:
        return int(self.index.shape[0])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [1, N, ...] (the real tokens, sample after sample)."""
        return x.flatten(0, 1)[self.index][None]

    def unpack(self, y: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[1, N, ...] -> [B, L, ...], ``fill`` at the padding positions."""
        b, length = self.shape
        out = y.new_full((b * length, *y.shape[2:]), fill)
        out[self.index] = y[0]
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
        n = self.num_tokens
        pos = torch.arange(n, device=self.sample.device)
        allowed = (self.sample[:, None] == self.sample[None, :]) & (pos[None, :] <= pos[:, None])
        allowed = allowed[None, None]
        if implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)

    def _block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        sample = self.sample

        def same_sample_causal(b, h, q, kv):
            return (sample[q] == sample[kv]) & (kv <= q)

        n = self.num_tokens
        return create_block_mask(same_sample_causal, B=None, H=None, Q_LEN=n, KV_LEN=n, device=sample.device)


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


def attention_implementation(lm) -> str:
    """The attention backend the (PEFT-wrapped or plain) transformers model was built with."""
    return getattr(lm.config, "_attn_implementation", None) or "eager"


def causal_lm_pass(lm, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                   logits_at: str = "all", loss_normalizer: float | None = None, pack: bool = False,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One teacher-forced pass of the causal LM ``lm`` on ``embeds`` [B, L, D] -> (loss or None, logits).

    ``position_ids``: None (the LM's own 1-D positions) or the multi-axis positions [A, B, L] of an mRoPE model,
    computed per sample on the padded batch. ``pack``: run the real tokens as one packed row (module
    docstring); an mRoPE model then gets [1 + A, 1, N], the per-sample text positions first (transformers'
    convention for packed mRoPE inputs: its mask creation reads them). Loss and gradients equal the padded
    pass's to float tolerance. Logits: [B, L, V] (``logits_at="all"``, packed ones unpacked, zeros at padding),
    else [B or 1, K, V] at the kept positions (see :func:`label_positions`).
    """
    targets = None if labels is None else shifted_targets(labels)
    kwargs = {"attention_mask": attention_mask}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    packing = Packing.of(attention_mask) if pack else None
    if packing is not None:
        embeds = packing.pack(embeds)
        targets = None if targets is None else packing.pack(targets)
        kwargs["attention_mask"] = packing.attention_mask(attention_implementation(lm), embeds.dtype)
        kwargs["position_ids"] = packing.position_ids if position_ids is None else torch.cat(
            [packing.position_ids[None], position_ids.flatten(1, 2)[:, packing.index][:, None]])
    keep = label_positions(targets, logits_at, embeds.device)
    if keep is not None:
        kwargs["logits_to_keep"] = keep
    logits = lm(inputs_embeds=embeds, use_cache=False, **kwargs).logits
    loss = None if targets is None else next_token_loss(logits, targets, keep, loss_normalizer)
    if packing is not None and keep is None:
        logits = packing.unpack(logits)
    return loss, logits
