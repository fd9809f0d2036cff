"""The composite model: vision tower once -> projector + region encoder -> count check -> splice -> causal LM.

Contract (batch layout: docs/architecture.md, "A batch"):
    out = model(batch)                                  # CausalLMOutputWithPast(loss, logits)
    out = model(batch, loss_normalizer=n)               # loss = summed token loss / n (accumulation windows)
    out = model(batch, logits_at="labels")              # LM head + loss only where a label is (training)
    out = model(batch, ablate_regions=True)             # region tokens replaced by zeros
    model.train(); out = model(batch)                   # with region_dropout p: each sample's region tokens
                                                        # are zeroed with probability p (training only)
    new_ids = model.generate(left_padded(batch), max_new_tokens=8)   # [B, new] (only the new tokens)

Sentinel positions (VISUAL_TOKEN_ID, REGION_TOKEN_ID) are replaced by the pad id before the embedding lookup and
filled by ``masked_scatter``: the LLM's vocabulary and embedding matrix are never changed. Every sample's
placeholder counts are checked against the feature rows it gets; a mismatch raises ModelInputError naming both.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from refvllm.constants import IGNORE_INDEX, REGION_TOKEN_ID, VISUAL_TOKEN_ID
from refvllm.errors import ModelInputError
from refvllm.layout import TokenLayout
from refvllm.model.packing import causal_lm_pass
from refvllm.model.region import RegionEncoder
from refvllm.model.vision import Projector, VisionTower

VISION_CHUNK = 4  # frames per forward of a frozen vision tower (bounds its activation memory)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens that the loss counts (after the causal shift): the trainer's normaliser is their sum over
    the micro-batches of an accumulation window (and over processes)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def left_padded(batch: dict) -> dict:
    """The batch with ``input_ids``/``attention_mask``/``labels`` moved from right padding to left padding
    (for batched generation). Rows must be right-padded: ones then zeros in ``attention_mask``."""
    mask = batch["attention_mask"]
    length = mask.shape[1]
    shift = length - mask.sum(1, keepdim=True)
    idx = (torch.arange(length, device=mask.device)[None] - shift) % length
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        if key in batch:
            out[key] = batch[key].gather(1, idx)
    return out


def _sharded(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are sharded so that running it is a collective: FSDP2 (DTensor
    parameters outside their unit's forward) or ZeRO-3 (``ds_id``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in module.parameters())


def _passes_of_all_ranks(passes: int, device: torch.device) -> int:
    """The largest ``passes`` over the process group (collective; ``passes`` itself without one)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return passes
    count = torch.tensor([passes], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


def with_zero_term(embeds: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``embeds`` [B, L, D] plus the zero-valued term that touches the modules a batch gave no real input
    (:meth:`RefVLM._features`): the values are unchanged, and the term enters where the visual and region tokens
    enter, not at the loss. The embedding table is frozen, so without it the LLM's input in a batch with no
    frames and no masks needs no gradient; FSDP2 reduces a layer's gradients when its input's gradient is
    computed, or at the end of the backward when it needs none, so the ranks reduced the first layer at
    different points and hung (tests/integration/test_multiprocess.py). With it, every rank's LLM input needs
    a gradient."""
    return embeds + zero.to(embeds.dtype)


class RefVLM(nn.Module):
    """Vision tower, projector, region encoder and causal LM (``llm`` may be a PEFT model)."""

    def __init__(self, vision: VisionTower, projector: Projector, region: RegionEncoder, llm: nn.Module,
                 layout: TokenLayout, pad_token_id: int = 0, region_dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= region_dropout < 1.0:
            raise ValueError(f"region_dropout must be in [0, 1), got {region_dropout}")
        self.vision, self.projector, self.region, self.llm = vision, projector, region, llm
        self.layout = layout
        self.pad_token_id = pad_token_id
        self.region_dropout = region_dropout

    # The checkpoint format's view of the model (refvllm/checkpoint.py): the roles whose weights start random
    # (saved whole, trained or not) and the PEFT model whose adapter is saved in PEFT's layout.
    FRESH_ROLES = ("projector", "region")

    @property
    def adapter_model(self):
        """The LLM when it is a PeftModel (train_llm=lora), else None."""
        from peft import PeftModel

        return self.llm if isinstance(self.llm, PeftModel) else None

    @property
    def generation_config(self):
        return getattr(self.llm, "generation_config", None)

    # ----------------------------------------------------------------------------------------- features
    def _features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Visual tokens [N_V, D], region tokens [N_R, D] and a zero-valued scalar that touches every module that
        had no real input in this batch, trainable or frozen: each trainable one gets a gradient (DDP waits for
        every gradient), and every module runs on every rank (ZeRO-3 gathers even frozen parameters
        collectively, so a module skipped on one rank would hang the others)."""
        pixels = batch["pixel_values"]
        dummy = pixels.new_zeros(())
        if pixels.shape[0] == 0:
            pixels = pixels.new_zeros(1, *pixels.shape[1:])  # text-only batch: a dummy frame
            feats = self._vision_features(pixels)
            dummy = dummy + self._zero(self.projector(feats, torch.ones(1, dtype=torch.long, device=feats.device)))
            visual = feats.new_zeros(0, self._llm_width())
        else:
            feats = self._vision_features(pixels)
            visual = self.projector(feats, batch["frames_per_sample"])
        masks = batch["region_masks"]
        if masks.shape[0] == 0:
            region = feats.new_zeros(0, self._llm_width())
            # A whole-frame mask on the first frame, frozen or not: under ZeRO-3 even frozen parameters are
            # gathered collectively when a module runs, so a module that runs on one rank must run on all.
            full = torch.ones(1, pixels.shape[-1], pixels.shape[-1], dtype=torch.bool, device=pixels.device)
            zero = torch.zeros(1, dtype=torch.long, device=feats.device)
            dummy = dummy + self._zero(self.region(feats[:1], full, zero, zero, 1))
        else:
            num_objects = int(batch["object_sample_index"].shape[0])
            region = self.region(feats, masks, batch["region_frame_index"], batch["region_object_index"],
                                 num_objects)
        return visual, region, dummy

    def _vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N_F, 3, S, S] -> [N_F, P, D_v] in the adapters' dtype. A frozen tower runs without autograd (no
        activations kept for 16 frames of a large encoder) and ``VISION_CHUNK`` frames at a time: its attention
        over 16 frames of SigLIP-so400m is 0.5 GB at once, a quarter of that in chunks, with the same result.
        When the tower's parameters are sharded (FSDP, ZeRO-3) each pass gathers them collectively, so every rank
        runs as many passes as the rank with the most chunks (:func:`_passes_of_all_ranks`; the extra ones on
        one frame, their output unused)."""
        if torch.is_grad_enabled() and _trains(self.vision):
            feats = self.vision(pixels)
        else:
            with torch.no_grad():
                chunks = list(pixels.split(VISION_CHUNK))
                # Agreed before any pass: every pass is a sequence of gathers the other ranks must match.
                passes = _passes_of_all_ranks(len(chunks), pixels.device) if _sharded(self.vision) else len(chunks)
                feats = torch.cat([self.vision(chunk) for chunk in chunks])
                for _ in range(passes - len(chunks)):
                    self.vision(pixels[:1])
        # The one cast on the vision side: the tower's dtype (e.g. frozen bf16) -> the adapters' weight dtype.
        return feats.to(self.projector.mlp[0].weight.dtype)

    @staticmethod
    def _zero(x: torch.Tensor) -> torch.Tensor:
        return x.sum() * 0.0

    def _llm_width(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim

    # ------------------------------------------------------------------------------------------- splice
    def _expected_rows(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual and region feature rows each sample must get [B], from the TokenLayout (the processor's
        formula), not from the features."""
        layout = self.layout
        vis_rows = torch.tensor([layout.num_visual_tokens(f) for f in batch["frames_per_sample"].tolist()],
                                dtype=torch.long, device=device)
        obj_sample = batch["object_sample_index"].to(device)
        masks_per_obj = torch.bincount(batch["region_object_index"].to(device), minlength=len(obj_sample))
        tokens_per_obj = torch.tensor([layout.num_region_tokens(n) for n in masks_per_obj.tolist()],
                                      dtype=torch.long, device=device)
        reg_rows = torch.zeros(len(vis_rows), dtype=torch.long, device=device).index_add_(0, obj_sample,
                                                                                           tokens_per_obj)
        return vis_rows, reg_rows

    @staticmethod
    def _check_masks_in_own_sample(batch: dict) -> None:
        """Each mask must lie on a frame of its object's sample (features never leak across samples)."""
        mask_obj = batch["region_object_index"]
        if len(mask_obj) == 0:
            return
        obj_sample = batch["object_sample_index"][mask_obj]
        frame_sample = batch["frame_sample_index"][batch["region_frame_index"]]
        leak = (frame_sample != obj_sample).nonzero().flatten()
        if len(leak):
            m = int(leak[0])
            raise ModelInputError(f"region mask {m} belongs to an object of sample {int(obj_sample[m])} but lies "
                                  f"on a frame of sample {int(frame_sample[m])}")

    def _check_counts(self, batch: dict, input_ids: torch.Tensor, visual: torch.Tensor, region: torch.Tensor):
        """Per sample and in total: placeholder positions == feature rows, for each kind. Raises ModelInputError."""
        self._check_masks_in_own_sample(batch)
        vis_rows, reg_rows = self._expected_rows(batch, input_ids.device)
        for name, sentinel, rows, feats in (("visual", VISUAL_TOKEN_ID, vis_rows, visual),
                                            ("region", REGION_TOKEN_ID, reg_rows, region)):
            positions = (input_ids == sentinel).sum(1)
            bad = (positions != rows).nonzero().flatten()
            if len(bad):
                i = int(bad[0])
                raise ModelInputError(f"sample {i} of the batch has {int(positions[i])} {name} placeholder "
                                      f"positions but {int(rows[i])} {name} feature rows")
            if int(positions.sum()) != feats.shape[0]:
                raise ModelInputError(f"the batch has {int(positions.sum())} {name} placeholder positions but "
                                      f"{feats.shape[0]} {name} feature rows")

    def embed(self, batch: dict, ablate_regions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds [B, L, D] with visual and region features at their placeholder positions, and the
        zero-valued dummy term (:func:`with_zero_term` adds it to the embeddings)."""
        input_ids = batch["input_ids"]
        visual, region, dummy = self._features(batch)
        self._check_counts(batch, input_ids, visual, region)
        is_visual, is_region = input_ids == VISUAL_TOKEN_ID, input_ids == REGION_TOKEN_ID
        ids = input_ids.masked_fill(is_visual | is_region, self.pad_token_id)
        embeds = self.llm.get_input_embeddings()(ids)
        # The one cast on the LLM side: adapter outputs -> the LLM's embedding dtype.
        visual, region = visual.to(embeds.dtype), region.to(embeds.dtype)
        if ablate_regions:
            region = torch.zeros_like(region)
        elif self.training and self.region_dropout > 0 and region.shape[0]:
            region = drop_regions(region, is_region, self.region_dropout)
        embeds = embeds.masked_scatter(is_visual[..., None], visual)
        embeds = embeds.masked_scatter(is_region[..., None], region)
        return embeds, dummy


    # ---------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict, loss_normalizer: float | None = None, ablate_regions: bool = False,
                logits_at: str = "all", pack: bool = False) -> CausalLMOutputWithPast:
        """The next-token loss when ``labels`` are in the batch (summed over label tokens and divided by
        ``loss_normalizer`` when given, else their mean), and logits.

        ``logits_at="all"``: logits [B, L, V] at every position (as a Hugging Face causal LM). ``"labels"`` (the
        trainer's): the LM head and the cross-entropy run only at the T positions that predict a label
        (``logits`` [1, T, V], row-major), the LLM's decoder and then its own head module, so a LoRA on the head
        stays in the path (refvllm.model.packing.causal_lm_pass). The loss
        and its gradients are those of ``"all"`` (test_model); the memory is not: 3.5k positions x 151,936
        vocabulary entries in float32 are 2 GB, the ~60 label positions of a referring answer 36 MB.

        ``pack`` (the trainer's, ``train.packing``): the LLM runs the samples end to end in one row, each
        attending only to itself (:mod:`refvllm.model.packing`): the same loss and gradients without padding.
        """
        embeds = with_zero_term(*self.embed(batch, ablate_regions))
        loss, logits = causal_lm_pass(self.llm, embeds, batch["attention_mask"], batch.get("labels"), logits_at,
                                      loss_normalizer, pack)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, batch: dict, ablate_regions: bool = False, **generation_kwargs) -> torch.Tensor:
        """Greedy by default (the LLM's generation_config), KV cache on. The batch must be LEFT-padded (see
        :func:`left_padded`). Returns only the new token ids [B, new] (padded with the pad id after eos)."""
        mask = batch["attention_mask"]
        if mask.shape[0] > 1 and bool((mask[:, -1] == 0).any()):
            raise ModelInputError("generate needs a left-padded batch (use refvllm.model.refvlm.left_padded)")
        embeds, _ = self.embed(batch, ablate_regions)
        generation_kwargs.setdefault("use_cache", True)
        generation_kwargs.setdefault("pad_token_id", self.pad_token_id)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **generation_kwargs)


def drop_regions(region: torch.Tensor, is_region: torch.Tensor, p: float) -> torch.Tensor:
    """Region tokens [N_R, D] with every token of a sample zeroed with probability ``p``, drawn per sample
    (all of a sample's objects together, exactly what ``ablate_regions`` does to every sample); ``is_region``
    [B, L] marks their positions (row-major order = the order masked_scatter fills)."""
    sample_of_row = is_region.nonzero()[:, 0]
    keep = torch.rand(is_region.shape[0], device=region.device) >= p
    return region * keep[sample_of_row, None].to(region.dtype)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())
