"""Tiny offline checkpoints: deterministic, loadable through plain from_pretrained, usable chat template."""

import json
from pathlib import Path

import pytest
import torch

from refvllm.model.tiny import main, write_tiny_checkpoints, write_tiny_llm, write_tiny_vision


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_tiny_checkpoints(tmp_path / "a", seed=0)
    write_tiny_checkpoints(tmp_path / "b", seed=0)
    write_tiny_checkpoints(tmp_path / "c", seed=1)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert fa["vision/model.safetensors"] != fc["vision/model.safetensors"]
    assert fa["llm/model.safetensors"] != fc["llm/model.safetensors"]
    assert fa["llm/tokenizer.json"] == fc["llm/tokenizer.json"]  # the tokenizer does not depend on the seed
    assert a == {"vision": str(tmp_path / "a" / "vision"), "llm": str(tmp_path / "a" / "llm")}


def test_rng_of_caller_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_vision(tmp_path / "v")
    assert torch.equal(torch.rand(3), expected)


def test_llm_and_tokenizer_load_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_tiny_llm(tmp_path / "llm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 1000 <= len(tok) <= 2000 and model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "What colour is the red circle?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat colour is the red circle?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # Special tokens are single ids; frequent words of the synthetic data are whole tokens.
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert len(tok(" red circle moves left")["input_ids"]) == 4
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_llm_kinds_tokenize_identically(tmp_path, kind):
    """Qwen2Tokenizer rebuilds its pre-tokeniser on load; ours is the same, so every load path agrees."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    path = write_tiny_llm(tmp_path / kind, kind=kind)
    assert AutoConfig.from_pretrained(path).model_type == kind
    text = "<|im_start|>user\nIs <object1><region> above it?  123 café\t!<|im_end|>\n"
    assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == Tokenizer.from_file(
        f"{path}/tokenizer.json").encode(text).ids


@pytest.mark.parametrize(("kind", "model_type", "mean"), [("siglip", "siglip_vision_model", 0.5),
                                                          ("clip", "clip_vision_model", 0.48145466),
                                                          ("siglip2", "siglip2_vision_model", 0.5)])
def test_vision_kinds(tmp_path, kind, model_type, mean):
    from transformers import AutoConfig, AutoModel

    path = write_tiny_vision(tmp_path / kind, kind=kind)
    assert AutoConfig.from_pretrained(path).model_type == model_type
    assert AutoModel.from_pretrained(path).config.patch_size == 8
    pre = json.loads((Path(path) / "preprocessor_config.json").read_text())
    assert pre["image_mean"][0] == mean and pre["size"] == {"height": 64, "width": 64}


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--vision", "clip", "--llm", "llama", "--seed", "3"]) == 0
    paths = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((Path(paths["vision"]) / "config.json").read_text())["model_type"] == "clip_vision_model"
    assert json.loads((Path(paths["llm"]) / "config.json").read_text())["model_type"] == "llama"


def test_existing_path_is_not_overwritten(tmp_path):
    from refvllm.errors import ConfigError

    path = write_tiny_vision(tmp_path / "v", seed=0)
    before = _files(tmp_path / "v")
    with pytest.raises(ConfigError, match="already exists"):
        write_tiny_vision(path, seed=1)
    assert _files(tmp_path / "v") == before
    write_tiny_checkpoints(tmp_path / "all", seed=0)  # the CLI's function replaces its own two directories
    write_tiny_checkpoints(tmp_path / "all", seed=1)
    assert _files(tmp_path / "all" / "vision") != before
