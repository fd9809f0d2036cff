"""Qwen2.5-VL checkpoints and model-side pieces (refvllm/model/qwen2_5_vl.py) against plain transformers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refvllm.model import qwen2_5_vl as q


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny checkpoint (float32) and what plain transformers loads from it."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = q.write_checkpoint(tmp_path_factory.mktemp("tiny-vl") / "vl", "tiny", dtype=torch.float32)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    return {"path": path, "model": model, "tokenizer": AutoTokenizer.from_pretrained(path),
            "image_processor": AutoImageProcessor.from_pretrained(path),
            "pre": q.Preprocessor.from_file(f"{path}/preprocessor_config.json")}


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
    ours, grid = q.video_patches(frame, tiny["pre"])
    theirs = tiny["image_processor"](images=[frame[0]], return_tensors="pt")
    assert tuple(theirs["image_grid_thw"][0].tolist()) == grid
    torch.testing.assert_close(ours, theirs["pixel_values"], rtol=0, atol=1e-5)


def test_video_patches_pair_consecutive_frames(tiny):
    """Row layout (C, tp, p, p): temporal slot k of token frame j holds frame 2j + k; an odd count repeats
    the last frame."""
    frames = _frames(3, 56, 84, seed=1)
    patches, (t, h, w) = q.video_patches(frames, tiny["pre"])
    assert (t, h, w) == (2, 4, 6)
    rows = patches.reshape(t, h // 2, w // 2, 2, 2, 3, 2, 14, 14)
    single = [q.video_patches(frames[i:i + 1], tiny["pre"])[0].reshape(h // 2, w // 2, 2, 2, 3, 2, 14, 14)
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
    pixels, grid = q.video_patches(_frames(num_frames, 84, 112, seed=2), tiny["pre"])
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
