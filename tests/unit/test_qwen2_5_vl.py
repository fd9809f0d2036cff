"""Qwen2.5-VL checkpoints and model-side pieces (refvllm/model/qwen2_5_vl.py) against plain transformers."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refvllm.data import qwen2_5_vl as qd
from refvllm.model import qwen2_5_vl as q


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny checkpoint (float32) and what plain transformers loads from it."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = q.write_checkpoint(tmp_path_factory.mktemp("tiny-vl") / "vl", "tiny", dtype=torch.float32)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    return {"path": path, "model": model, "tokenizer": AutoTokenizer.from_pretrained(path),
            "image_processor": AutoImageProcessor.from_pretrained(path),
            "pre": qd.Preprocessor.from_file(f"{path}/preprocessor_config.json")}


def _frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num, height, width, 3), dtype=np.uint8)


def test_tiny_checkpoint_is_a_plain_transformers_qwen2_5_vl(tiny):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    config = json.loads((Path(tiny["path"]) / "config.json").read_text())
    assert config["model_type"] == q.MODEL_TYPE
    for name, token in (("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert getattr(model.config, name) == tokenizer.convert_tokens_to_ids(token)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.generation_config.do_sample and model.generation_config.repetition_penalty == 1.05
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is it?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n")
    assert type(tiny["image_processor"]).__name__.startswith("Qwen2VLImageProcessor")


@pytest.mark.parametrize("size", [(112, 140), (100, 130), (30, 400)])
def test_frame_patches_equal_the_image_processor(tiny, size):
    """One frame (repeated over the temporal patch, as the image processor does): the same pixels and grid,
    through resizing too (100 x 130 is not a multiple of 28; 30 x 400 is below min_pixels on one side)."""
    frame = _frames(1, *size)
    ours, grid = qd.video_patches(frame, tiny["pre"])
    theirs = tiny["image_processor"](images=[frame[0]], return_tensors="pt")
    assert tuple(theirs["image_grid_thw"][0].tolist()) == grid
    torch.testing.assert_close(ours, theirs["pixel_values"], rtol=0, atol=1e-5)


def test_video_patches_pair_consecutive_frames(tiny):
    """Row layout (C, tp, p, p): temporal slot k of token frame j holds frame 2j + k; an odd count repeats
    the last frame."""
    frames = _frames(3, 56, 84, seed=1)
    patches, (t, h, w) = qd.video_patches(frames, tiny["pre"])
    assert (t, h, w) == (2, 4, 6)
    rows = patches.reshape(t, h // 2, w // 2, 2, 2, 3, 2, 14, 14)
    single = [qd.video_patches(frames[i:i + 1], tiny["pre"])[0].reshape(h // 2, w // 2, 2, 2, 3, 2, 14, 14)
              for i in range(3)]
    for j, k, frame in ((0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 2)):
        torch.testing.assert_close(rows[j, :, :, :, :, :, k], single[frame][:, :, :, :, :, 0])


def _video_prompt(tiny, grid: tuple[int, int, int], question: str = "What is the red circle doing?"):
    tokenizer = tiny["tokenizer"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}], tokenize=False,
        add_generation_prompt=True)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * (grid[0] * grid[1] * grid[2] // 4))
    return tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("num_frames, fps", [(4, 2.0), (3, 1.0)])
def test_one_vision_pass_and_own_positions_give_plain_transformers_logits(tiny, num_frames, fps):
    """refvllm's split (vision pass, scatter, the model's own mRoPE index, forward on embeddings) against the
    model's own forward on the same pixels, ids, grid and time between token frames."""
    model = tiny["model"]
    pixels, grid = qd.video_patches(_frames(num_frames, 84, 112, seed=2), tiny["pre"])
    ids = _video_prompt(tiny, grid)
    grid_thw, mask = torch.tensor([grid]), torch.ones_like(ids)
    seconds = torch.tensor([tiny["pre"].temporal_patch_size / fps])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grid_thw,
                      second_per_grid_ts=seconds, mm_token_type_ids=q.token_types(ids, model.config)).logits
        embeds = model.get_input_embeddings()(ids).masked_scatter(
            (ids == model.config.video_token_id)[..., None], q.merged_features(model, pixels, grid_thw))
        positions = q.position_ids(model, ids, mask, grid_thw, seconds)
        ours = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    video = (ids[0] == model.config.video_token_id).nonzero()[:, 0]
    # 3-D positions on the video: the temporal axis steps by tokens_per_second * seconds per token frame.
    step = model.config.vision_config.tokens_per_second * seconds.item()
    t_positions = positions[0, 0, video].unique()
    assert len(t_positions) == grid[0] and (t_positions.diff() == int(step)).all()


def test_real_shaped_config_at_reduced_depth():
    tokenizer = q.tokenizer_for("qwen2.5-vl-7b")
    config = q.vl_config("qwen2.5-vl-7b", tokenizer, layers=1, vision_layers=2)
    text, vision = config.text_config, config.vision_config
    assert (text.vocab_size, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.num_hidden_layers) == (152064, 3584, 28, 4, 1)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and not config.tie_word_embeddings
    assert (config.vision_start_token_id, config.image_token_id, config.video_token_id) == (151652, 151655, 151656)
    assert (vision.hidden_size, vision.out_hidden_size, vision.depth, vision.fullatt_block_indexes) == (
        1280, 3584, 2, [1])
    assert q.vl_config("qwen2.5-vl-3b", tokenizer, layers=1).tie_word_embeddings


# ------------------------------------------------------------------------------------- the region pathway

MARK = "REGIONSLOT"


def _region_model(tiny, max_tokens: int = 2, seed: int = 0):
    from refvllm.layout import TokenLayout
    from refvllm.model.region import RegionEncoder

    width = tiny["model"].config.text_config.hidden_size
    layout = TokenLayout(grid=1, spatial_pool=1, temporal_pool=1, region_max_tokens=max_tokens,
                         region_merge="merge")  # only the region fields count here
    torch.manual_seed(seed)
    region = RegionEncoder(width, width, width, layout, patch_size=28)
    return q.RegionVLM(tiny["model"], region, tiny["tokenizer"].pad_token_id).eval()


def _sample(tiny, frames: np.ndarray, fps: float, objects: list[list[tuple[int, torch.Tensor]]],
            question: str = f"What is {MARK} doing?") -> dict:
    """One sample as a :func:`_collate` item (what VLMProcessor.encode returns, built by hand here): ids
    with the video run expanded and the region runs of ``objects`` (each a list of (frame, mask)) at the
    question's marks."""
    from refvllm.constants import REGION_TOKEN_ID

    pixels, grid = qd.video_patches(frames, tiny["pre"])
    tokenizer = tiny["tokenizer"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}], tokenize=False,
        add_generation_prompt=True).replace("<|video_pad|>", "<|video_pad|>" * (grid[0] * grid[1] * grid[2] // 4))
    pieces = text.split(MARK)
    assert len(pieces) == len(objects) + 1
    ids = []
    for k, piece in enumerate(pieces):
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if k < len(objects):
            ids += [REGION_TOKEN_ID] * min(2, len(objects[k]))
    masks = [(f, k, m) for k, o in enumerate(objects) for f, m in o]
    size = (grid[1] * 14, grid[2] * 14)
    return {"input_ids": torch.tensor(ids), "pixel_values": pixels, "visual_grid_thw": torch.tensor(grid),
            "visual_is_video": True, "second_per_grid_ts": 2 / fps,
            "region_masks": torch.stack([m for _, _, m in masks]) if masks else torch.zeros(0, *size, dtype=torch.bool),
            "region_frame_index": torch.tensor([f for f, _, _ in masks], dtype=torch.long),
            "region_object_index": torch.tensor([k for _, k, _ in masks], dtype=torch.long),
            "num_objects": len(objects)}


def _collate(items: list[dict], pad: int, side: str = "right") -> dict:
    """The RegionVLM batch of ``items`` (hand-built ones get a sample index and id)."""
    from refvllm.data.collate import collate

    items = [{"sample_index": i, "sample_id": str(i), **it} for i, it in enumerate(items)]
    return collate(items, pad, side, qd.VLMProcessor.batch_visuals)


def _plain_inputs(vlm, batch: dict) -> dict:
    """A RegionVLM batch of videos as plain transformers' inputs: ids, pixels, grids, seconds, token types."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values_videos": batch["pixel_values"], "video_grid_thw": batch["visual_grid_thw"],
            "second_per_grid_ts": batch["second_per_grid_ts"],
            "mm_token_type_ids": q.token_types(batch["input_ids"], vlm.config)}


def _plain_logits(vlm, batch: dict) -> torch.Tensor:
    """Plain transformers' forward on a batch of videos: its own vision pass, placeholders and positions."""
    with torch.no_grad():
        return vlm(**_plain_inputs(vlm, batch)).logits


def _cell_mask(height: int, width: int, row: int, col: int) -> torch.Tensor:
    """The 28 x 28 pixel cell (row, col) of a frame: exactly one merged token."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[row * 28:(row + 1) * 28, col * 28:(col + 1) * 28] = True
    return mask


def test_region_vlm_without_regions_is_the_plain_vlm(tiny):
    model = _region_model(tiny)
    sample = _sample(tiny, _frames(4, 56, 84, seed=3), 2.0, [], question="What happens?")
    batch = _collate([sample], tiny["tokenizer"].pad_token_id)
    with torch.no_grad():
        ours = model(batch).logits
    torch.testing.assert_close(ours, _plain_logits(tiny["model"], batch), rtol=1e-5, atol=1e-5)


def test_region_tokens_pool_the_merged_tokens_of_their_token_frame(tiny):
    """With the MLP an identity, a mask covering exactly one 28-px cell gives that cell's merged token; frames
    0 and 1 share token frame 0, frame 2 is token frame 1."""
    from refvllm.constants import REGION_TOKEN_ID

    model = _region_model(tiny)
    model.region.mlp = torch.nn.Identity()
    frames = _frames(4, 56, 84, seed=4)
    objects = [[(0, _cell_mask(56, 84, 0, 1)), (1, _cell_mask(56, 84, 0, 1))], [(2, _cell_mask(56, 84, 1, 2))]]
    batch = _collate([_sample(tiny, frames, 2.0, objects, question=f"Is {MARK} near {MARK}?")],
                          tiny["tokenizer"].pad_token_id)
    with torch.no_grad():
        embeds, _ = model.embed(batch)
        merged = q.merged_features(model.vlm, batch["pixel_values"], batch["visual_grid_thw"])
    merged = merged.reshape(2, 2, 3, -1)  # the one video's (token frame, row, col)
    region = embeds[0, batch["input_ids"][0] == REGION_TOKEN_ID]
    assert region.shape[0] == 3
    torch.testing.assert_close(region[0], merged[0, 0, 1])
    torch.testing.assert_close(region[1], merged[0, 0, 1])  # frame 1: the same token frame
    torch.testing.assert_close(region[2], merged[1, 1, 2])


def test_the_encoder_patches_come_back_in_pixel_order_and_regions_can_pool_them(tiny):
    """vision_pass undoes the encoder's window order: the merger applied to its patches (4 consecutive rows =
    one merge unit in pixel order) gives the merged tokens; with region_features "encoder" a mask on one 14-px
    cell pools exactly that patch (row 2*hb + mi, column 2*wb + mj of its token frame)."""
    from refvllm.layout import TokenLayout
    from refvllm.model.region import RegionEncoder

    vlm = tiny["model"]
    frames = _frames(4, 56, 112, seed=9)  # 4 x 8 patches: windows of 112 px split it, so the order matters
    mask = torch.zeros(56, 112, dtype=torch.bool)
    mask[14:28, 70:84] = True  # patch row 1, column 5: merge unit (0, 2), slot (1, 1)
    batch = _collate([_sample(tiny, frames, 2.0, [[(2, mask)]])], tiny["tokenizer"].pad_token_id)
    with torch.no_grad():
        merged, patches = q.vision_pass(vlm, batch["pixel_values"], batch["visual_grid_thw"])
        torch.testing.assert_close(vlm.model.visual.merger(patches), merged, rtol=1e-5, atol=1e-5)
        layout = TokenLayout(grid=1, spatial_pool=1, temporal_pool=1, region_max_tokens=2, region_merge="merge")
        width = vlm.config.vision_config.hidden_size
        region = RegionEncoder(width, width, width, layout, patch_size=14)
        region.mlp = torch.nn.Identity()
        model = q.RegionVLM(vlm, region, tiny["tokenizer"].pad_token_id, region_features="encoder").eval()
        pooled, _ = model._regions(batch, merged, patches)
    unit = patches.reshape(2, 2, 4, 2, 2, -1)  # (token frame, hb, wb, mi, mj): frame 2 is token frame 1
    assert pooled.shape[0] == 1
    torch.testing.assert_close(pooled[0], unit[1, 0, 2, 1, 1])
    # "both": each patch beside its merged token; the same mask pools that patch and merge unit (0, 2)'s token.
    text_width = vlm.config.text_config.hidden_size
    region = RegionEncoder(width + text_width, width, width, layout, patch_size=14)
    region.mlp = torch.nn.Identity()
    model = q.RegionVLM(vlm, region, tiny["tokenizer"].pad_token_id, region_features="both").eval()
    with torch.no_grad():
        pooled, _ = model._regions(batch, merged, patches)
    token = merged.reshape(2, 2, 4, -1)[1, 0, 2]
    torch.testing.assert_close(pooled[0], torch.cat([unit[1, 0, 2, 1, 1], token]))


def test_region_vlm_trains_the_region_encoder_and_changes_the_answer(tiny):
    from refvllm.constants import IGNORE_INDEX

    model = _region_model(tiny).train()
    sample = _sample(tiny, _frames(4, 56, 84, seed=5), 2.0, [[(0, _cell_mask(56, 84, 1, 0))]])
    answer = tiny["tokenizer"]("It moves left.<|im_end|>", add_special_tokens=False)["input_ids"]
    sample["input_ids"] = torch.cat([sample["input_ids"], torch.tensor(answer)])
    batch = _collate([sample], tiny["tokenizer"].pad_token_id)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[0, -len(answer):] = torch.tensor(answer)
    batch["labels"] = labels
    out = model(batch, logits_at="labels")
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.region.mlp.parameters())
    full = model(batch).loss  # every position: the same loss
    torch.testing.assert_close(out.loss, full)
    with torch.no_grad():
        ablated = model.eval()(batch, ablate_regions=True).logits
        kept = model(batch).logits
    assert not torch.allclose(ablated, kept)


def test_batch_of_different_frame_sizes_equals_each_sample_alone(tiny):
    model = _region_model(tiny)
    a = _sample(tiny, _frames(4, 56, 84, seed=6), 2.0, [[(1, _cell_mask(56, 84, 1, 1))]])
    b = _sample(tiny, _frames(2, 84, 56, seed=7), 1.0, [[(0, _cell_mask(84, 56, 2, 0)), (1, _cell_mask(84, 56, 0, 1))]],
                question=f"Where does {MARK} go next, and why?")
    pad = tiny["tokenizer"].pad_token_id
    with torch.no_grad():
        together = model(_collate([a, b], pad)).logits
        for i, s in enumerate((a, b)):
            alone = model(_collate([s], pad)).logits[0]
            torch.testing.assert_close(together[i, : len(s["input_ids"])], alone, rtol=1e-4, atol=1e-5)


def test_lora_on_the_language_model_only_and_a_merge_plain_transformers_loads(tiny, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from refvllm.config import LoraConfig

    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny["path"]).eval()
    peft_vlm = q.language_model_lora(vlm, LoraConfig(r=4, alpha=8, dropout=0.0))
    adapted = {n for n, _ in peft_vlm.named_modules() if n.endswith(".lora_A")}
    assert adapted and all(".language_model." in n for n in adapted)
    assert not any("visual" in n for n, p in peft_vlm.named_parameters() if p.requires_grad)
    assert {n.split(".")[-2] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    model = _region_model(tiny)
    model.vlm = peft_vlm
    batch = _collate([_sample(tiny, _frames(4, 56, 84, seed=8), 2.0, [], question="What happens?")],
                          tiny["tokenizer"].pad_token_id)
    with torch.no_grad():
        initial = model(batch).logits
        for name, p in peft_vlm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a trained adapter
        trained = model(batch).logits
    plain_initial = _region_model(tiny)(batch).logits.detach()
    torch.testing.assert_close(initial, plain_initial)  # LoRA starts at the base model
    assert not torch.allclose(trained, initial)
    merged = peft_vlm.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_plain_logits(loaded, batch), trained, rtol=1e-4, atol=1e-4)


def test_media_frame_rate_and_the_time_between_token_frames(tmp_path):
    from helpers_media import indexed_frames, video_sample, write_frame_folder, write_video

    from refvllm.data.decode import decode_sample
    from refvllm.data.media import FrameFolderReader, VideoFileReader
    from refvllm.data.schema import parse_sample
    from refvllm.errors import DataError

    frames = indexed_frames(16, 48, 64)
    write_video(tmp_path / "v.mp4", frames, fps=10)
    write_frame_folder(tmp_path / "f", frames[:4])
    assert VideoFileReader(tmp_path / "v.mp4").fps == pytest.approx(10.0)
    assert FrameFolderReader(tmp_path / "f").fps is None
    decoded = decode_sample(parse_sample(video_sample("v.mp4"), 0), tmp_path, 4, 32)
    assert decoded.fps == pytest.approx(10.0) and decoded.plan.frame_indices == [2, 6, 10, 14]
    # stride 4 frames at 10 fps = 0.4 s a frame, 0.8 s per token frame of 2
    assert qd.seconds_per_token_frame(decoded.plan.frame_indices, decoded.fps, 2) == pytest.approx(0.8)
    assert qd.seconds_per_token_frame([0, 1, 5], None, 2, default_fps=2.0) == pytest.approx(2.5)
    assert qd.seconds_per_token_frame([3], 5.0, 2) == pytest.approx(0.4)
    with pytest.raises(DataError, match="no frame rate") as e:
        qd.seconds_per_token_frame([0, 2], None, 2)
    assert e.value.category == "frame_rate"


# ------------------------------------------------------------------------------------------- processor


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from refvllm.data.synthetic import generate

    root = tmp_path_factory.mktemp("vl-data")
    files = generate(root, num_train=6, num_eval=0, seed=0, num_frames=4)
    return root, files.train_file


def _without_regions(record: dict) -> dict:
    """A video sample of ``record``'s video with a question about no object."""
    return {"id": "plain", "video": record["video"], "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A."}]}


def _vlm_processor(tiny, num_frames=4):
    from refvllm.layout import TokenLayout

    layout = TokenLayout(grid=1, spatial_pool=1, temporal_pool=1, region_max_tokens=2, region_merge="merge")
    # The synthetic videos are frame folders, which state no frame rate: the default stands in.
    return qd.VLMProcessor.from_checkpoint(tiny["path"], layout, max_length=4096, num_frames=num_frames,
                                          default_fps=2.0)


def test_processor_items_run_through_region_vlm_and_the_plain_model_accepts_their_visual_tokens(tiny, synthetic):
    """Synthetic samples through the data path (decode at Qwen's aspect-kept size, the VLM's own ids and
    pixels): RegionVLM trains on the batch, and plain transformers, given the same ids (regions ablated to
    text) and pixels, finds exactly as many visual placeholders as the pixels give tokens."""
    from refvllm.constants import REGION_TOKEN_ID
    from refvllm.data.dataset import RefDataset

    processor = _vlm_processor(tiny)
    root, train_file = synthetic
    dataset = RefDataset(train_file, root, processor, 4, processor.frame_size, "rescale")
    items = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(it, dict) for it in items), [getattr(it, "reason", None) for it in items]
    kinds = {bool(it["visual_is_video"]) for it in items}
    assert kinds == {True, False}  # videos and images both
    for it in items:
        t, h, w = it["visual_grid_thw"].tolist()
        assert it["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
        assert it["region_masks"].shape[1:] == (h * 14, w * 14)  # masks at the frame size the model sees
    model = _region_model(tiny).train()
    batch = _collate(items[:3], processor.pad_token_id)
    out = model(batch, logits_at="labels")
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.region.mlp[0].weight.grad.abs().sum() > 0
    vlm = tiny["model"]
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == REGION_TOKEN_ID, processor.pad_token_id)
    video = batch["visual_is_video"]
    rows = batch["visual_grid_thw"].prod(-1)
    pixels = batch["pixel_values"].split(rows.tolist())
    with torch.no_grad():
        for i in range(3):  # one sample at a time: the plain model takes videos and images as separate inputs
            key = "video" if video[i] else "image"
            plain = vlm(input_ids=ids[i:i + 1], attention_mask=batch["attention_mask"][i:i + 1],
                        **{("pixel_values_videos" if video[i] else "pixel_values"): pixels[i],
                           f"{key}_grid_thw": batch["visual_grid_thw"][i:i + 1]},
                        **({"second_per_grid_ts": batch["second_per_grid_ts"][i:i + 1]} if video[i] else {}),
                        mm_token_type_ids=q.token_types(ids[i:i + 1], vlm.config))
            assert torch.isfinite(plain.logits).all()


def test_a_video_without_regions_through_the_processor_equals_the_plain_model(tiny, synthetic):
    from refvllm.data.decode import decode_sample
    from refvllm.data.schema import parse_sample

    processor = _vlm_processor(tiny)
    root, train_file = synthetic
    raw = _without_regions(next(r for r in json.loads(Path(train_file).read_text()) if "video" in r))
    decoded = decode_sample(parse_sample(raw, 0), root, 4, processor.frame_size)
    batch = _collate([processor.encode(decoded)], processor.pad_token_id)
    with torch.no_grad():
        ours = _region_model(tiny)(batch).logits
    torch.testing.assert_close(ours, _plain_logits(tiny["model"], batch), rtol=1e-5, atol=1e-5)
    assert batch["second_per_grid_ts"].item() > 0  # the synthetic video's real frame rate and the plan's stride


def test_build_region_vlm_trainability_roles_and_masters(tiny):
    from refvllm.config import load_config
    from refvllm.model.build import parameter_counts, parameter_groups

    model_cfg = load_config(None, [f"model.vlm_path={tiny['path']}", "model.lora.r=4", "model.lora.alpha=8",
                                   "model.region.max_tokens=2", "model.dtype=bfloat16"]).model
    model = q.build_region_vlm(model_cfg, float32_masters=True)
    counts = parameter_counts(model)
    assert counts["vision"]["trainable"] == counts["projector"]["trainable"] == 0
    assert 0 < counts["llm"]["trainable"] < counts["llm"]["total"]  # the adapters
    assert counts["region"]["trainable"] == counts["region"]["total"] > 0
    total = sum(p.numel() for p in model.parameters())
    assert sum(c["total"] for c in counts.values()) == total  # every parameter in exactly one role
    assert counts["llm"]["dtypes"] == "float32 trainable, bfloat16 frozen"
    groups = parameter_groups(model)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad and n.startswith("vlm."))
    assert {k for k, v in groups.items() if v} == {"llm", "region"}
    merger_full = q.build_region_vlm(load_config(None, [f"model.vlm_path={tiny['path']}", "model.lora.r=4",
                                                        "model.train_projector=full"]).model)
    assert parameter_counts(merger_full)["projector"]["trainable"] == parameter_counts(merger_full)["projector"][
        "total"]  # selectable: train_projector=full trains the merger (auto, the default, keeps it frozen)


def test_generation_equals_plain_transformers_and_batching_keeps_answers(tiny, synthetic):
    """Greedy generation through RegionVLM (our embeddings, the VLM's own generate and positions) gives the
    tokens of plain transformers' generate on the same prompt and pixels; batched left-padded prompts give
    what they give alone."""
    from refvllm.data.decode import decode_sample
    from refvllm.data.schema import parse_sample

    processor = _vlm_processor(tiny)
    root, train_file = synthetic
    records = json.loads(Path(train_file).read_text())
    video = next(r for r in records if "video" in r)
    plain_raw = _without_regions(video)
    prompts = [processor.encode_prompt(decode_sample(parse_sample(raw, i), root, 4, processor.frame_size))
               for i, raw in enumerate([plain_raw, video])]
    model = _region_model(tiny)
    vlm = tiny["model"]
    greedy = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0, "top_k": None, "top_p": None,
              "temperature": None}
    alone = [model.generate(_collate([p], processor.pad_token_id, "left"), **greedy)[0] for p in prompts]
    batch = _collate([prompts[0]], processor.pad_token_id, "left")
    with torch.no_grad():
        plain = vlm.generate(**_plain_inputs(vlm, batch), **greedy)
    assert alone[0].tolist() == plain[0, batch["input_ids"].shape[1]:].tolist()
    together = model.generate(_collate(prompts, processor.pad_token_id, "left"), **greedy)
    for i in range(2):
        assert together[i, : len(alone[i])].tolist() == alone[i].tolist()


def test_tiny_model_command_writes_a_vlm_plain_transformers_loads(tmp_path, capsys):
    """``refvllm tiny-model OUT --family qwen2_5_vl``: OUT/vlm, deterministic for a seed, loaded by plain
    transformers with its tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from refvllm.cli import main as cli

    assert cli(["tiny-model", str(tmp_path / "a"), "--family", "qwen2_5_vl", "--seed", "3"]) == 0
    path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["vlm"]
    assert path == str(tmp_path / "a" / "vlm")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id
    assert AutoImageProcessor.from_pretrained(path) is not None
    assert not model.generation_config.do_sample
    assert cli(["tiny-model", str(tmp_path / "b"), "--family", "qwen2_5_vl", "--seed", "3"]) == 0
    same = [(tmp_path / d / "vlm" / "model.safetensors").read_bytes() for d in ("a", "b")]
    assert same[0] == same[1]


def _hf_messages(kind: str, question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def test_an_image_without_regions_equals_plain_transformers_with_its_own_processing(tiny, synthetic):
    """The whole path against Hugging Face's own pieces, not ours: the image through HF's image processor,
    the conversation through the checkpoint's chat template (system prompt included), its <|image_pad|>
    expanded to the grid's token count as Qwen2_5_VLProcessor does. refvllm's processor makes the same ids
    and pixels, RegionVLM (LoRA at its initial state) the same logits as plain from_pretrained, and greedy
    generation the same answer."""
    from PIL import Image

    from refvllm.config import load_config
    from refvllm.data.decode import decode_sample
    from refvllm.data.schema import parse_sample

    root, train_file = synthetic
    record = next(r for r in json.loads(Path(train_file).read_text()) if "image" in r)
    question = "How many objects are in the image?"
    raw = {"id": "plain", "image": record["image"], "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "three"}]}
    processor = _vlm_processor(tiny)
    decoded = decode_sample(parse_sample(raw, 0), root, 4, processor.frame_size)
    prompt = processor.encode_prompt(decoded)
    theirs = tiny["image_processor"](images=[np.asarray(Image.open(root / record["image"]).convert("RGB"))],
                                     return_tensors="pt")
    tokens = int(theirs["image_grid_thw"].prod()) // 4
    # The question follows the image on a new line in refvllm's rendering of "<image>\n..." (LLaVA's convention).
    text = tiny["tokenizer"].apply_chat_template(_hf_messages("image", "\n" + question), tokenize=False,
                                                 add_generation_prompt=True)
    ids = tiny["tokenizer"](text.replace("<|image_pad|>", "<|image_pad|>" * tokens), return_tensors="pt")["input_ids"]
    assert prompt["input_ids"].tolist() == ids[0].tolist()
    torch.testing.assert_close(prompt["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)
    assert prompt["visual_grid_thw"].tolist() == theirs["image_grid_thw"][0].tolist()

    cfg = load_config(None, [f"model.vlm_path={tiny['path']}", "model.lora.r=4", "model.lora.alpha=8"])
    model = q.build_region_vlm(cfg.model).eval()  # LoRA B = 0: the VLM as it was loaded
    vlm = tiny["model"]
    plain = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": theirs["pixel_values"],
             "image_grid_thw": theirs["image_grid_thw"], "mm_token_type_ids": q.token_types(ids, vlm.config)}
    batch = processor.collate([prompt], "left")
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, vlm(**plain).logits, rtol=1e-5, atol=1e-5)
        greedy = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0, "top_k": None,
                  "top_p": None, "temperature": None}
        answer = vlm.generate(**plain, **greedy)[0, ids.shape[1]:]
    assert model.generate(batch, **greedy)[0].tolist() == answer.tolist()


def _torchvision_works() -> bool:
    """HF's Qwen2-VL video processor needs torchvision (the GPU image has it; the registry's CUDA build fails
    to import beside the CPU torch here)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError "operator torchvision::nms does not exist"
        return False
    return True


@pytest.mark.skipif(not _torchvision_works(), reason="HF's video processor needs a working torchvision")
def test_a_video_without_regions_equals_hf_s_own_video_processor(tiny, synthetic):
    """Where HF's video processor runs: the same frames through Qwen2_5_VLProcessor (do_sample_frames=False,
    the clip's fps in its metadata) give refvllm's pixels (to the resize backends' difference), grid,
    second_per_grid_ts and ids, and the plain model's logits on HF's tensors equal RegionVLM's on ours."""
    from transformers import AutoProcessor

    from refvllm.data.decode import decode_sample
    from refvllm.data.schema import parse_sample

    root, train_file = synthetic
    raw = _without_regions(next(r for r in json.loads(Path(train_file).read_text()) if "video" in r))
    processor = _vlm_processor(tiny)
    decoded = decode_sample(parse_sample(raw, 0), root, 4, processor.frame_size)
    prompt = processor.encode_prompt(decoded)
    hf = AutoProcessor.from_pretrained(tiny["path"])
    text = hf.apply_chat_template(_hf_messages("video", "\nWhat happens?"), tokenize=False, add_generation_prompt=True)
    # HF takes the frames as given (do_sample_frames=False) and the time between them from the metadata's fps:
    # the rate at which the planned frames were sampled, tp / second_per_grid_ts.
    metadata = {"fps": 2.0 / prompt["second_per_grid_ts"], "total_num_frames": len(decoded.frames)}
    out = hf(text=[text], videos=[list(decoded.frames)], do_sample_frames=False, video_metadata=[metadata],
             return_tensors="pt")
    assert out["input_ids"][0].tolist() == prompt["input_ids"].tolist()
    assert out["video_grid_thw"][0].tolist() == prompt["visual_grid_thw"].tolist()
    torch.testing.assert_close(out["second_per_grid_ts"].float(), torch.tensor([prompt["second_per_grid_ts"]]))
    torch.testing.assert_close(out["pixel_values_videos"], prompt["pixel_values"], rtol=0, atol=0.05)
    batch = processor.collate([prompt], "left")
    vlm = tiny["model"]
    with torch.no_grad():
        theirs = vlm(**{"mm_token_type_ids": q.token_types(out["input_ids"], vlm.config), **out}).logits
        ours = _region_model(tiny)(batch).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_the_dummy_batch_runs_every_trainable_module_with_zero_loss(tiny):
    """The trainer's stand-in for an all-skipped micro-batch (VLMProcessor.dummy_item: one black image at the
    checkpoint's smallest size, no label): loss exactly 0, yet the region encoder (no mask in it) and the LoRA
    weights get a gradient, so DDP's all-reduce and DeepSpeed's micro-step count see this process."""
    from refvllm.config import load_config

    processor = _vlm_processor(tiny)
    cfg = load_config(None, [f"model.vlm_path={tiny['path']}", "model.lora.r=4", "model.lora.alpha=8"])
    model = q.build_region_vlm(cfg.model, float32_masters=True).train()
    batch = processor.collate([processor.dummy_item()])
    assert batch["batch_size"] == 1 and tuple(batch["visual_grid_thw"][0].tolist()) == (1, 4, 4)  # min_pixels 56^2
    out = model(batch, loss_normalizer=1.0, logits_at="labels")
    assert float(out.loss) == 0.0
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]


def test_length_estimates_are_exact_at_a_stated_size_and_an_upper_bound_without(tiny, synthetic):
    """The token-budget batcher's estimate (no media opened): exact when the sample states its media's size
    (Qwen's resize is then known), the ``max_pixels`` bound when it does not."""
    from refvllm.data.dataset import RefDataset
    from refvllm.data.media import open_media
    from refvllm.data.schema import parse_sample

    processor = _vlm_processor(tiny)
    processor.pre = dataclasses.replace(processor.pre, max_pixels=64 * 64)  # a bound near the real size
    root, train_file = synthetic
    dataset = RefDataset(train_file, root, processor, 4, processor.frame_size, "rescale")
    for i in range(len(dataset)):
        raw, actual = dataset.index.raw(i), len(dataset[i]["input_ids"])
        reader = open_media(root, parse_sample(raw, i))
        sized = parse_sample({**raw, "height": reader.height, "width": reader.width}, i)
        assert processor.estimate_tokens(sized) == actual, raw["id"]
        assert processor.estimate_tokens(parse_sample(raw, i)) >= actual
