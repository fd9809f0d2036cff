"""The Qwen2.5-VL family end to end on the tiny VLM: train, exact resume, eval and export from the user's
commands, and the export loaded by plain transformers / peft giving refvllm's logits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import check_ok, losses, run_training, weight_tensors

from refvllm.checkpoint import load_for_inference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from refvllm.data.synthetic import generate
    from refvllm.model.tiny import write_tiny_vlm

    root = tmp_path_factory.mktemp("vlm-family")
    files = generate(root / "data", num_train=12, num_eval=4, seed=0)
    vlm = write_tiny_vlm(root / "tiny" / "vlm")
    return {"root": root, "eval_file": str(files.eval_file), "train_file": str(files.train_file), "args": [
        f"data.train_file={files.train_file}", f"data.data_root={root / 'data'}", "data.synth.enabled=false",
        f"data.index_cache_dir={root / 'index-cache'}", "data.num_frames=4", "data.num_workers=0",
        # The family's defaults (the demo config trains its random tiny encoder and merger): vision encoder and
        # merger frozen, so that base + adapter is the whole trained VLM (plain peft must reproduce it).
        f"model.vlm_path={vlm}", "model.tiny=false", "model.train_vision=frozen", "model.train_projector=auto",
        "model.lora.dropout=0.0", "model.region.dropout=0.0", "train.micro_batch_size=2",
        "train.grad_accum=2", "train.max_steps=3", "train.save_steps=2", "train.save_total_limit=0",
        "train.warmup_steps=0", "train.lr=0.02", "train.tensorboard=false", "train.resume=auto"]}


@pytest.fixture(scope="module")
def trained(assets):
    """A 3-step run (checkpoints 2 and 3), and a second run resumed from a copy of its checkpoint 2."""
    out = assets["root"] / "run"
    check_ok(run_training([*assets["args"], f"train.output_dir={out}"], config="demo_vlm.yaml"))
    resumed = assets["root"] / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    proc = run_training([*assets["args"], f"train.output_dir={resumed}"], config="demo_vlm.yaml")
    check_ok(proc)
    assert "resuming from" in proc.stdout
    return out, resumed


def test_resume_is_exact_and_the_checkpoint_holds_adapter_and_region_encoder(trained):
    out, resumed = trained
    a, b = weight_tensors(out / "checkpoint-3"), weight_tensors(resumed / "checkpoint-3")
    assert a.keys() == b.keys()
    assert any(k.startswith("region.") for k in a) and any("lora_" in k for k in a)
    assert all(k.startswith(("region.", "adapter.")) for k in a)  # vision encoder and merger frozen
    assert not any(k.startswith("vlm.") and "lora_" in k for k in a)  # LoRA weights live in the adapter only
    for name in a:
        assert torch.equal(a[name], b[name]), name
    adapter = json.loads((out / "checkpoint-3" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"].startswith(".*\\.language_model\\.")  # the language model only


def test_fsdp_trains_the_vlm_like_one_process(assets, trained):
    """FSDP2 on 2 processes (accelerate launch, configs/accelerate/fsdp.yaml) at the global batch of the
    1-process run: the VLM's decoder layers and vision blocks are their own units, the region encoder trains in
    the root unit; the checkpoint holds the same files and weights. Steps 1-2 agree to float round-off; step 3
    to 1e-3 only: at train.lr=0.02 Adam turns round-off-sized gradients into full-size updates (a DDP run on 2
    processes lands on FSDP's step-3 loss, 12.72678, where one process gives 12.73131)."""
    out, _ = trained
    fsdp = assets["root"] / "fsdp"
    proc = run_training([*assets["args"], f"train.output_dir={fsdp}", "train.grad_accum=1"], nproc=2,
                        config="demo_vlm.yaml", accelerate_config="fsdp.yaml")
    check_ok(proc)
    assert "FSDP2 over 2 processes: own units Qwen2_5_VLDecoderLayer x2, Qwen2_5_VLVisionBlock x2" in proc.stdout
    reference, sharded = losses(out), losses(fsdp)
    assert [s for s, _ in sharded] == [1, 2, 3]
    for (_, a), (_, b), rel in zip(reference, sharded, (1e-5, 1e-5, 1e-3), strict=True):
        assert b == pytest.approx(a, rel=rel)
    a, b = weight_tensors(out / "checkpoint-2"), weight_tensors(fsdp / "checkpoint-2")
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)


def test_eval_runs_on_the_checkpoint(assets, trained):
    from refvllm.cli import main as cli

    out, _ = trained
    metrics = assets["root"] / "eval" / "metrics.json"
    assert cli(["eval", "--model", str(out), "--data", assets["eval_file"], "--data-root",
                str(assets["root"] / "data"), "--out", str(metrics), "--no-progress"]) == 0
    result = json.loads(metrics.read_text())
    assert result["overall"]["n"] == 4 and result["overall"]["num_bad"] == 0


def _sample_without_regions(assets, processor) -> dict:
    """The first eval video as a training item with its regions removed (a plain video question)."""
    from refvllm.data.decode import decode_sample
    from refvllm.data.schema import parse_sample

    raw = next(r for r in json.loads(Path(assets["eval_file"]).read_text()) if "video" in r)
    raw = {"id": "plain", "video": raw["video"], "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Things move."}]}
    decoded = decode_sample(parse_sample(raw, 0), assets["root"] / "data", processor.num_frames,
                            processor.frame_size)
    return processor.collate([processor.encode(decoded)])


def _plain_logits(vlm, batch: dict) -> torch.Tensor:
    from refvllm.model.qwen2_5_vl import token_types

    with torch.no_grad():
        return vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values_videos=batch["pixel_values"], video_grid_thw=batch["visual_grid_thw"],
                   second_per_grid_ts=batch["second_per_grid_ts"],
                   mm_token_type_ids=token_types(batch["input_ids"], vlm.config)).logits


def test_merged_export_loads_in_plain_transformers_and_the_adapter_in_plain_peft(assets, trained):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from refvllm.export import export

    out, _ = trained
    manifest = export(out / "checkpoint-3", assets["root"] / "export", merge=True)
    merged_dir = manifest["merged_vlm_dir"]
    cfg, model, processor = load_for_inference(assets["root"] / "export")
    batch = _sample_without_regions(assets, processor)
    with torch.no_grad():
        ours = model(batch).logits
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(_plain_logits(merged, batch), ours, rtol=1e-4, atol=1e-4)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.model.vlm_path).eval()
    assert not torch.allclose(_plain_logits(base, batch), ours, atol=1e-3)  # training moved the logits
    with_adapter = PeftModel.from_pretrained(base, manifest["adapter_dir"]).eval()  # (injects into base)
    torch.testing.assert_close(_plain_logits(with_adapter, batch), ours, rtol=1e-4, atol=1e-4)
    # The merged directory carries the processing: tokenizer with its chat template, pixel settings.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == processor.tokenizer.chat_template
    assert AutoImageProcessor.from_pretrained(merged_dir).size["shortest_edge"] == processor.pre.min_pixels == 112 * 112


def test_infer_answers_about_a_masked_object_and_ablation_reaches_the_model(assets, trained, capsys):
    """``refvllm infer`` on the VLM checkpoint: a video file and a PNG mask give an answer; the engine's
    ablated input differs from the normal one (the region tokens reach the model)."""
    import numpy as np
    from PIL import Image

    from refvllm.cli import main as cli
    from refvllm.infer import RefInference

    out, _ = trained
    records = json.loads(Path(assets["train_file"]).read_text())
    record = next(r for r in records if str(r.get("video", "")).endswith(".mp4"))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:32, 8:32] = 255
    png = assets["root"] / "mask.png"
    Image.fromarray(mask).save(png)
    video = assets["root"] / "data" / record["video"]
    capsys.readouterr()
    assert cli(["infer", "--model", str(out), "--video", str(video), "--mask-png", str(png), "--question",
                "What colour is <region>?"]) == 0
    assert capsys.readouterr().out.strip()  # an answer line
    engine = RefInference.from_pretrained(out, device="cpu")
    item = engine.prepare(*_query_sample(video, mask > 0))
    batch = engine.processor.collate([item], "left")
    with torch.no_grad():
        normal, _ = engine.model.embed(batch)
        ablated, _ = engine.model.embed(batch, ablate_regions=True)
    assert not torch.equal(normal, ablated)


def _query_sample(video, mask):
    from refvllm.infer import Query, query_sample

    return query_sample(Query(video, [mask], "What colour is <region>?", 0), 0)
