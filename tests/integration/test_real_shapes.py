"""Real shapes end to end, at one layer per tower, random weights (refvllm/model/shapes.py):

- SigLIP-so400m/14 @ 384 (dual-tower SiglipModel checkpoint, 27 x 27 grid, 6-pixel border) + Qwen2.5-0.5B
  (151,936-row tied embedding, 14 query / 2 key-value heads, Qwen's tokenizer ids and sampling generation
  config): scripts/train.py trains 2 steps on 16-frame samples, one of ~3.5k tokens, resumes for a third,
  then ``refvllm eval`` and ``refvllm export --merge`` run on the checkpoint;
- CLIP-L/14 @ 336 (CLS token) + an untied Qwen2.5-0.5B-wide LLM: forward and backward in-process;
- ``refvllm smoke`` on the demo config as it is (the command's plumbing; the real shapes cost time above).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, check_ok, losses, overrides, run_training

from refvllm.cli import main as cli
from refvllm.config import load_config
from refvllm.model import shapes

pytestmark = pytest.mark.slow

LONG_TOKENS = 3500


def _config_overrides(assets: dict, **extra) -> list[str]:
    """The training overrides of these tests: one sample per step, frozen real-shaped tower, 16 frames."""
    values = dict(data__num_frames=16, data__max_length=4096, train__micro_batch_size=1, train__grad_accum=1,
                  train__warmup_steps=0, model__train_vision="frozen", model__lora__r=8, model__lora__alpha=16)
    return overrides(assets, assets["output_dir"], **{**values, **extra})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Checkpoints of so400m (dual tower) + Qwen2.5-0.5B; synthetic 16-frame data whose training file holds a
    ~3.5k-token video sample and an image sample; the eval split (a video and an image sample)."""
    from refvllm.data.synthetic import generate
    from refvllm.smoke import make_long_sample

    root = tmp_path_factory.mktemp("real-shapes")
    files = generate(root / "data", num_train=3, num_eval=2, seed=0, num_frames=16)
    records = json.loads(files.train_file.read_text())
    train_file = root / "data" / "train-long.json"
    train_file.write_text(json.dumps([records[0], records[2]]))  # sample 0: a video, sample 2: an image
    values = {
        "data.train_file": str(train_file), "eval_file": str(files.eval_file), "data.data_root": str(root / "data"),
        "data.index_cache_dir": str(root / "index-cache"), "data.synth.enabled": "false", "model.tiny": "false",
        "model.vision_path": shapes.write_vision(root / "so400m", "siglip-so400m", layers=1),
        "model.llm_path": shapes.write_llm(root / "qwen2.5-0.5b", "qwen2.5-0.5b", layers=1),
        "output_dir": root / "run",
    }
    cfg = load_config(ROOT / "configs" / "demo.yaml", _config_overrides(values))
    values["lengths"] = make_long_sample(cfg, train_file, root / "data", 0, LONG_TOKENS)
    return values


def test_train_resume_eval_export_on_so400m_and_qwen2_5(assets, tmp_path, capsys):
    assert LONG_TOKENS - 40 <= assets["lengths"][0] <= LONG_TOKENS  # 16 x 196 visual tokens + ~360 of text
    out = assets["output_dir"]
    check_ok(run_training(_config_overrides(assets, train__max_steps=2, train__save_steps=2)))
    proc = run_training(_config_overrides(assets, train__max_steps=3, train__save_steps=3))
    check_ok(proc)
    assert "resuming from" in proc.stdout and "checkpoint-2" in proc.stdout
    logged = losses(out)
    assert [s for s, _ in logged] == [1, 2, 3] and all(0 < loss < 20 for _, loss in logged)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["num_skipped"] == 0  # the long sample was trained on, not rejected

    metrics = tmp_path / "eval" / "metrics.json"
    code = cli(["eval", "--no-progress", "--model", str(out), "--data", assets["eval_file"], "--data-root",
                assets["data.data_root"], "--out", str(metrics), "eval.max_new_tokens=3", "eval.batch_size=2"])
    assert code == 0, capsys.readouterr().err[-3000:]
    result = json.loads(metrics.read_text())
    assert result["overall"]["n"] == 2 and result["overall"]["num_bad"] == 0
    assert result["run"]["num_frames"] == 16
    assert result["run"]["generation"]["do_sample"] is False  # greedy, whatever Qwen's generation config says

    exported = tmp_path / "export"
    assert cli(["export", "--checkpoint", str(out / "checkpoint-3"), "--out", str(exported), "--merge"]) == 0
    manifest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    merged = json.loads((Path(manifest["merged_llm_dir"]) / "config.json").read_text())
    assert (merged["vocab_size"], merged["tie_word_embeddings"], merged["num_key_value_heads"]) == (151936, True, 2)
    tok = json.loads((Path(manifest["merged_llm_dir"]) / "tokenizer.json").read_text())
    assert {t["content"]: t["id"] for t in tok["added_tokens"]}["<|im_end|>"] == 151645


def test_clip_l_336_and_untied_llm_forward_backward(assets, tmp_path):
    from refvllm.data.collate import collate
    from refvllm.data.dataset import RefDataset
    from refvllm.data.processor import Processor
    from refvllm.model.build import build_model

    vision = shapes.write_vision(tmp_path / "clip", "clip-l-336", layers=1)
    llm = shapes.write_llm(tmp_path / "untied", "qwen2.5-0.5b-untied", layers=1)
    # No region dropout (the demo config's 0.1 would zero this sample's region tokens one time in ten, and with
    # them the region encoder's gradient), and a fixed seed: the test sees the same model and draws every run.
    cfg = load_config(ROOT / "configs" / "demo.yaml", _config_overrides(
        {**assets, "model.vision_path": vision, "model.llm_path": llm}, data__num_frames=4,
        model__region__dropout=0.0))
    torch.manual_seed(0)
    model = build_model(cfg.model, print_table=False, float32_masters=True).train()
    processor = Processor.from_config(cfg)
    item = RefDataset.from_config(cfg, processor, data_file=assets["eval_file"])[0]  # a 4-frame video sample
    assert item["pixel_values"].shape[1:] == (3, 336, 336)

    embed, head = model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight
    assert embed.shape == head.shape == (151936, 896) and embed.data_ptr() != head.data_ptr()  # untied
    frames = item["pixel_values"][:1].to(model.vision.dtype)
    assert model.vision.model(pixel_values=frames).last_hidden_state.shape[1] == 577  # CLS + 24 x 24
    assert model.vision(frames).shape == (1, 576, 1024)  # the tower drops the CLS token

    loss = model(collate([item], processor.pad_token_id)).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for part in ("lora_", "projector.", "region."):
        assert any(part in n and g is not None and g.abs().sum() > 0 for n, g in grads.items()), part


def test_smoke_command_on_the_demo_config_as_is(tmp_path, capsys):
    code = cli(["smoke", str(ROOT / "configs" / "demo.yaml"), "--as-is", "--out", str(tmp_path / "smoke"),
                f"model.vision_path={tmp_path / 'tiny' / 'vision'}", f"model.llm_path={tmp_path / 'tiny' / 'llm'}",
                "data.num_frames=4", "data.max_length=512"])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in ("checkpoints", "data", "train", "resume", "eval", "export"):
        assert f"PASS {stage}" in out
    longest = int(re.search(r"3 train samples \((\d+),", out).group(1))
    assert 512 - 32 - 20 <= longest <= 512 - 32  # the long sample: data.max_length - 32, as near as words allow
    assert "peak RSS" in out and "6/6 stages passed" in out
    assert (tmp_path / "smoke" / "train" / "checkpoint-3").is_dir() and (tmp_path / "smoke" / "logs" / "train.log")


def test_smoke_hub_runs_the_recipe_by_hub_id_offline(tmp_path, capsys):
    """``refvllm smoke configs/sft.yaml --hub``: the checkpoints under the recipe's own hub ids in an offline
    cache, each stage the user's command. Cheaper than the recipe where it costs time only: the 0.5B LLM shape
    under the 7B id, 2 frames, no accumulation, one sample a step (the recipe's 3 packed samples took a 14.9 s
    bf16 step on 2 CPU cores where one took 1.5 s; the done-when run of the recipe as it is: docs/training.md)."""
    out = tmp_path / "smoke"
    code = cli(["smoke", str(ROOT / "configs" / "sft.yaml"), "--hub", "--out", str(out), "--llm-shape",
                "qwen2.5-0.5b", "--steps", "1", "data.num_frames=2", "data.max_length=1024", "train.grad_accum=1",
                "train.micro_batch_size=1", "data.num_workers=0", "eval.max_new_tokens=2"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "7/7 stages passed" in text
    assert "as google/siglip-so400m-patch14-384@main, Qwen/Qwen2.5-7B-Instruct@main" in text
    assert "'do_sample': False, 'repetition_penalty': 1.0" in text  # greedy despite Qwen's sampling config
    assert "base Qwen/Qwen2.5-7B-Instruct" in text  # the adapter names the hub id, and it loaded from the cache
    log = (out / "logs" / "resume.log").read_text()
    assert "resuming from" in log and "checkpoint-1" in log
    # The vision tower: so400m with 2 layers written, the recipe's feature layer -2 runs one of them.
    assert json.loads((out / "checkpoints" / "siglip-so400m-2layers" / "config.json").read_text())[
        "vision_config"]["num_hidden_layers"] == 2
    assert not (out / "train" / "config.yaml").read_text().count(str(out / "checkpoints"))  # ids, not paths


def test_smoke_hub_runs_the_vlm_recipe_by_hub_id_offline(tmp_path, capsys):
    """``refvllm smoke configs/sft_qwen2_5_vl.yaml --hub``: a Qwen2.5-VL under the recipe's hub id in an
    offline cache, family found by its model_type there, each stage the user's command, the merged VLM loaded
    by plain Qwen2_5_VLForConditionalGeneration. Cheap here: the tiny VLM shape under the 7B id (with Qwen's
    sampling generation config), 2 frames, no accumulation; the real-shaped run is in docs/training.md."""
    out = tmp_path / "smoke"
    code = cli(["smoke", str(ROOT / "configs" / "sft_qwen2_5_vl.yaml"), "--hub", "--out", str(out), "--vlm-shape",
                "tiny", "--steps", "1", "data.num_frames=2", "data.max_length=1024", "train.grad_accum=1",
                "data.num_workers=0", "data.default_fps=4", "eval.max_new_tokens=2"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "7/7 stages passed" in text
    assert "as Qwen/Qwen2.5-VL-7B-Instruct@main" in text
    assert "'do_sample': False, 'repetition_penalty': 1.0" in text
    assert "base Qwen/Qwen2.5-VL-7B-Instruct" in text
    assert "resuming from" in (out / "logs" / "resume.log").read_text()
    assert (out / "export" / "merged_vlm" / "preprocessor_config.json").is_file()
