"""Real-shaped checkpoints (refvllm/model/shapes.py) carry the published values, without building any weights:
widths, heads, patch and image sizes, the so400m grid and its border, CLIP's CLS token, Qwen2.5's vocabulary,
special-token ids, chat template and sampling generation config. Plus the long-sample helpers of refvllm smoke."""

import json

import pytest
import torch

from refvllm.config import load_config
from refvllm.layout import load_visual_spec, make_token_layout
from refvllm.model import shapes
from refvllm.model.tiny import DEFAULT_SYSTEM


def _spec_of(tmp_path, name: str, **overrides):
    """load_visual_spec / make_token_layout on a directory holding only the shape's config + preprocessor."""
    shapes.vision_config(name).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(shapes.VISION_SHAPES[name].preprocessor))
    cfg = load_config(None, [f"model.vision_path={tmp_path}", "model.llm_path=unused",
                             *(f"{k}={v}" for k, v in overrides.items())])
    spec = load_visual_spec(cfg.model)
    return spec, make_token_layout(cfg.model, spec)


def test_siglip_so400m_grid_leaves_a_6_pixel_border(tmp_path):
    config = shapes.vision_config("siglip-so400m")
    assert type(config).__name__ == "SiglipConfig"  # dual-tower, as google/siglip-so400m-patch14-384
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.patch_size, v.image_size) == \
        (1152, 4304, 16, 14, 384)
    assert (t.vocab_size, t.hidden_size, t.num_attention_heads, t.num_hidden_layers) == (32000, 1152, 16, 1)
    spec, layout = _spec_of(tmp_path, "siglip-so400m")
    assert (spec.image_size, spec.patch_size, spec.grid) == (384, 14, 27)
    assert spec.image_size - spec.grid * spec.patch_size == 6  # the border no patch covers
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert layout.pooled_grid == 14 and layout.num_visual_tokens(16) == 16 * 196 == 3136  # spatial_pool 2


def test_clip_l_336_has_a_cls_token(tmp_path):
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    config = shapes.vision_config("clip-l-336")
    assert type(config).__name__ == "CLIPConfig" and config.projection_dim == 768
    v = config.vision_config
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.patch_size, v.image_size) == \
        (1024, 4096, 16, 14, 336)
    assert v.hidden_act == "quick_gelu"
    embeddings = CLIPVisionEmbeddings(v)  # 1.2M parameters: the one part that decides the token count
    assert embeddings.num_positions == 24 * 24 + 1 == 577
    assert embeddings(torch.zeros(1, 3, 336, 336)).shape == (1, 577, 1024)
    spec, _ = _spec_of(tmp_path, "clip-l-336")
    assert spec.grid == 24 and spec.mean[0] == pytest.approx(0.48145466)


def test_siglip2_naflex_square_grid_of_its_position_embeddings(tmp_path):
    config = shapes.vision_config("siglip2-so400m-naflex")
    assert type(config).__name__ == "Siglip2VisionConfig" and config.model_type == "siglip2_vision_model"
    assert (config.hidden_size, config.num_attention_heads, config.patch_size, config.num_patches) == \
        (1152, 16, 16, 256)
    spec, _ = _spec_of(tmp_path, "siglip2-so400m-naflex")
    assert (spec.image_size, spec.grid) == (256, 16)
    with pytest.raises(Exception, match="vision tower only"):
        shapes.vision_config("siglip2-so400m-naflex", full=True)


@pytest.mark.parametrize(("name", "width", "heads", "kv", "tied", "vocab"), [
    ("qwen2.5-0.5b", 896, 14, 2, True, 151936),
    ("qwen2.5-1.5b", 1536, 12, 2, True, 151936),
    ("qwen2.5-3b", 2048, 16, 2, True, 151936),
    ("qwen2.5-7b", 3584, 28, 4, False, 152064),
    ("qwen2.5-0.5b-untied", 896, 14, 2, False, 151936),
])
def test_qwen2_5_configs(name, width, heads, kv, tied, vocab):
    config = shapes.llm_config(name, layers=2)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (width, heads, kv)
    assert (config.tie_word_embeddings, config.vocab_size, config.num_hidden_layers) == (tied, vocab, 2)
    assert (config.bos_token_id, config.eos_token_id, config.rms_norm_eps) == (151643, 151645, 1e-6)
    assert shapes.LLM_SHAPES[name].real is (name != "qwen2.5-0.5b-untied")


def test_tokenizer_has_qwen2_5_ids_and_loads_as_qwen2(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    shapes.llm_config("qwen2.5-0.5b").save_pretrained(tmp_path)  # model_type qwen2, as a checkpoint dir
    shapes.write_tokenizer(tmp_path)
    shapes.generation_config().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) == 151665 <= shapes.llm_config("qwen2.5-0.5b").vocab_size  # 151,643 regular + 22 added
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|file_sep|>": 151664}
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (151645, 151643, None)
    assert 151645 in tok.all_special_ids and 151657 not in tok.all_special_ids  # <tool_call> is not special
    text = "What colour is the red circle? It is red."
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert max(encoded) < 2000 and tok.decode(encoded) == text  # the trained tokens sit at the lowest ids
    assert tok.decode([5000]) == "<unused5000>"  # filler: decodable, produced by no merge

    gen = GenerationConfig.from_pretrained(tmp_path)
    assert gen.do_sample is True and (gen.temperature, gen.top_p, gen.top_k) == (0.7, 0.8, 20)
    assert gen.repetition_penalty == 1.05 and gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643


def test_chat_template_inserts_the_default_system_prompt():
    tok = shapes.qwen2_5_tokenizer()
    user = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *user], tokenize=False)
    assert own.count("<|im_start|>system") == 1 and DEFAULT_SYSTEM not in own


def test_shape_names_of_the_recipe_paths():
    sft = load_config("configs/sft.yaml")
    assert shapes.vision_shape_for(sft.model.vision_path) == "siglip-so400m"
    assert shapes.llm_shape_for(sft.model.llm_path) == "qwen2.5-7b"
    assert shapes.vision_shape_for("openai/clip-vit-large-patch14-336") == "clip-l-336"
    assert shapes.vision_shape_for("google/siglip2-so400m-patch16-naflex") == "siglip2-so400m-naflex"
    assert shapes.vision_shape_for("google/siglip2-so400m-patch14-384") == "siglip-so400m"  # a SiglipModel
    assert shapes.llm_shape_for("/models/Qwen2.5-0.5B-Instruct") == "qwen2.5-0.5b"
    assert shapes.llm_shape_for("qwen2.5-0.5b-untied") == "qwen2.5-0.5b-untied"
    assert shapes.vision_shape_for("runs/demo/tiny/vision") is None and shapes.llm_shape_for("gpt2") is None


def test_context_text_fits_the_token_budget():
    from refvllm.smoke import context_text, lengthen

    tok = shapes.qwen2_5_tokenizer()
    for budget in (0, 1, 57, 400):
        n = len(tok(context_text(tok, budget), add_special_tokens=False)["input_ids"])
        assert budget - 2 <= n <= budget
    record = {"id": "x", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat colour is <region>?"}, {"from": "gpt", "value": "red"}]}
    long = lengthen(record, "the red circle")
    assert long["conversations"][0]["value"] == "<video>\nthe red circle\nWhat colour is <region>?"
    assert record["conversations"][0]["value"] == "<video>\nWhat colour is <region>?"  # a copy


def test_smoke_names_the_flag_for_an_unknown_shape(tmp_path, capsys):
    from refvllm.cli import main as cli

    assert cli(["smoke", "configs/demo.yaml", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL checkpoints" in out and "--vision-shape" in out and "--as-is" in out and "SKIP export" in out
    assert "0/6 stages passed" in out
