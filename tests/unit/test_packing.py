"""Packed LLM passes (refvllm.model.packing): packed == padded, for both families and every attention backend
that runs here, with video, image and region tokens in the samples."""

from __future__ import annotations

import pytest
import torch
from test_model import ckpt, collate, make_model, make_sample, three_samples  # noqa: F401 (ckpt is a fixture)
from test_qwen2_5_vl import _collate, _region_model, _vlm_processor, synthetic, tiny  # noqa: F401

from refvllm.constants import IGNORE_INDEX
from refvllm.model.packing import Packing, rows_for, shifted_targets


def test_layout_packs_real_tokens_with_their_own_positions():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    packing = Packing.of(mask)
    x = torch.arange(12).reshape(3, 4)
    assert packing.pack(x).tolist() == [[0, 1, 2, 4, 5, 8, 9, 10, 11]]
    assert packing.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert packing.unpack(packing.pack(x), fill=-1).tolist() == [[0, 1, 2, -1], [4, 5, -1, -1], [8, 9, 10, 11]]
    allowed = packing.attention_mask("sdpa")[0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False, False, False, False]  # 2nd sample, pos 1
    eager = packing.attention_mask("eager", torch.float32)[0, 0]
    assert bool((eager[allowed] == 0).all()) and bool((eager[~allowed] == torch.finfo(torch.float32).min).all())
    assert packing.attention_mask("flash_attention_2") is None
    with pytest.raises(ValueError, match="right-padded"):
        Packing.of(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="no isolating mask"):
        packing.attention_mask("paged_attention")


def test_fit_rows_share_rows_first_fit_by_decreasing_length():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])  # lengths 3, 2, 4, 1
    packing = Packing.of(mask, "fit")
    assert packing.sample.tolist() == [[2, 2, 2, 2], [0, 0, 0, 3], [1, 1, -1, -1]]  # rows as long as the longest
    x = torch.arange(16).reshape(4, 4)
    assert packing.pack(x, fill=-1).tolist() == [[8, 9, 10, 11], [0, 1, 2, 12], [4, 5, -1, -1]]
    assert packing.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 0]]
    assert packing.unpack(packing.pack(x), fill=-1).tolist() == [[0, 1, 2, -1], [4, 5, -1, -1], [8, 9, 10, 11],
                                                                 [12, -1, -1, -1]]
    allowed = packing.attention_mask("sdpa")
    assert allowed.shape == (3, 1, 4, 4)
    assert allowed[1, 0, 3].tolist() == [False, False, False, True]  # sample 3 after sample 0: itself only
    assert allowed[2, 0, 3].tolist() == [False, False, False, True]  # row padding: itself only (no NaN)
    assert not bool(allowed[2, 0, :2, 2:].any())  # nothing real attends to padding
    assert rows_for("sdpa") == rows_for("eager") == "fit"
    assert rows_for("flash_attention_2") == rows_for("flex_attention") == "one"


def test_targets_shift_within_each_sample():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]])
    assert shifted_targets(labels).tolist() == [[5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, IGNORE_INDEX]]


def _packed_vs_padded(model, batch, **kwargs):
    """(padded, packed) results: loss, logits at every real position, and the gradient of every trainable."""
    model.train()
    results = []
    for pack in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(batch, loss_normalizer=7.0, pack=pack, **kwargs)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    model.zero_grad(set_to_none=True)
    model.eval()  # the VLM fixture is shared with other tests
    return results


def _assert_same(results, batch, logits_at="all"):
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-6, rtol=1e-5)
    if logits_at == "all":
        real = batch["attention_mask"].bool()
        assert packed.logits.shape == padded.logits.shape
        torch.testing.assert_close(packed.logits[real], padded.logits[real], atol=1e-5, rtol=1e-4)
    assert packed_grads.keys() == padded_grads.keys() and len(padded_grads) > 5
    for name, grad in padded_grads.items():
        # float32 round-off scales with the gradient's size (the sums run in another order): atol relative
        # to its largest entry; a sample seeing another one moves gradients by far more (10% and up)
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(packed_grads[name], grad, atol=2e-6 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_assembled_packed_equals_padded(ckpt, attn, llm):  # noqa: F811
    model = make_model(ckpt, "siglip", llm, f"model.attn_implementation={attn}")
    batch = collate([*three_samples(model.layout), make_sample(model.layout, 4, [[0, 1, 2, 3]], 60, seed=4)])
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # there is padding to drop
    assert Packing.of(batch["attention_mask"], "fit").packed_shape[0] < 4  # two samples share a row
    _assert_same(_packed_vs_padded(model, batch), batch)
    _assert_same(_packed_vs_padded(model, batch, logits_at="labels"), batch, "labels")


def test_vlm_packed_equals_padded_with_videos_images_and_regions(tiny, synthetic):  # noqa: F811
    """The tiny Qwen2.5-VL on processed synthetic samples (videos with region masks and images): packed, each
    sample keeps the mRoPE positions the model's own index computation gives it alone."""
    from refvllm.data.dataset import RefDataset
    from refvllm.data.decode import decode_sample
    from refvllm.data.schema import parse_sample

    processor = _vlm_processor(tiny)
    root, train_file = synthetic
    dataset = RefDataset(train_file, root, processor, 4, processor.frame_size, "rescale")
    items = [dataset[i] for i in range(4)]
    raw = dataset.index.raw(0)  # and a long answer, so that shorter samples share a row under "fit"
    raw["conversations"][-1]["value"] += " It keeps moving that way." * 40
    long = processor.encode(decode_sample(parse_sample(raw, 0), root, 4, processor.frame_size))
    batch = _collate([*items, long], processor.pad_token_id)
    assert {bool(v) for v in batch["visual_is_video"]} == {True, False} and batch["region_masks"].shape[0] > 0
    assert Packing.of(batch["attention_mask"], "fit").packed_shape[0] < 5
    model = _region_model(tiny)
    _assert_same(_packed_vs_padded(model, batch), batch)
    _assert_same(_packed_vs_padded(model, batch, logits_at="labels"), batch, "labels")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_packed_equals_padded_on_cuda(ckpt, attn):  # noqa: F811
    """On CUDA, where flex_attention trains (torch's CPU inductor build of it does not compile here: the suite
    cannot test it on CPU)."""
    model = make_model(ckpt, "siglip", "qwen2", f"model.attn_implementation={attn}").cuda()
    batch = collate(three_samples(model.layout))
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    _assert_same(_packed_vs_padded(model, batch), batch)
