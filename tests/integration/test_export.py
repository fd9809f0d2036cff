"""Export of a trained checkpoint: plain transformers + peft reproduce the framework's LLM, the merged LLM
reproduces base + adapter without peft, and the export loads back into the framework like the checkpoint."""

import json

import pytest
import torch
from train_helpers import check_ok, make_assets, overrides, run_training

from refvllm.checkpoint import load_for_inference
from refvllm.data.collate import collate
from refvllm.errors import ConfigError
from refvllm.export import export, main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint after 3 steps at a high learning rate (so the adapter clearly moves the logits)."""
    root = tmp_path_factory.mktemp("export")
    assets = make_assets(root / "assets", num_train=16)
    out = root / "run"
    check_ok(run_training(overrides(assets, out, train__max_steps=3, train__save_steps=3, train__lr=0.02,
                                    train__warmup_steps=0, model__lora__dropout=0.0)))
    (out / "assets.json").write_text(json.dumps(assets))
    return root, out / "checkpoint-3"


@pytest.fixture(scope="module")
def exported(trained):
    root, checkpoint = trained
    out = root / "exported"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--merge"]) == 0
    return checkpoint, out


def _text_batch(processor, text: str) -> dict:
    """A text-only batch in the collate layout (no frames, no regions)."""
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    size = processor.spec.image_size
    item = {"input_ids": torch.tensor(ids), "pixel_values": torch.zeros(0, 3, size, size),
            "region_masks": torch.zeros(0, size, size, dtype=torch.bool), "region_frame_index": torch.zeros(0).long(),
            "region_object_index": torch.zeros(0).long(), "num_objects": 0, "sample_index": 0, "sample_id": "t"}
    return collate([item], processor.pad_token_id)


def test_cli_prints_paths_and_writes_layout(exported, capsys):
    checkpoint, out = exported
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["adapter_dir"] == str(out / "adapter") and manifest["merged_llm_dir"] == str(out / "merged_llm")
    for name in ("config.yaml", "extra_trainables.safetensors", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "tokenizer/tokenizer_config.json", "merged_llm/config.json",
                 "merged_llm/tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".exported.tmp-*"))  # the temporary directory was renamed
    with pytest.raises(ConfigError, match="exists"):
        export(checkpoint, out)
    again = export(checkpoint, out, overwrite=True)  # without --merge: no merged LLM this time
    assert again["merged_llm_dir"] is None and not (out / "merged_llm").exists()
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--merge", "--overwrite"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["merged_llm_dir"] == str(out / "merged_llm")
    with pytest.raises(ConfigError, match="neither a complete training checkpoint"):
        export(out / "adapter", out.parent / "x")


def test_plain_peft_and_merged_match_the_framework(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = exported
    cfg, model, processor = load_for_inference(out)
    batch = _text_batch(processor, "What colour is the square? It is red.")
    with torch.no_grad():
        ours = model(batch).logits
        base_path = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base_path == cfg.model.llm_path
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        base_logits = base(input_ids=batch["input_ids"]).logits
        peft_logits = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(input_ids=batch["input_ids"]).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged_llm"), dtype=torch.float32).eval()
        merged_logits = merged(input_ids=batch["input_ids"]).logits
    assert not isinstance(merged, PeftModel) and not (out / "merged_llm" / "adapter_config.json").exists()
    assert (base_logits - peft_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(peft_logits, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(out / "merged_llm"))
    assert tok("red square")["input_ids"] == processor.tokenizer("red square")["input_ids"]


def test_export_loads_like_the_checkpoint(exported):
    from refvllm.data.dataset import RefDataset

    checkpoint, out = exported
    _, from_ckpt, processor = load_for_inference(checkpoint)
    cfg, from_export, _ = load_for_inference(out)
    dataset = RefDataset.from_config(cfg, processor)
    batch = collate([dataset[0], dataset[1]], processor.pad_token_id)
    assert batch["region_masks"].shape[0] > 0 or batch["pixel_values"].shape[0] > 0
    with torch.no_grad():
        torch.testing.assert_close(from_export(batch).logits, from_ckpt(batch).logits, rtol=0, atol=0)


def test_full_llm_checkpoint_exports_a_merged_llm(trained, tmp_path):
    """With train_llm=full (the demo's setting) there is no adapter: the trained LLM weights live in
    extra_trainables.safetensors and --merge writes them as a plain causal LM."""
    from transformers import AutoModelForCausalLM

    root, lora_checkpoint = trained
    assets = json.loads((lora_checkpoint.parent / "assets.json").read_text())
    out = tmp_path / "run"
    check_ok(run_training(overrides(assets, out, model__train_llm="full", train__max_steps=2, train__save_steps=2,
                                    train__lr=0.02, train__warmup_steps=0)))
    manifest = export(out / "checkpoint-2", tmp_path / "exported", merge=True)
    assert manifest["adapter_dir"] is None and manifest["merged_llm_dir"]
    _, model, processor = load_for_inference(tmp_path / "exported")
    batch = _text_batch(processor, "What shape is the red object?")
    merged = AutoModelForCausalLM.from_pretrained(manifest["merged_llm_dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, model(batch).logits,
                                   rtol=1e-4, atol=1e-4)
