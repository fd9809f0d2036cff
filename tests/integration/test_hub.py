"""Hub ids and local copies: a model path that is not a local directory is a hub id, resolved through the hub cache
like transformers resolves it (``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE``, revisions).

The cache is built on disk from the tiny checkpoints in huggingface_hub's layout
(``models--ORG--NAME/snapshots/COMMIT/...`` + ``refs/main``), which is what the hub library reads offline; training,
``refvllm eval`` and ``refvllm export`` then run by hub id with ``HF_HUB_OFFLINE=1`` in subprocesses (the hub
library reads the cache location from the environment when it is imported).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import ROOT, check_ok, make_assets, overrides, run_training

from refvllm.errors import ConfigError
from refvllm.hub import cached_file, is_local, resolve_file, write_snapshot

VISION_ID, LLM_ID = "refvllm-test/tiny-siglip", "refvllm-test/tiny-qwen2"


def write_hub_cache(cache: Path, repos: dict[str, str], branch: str = "main") -> dict[str, str]:
    """Each local checkpoint ``repos[repo_id]`` as the snapshot ``refs/<branch>`` names; returns {repo_id: commit}."""
    return {repo_id: write_snapshot(cache, repo_id, source, branch) for repo_id, source in repos.items()}


def _hub_env(hf_home: Path) -> dict[str, str]:
    """Offline, with the cache found through HF_HOME (the default HF_HUB_CACHE is $HF_HOME/hub)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _refvllm(env: dict[str, str], *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refvllm", *map(str, args)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


# ----------------------------------------------------------------------------- resolve_file, in this process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from refvllm.model.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("hub-tiny"), seed=0)


@pytest.fixture
def offline_cache(tmp_path, tiny, monkeypatch):
    """A hub cache holding both tiny models, made the hub library's cache for this test, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commits = write_hub_cache(cache, {VISION_ID: tiny["vision"], LLM_ID: tiny["llm"]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, commits


def test_local_directories_are_read_directly(tiny, tmp_path):
    assert is_local(tiny["vision"]) and not is_local(VISION_ID) and not is_local("")
    assert resolve_file(tiny["vision"], "config.json", "model.vision_path") == str(Path(tiny["vision"]) / "config.json")
    assert resolve_file(tiny["vision"], "nothing.json", "model.vision_path", required=False) is None
    with pytest.raises(ConfigError, match=r"^model.vision_path: no nothing.json in '.*'$"):
        resolve_file(tiny["vision"], "nothing.json", "model.vision_path")
    with pytest.raises(ConfigError, match="is not a local directory, and not a hub id"):
        resolve_file(str(tmp_path / "not" / "here"), "config.json", "model.vision_path")


def test_hub_ids_resolve_from_the_cache_offline(offline_cache):
    cache, commits = offline_cache
    snapshot = cache / "models--refvllm-test--tiny-siglip" / "snapshots" / commits[VISION_ID]
    assert resolve_file(VISION_ID, "preprocessor_config.json", "k") == str(snapshot / "preprocessor_config.json")
    assert resolve_file(VISION_ID, "config.json", "k", revision=commits[VISION_ID]) == str(snapshot / "config.json")
    assert resolve_file(VISION_ID, "generation_config.json", "k", required=False) is None  # optional, absent
    assert cached_file(VISION_ID, "config.json") == str(snapshot / "config.json")
    assert cached_file("refvllm-test/missing", "config.json") is None
    with pytest.raises(ConfigError, match=rf"^k: '{VISION_ID}' has no nothing.json in the hub cache"):
        resolve_file(VISION_ID, "nothing.json", "k")
    pinned = write_hub_cache(cache, {VISION_ID: tiny_vision_without_weights(cache)}, branch="v1")[VISION_ID]
    assert pinned != commits[VISION_ID]
    assert resolve_file(VISION_ID, "config.json", "k", revision="v1").startswith(str(snapshot.parent / pinned))


def tiny_vision_without_weights(cache: Path) -> Path:
    """The cached tiny vision snapshot's files without its weights (a cache filled with config files only)."""
    source = next((cache / "models--refvllm-test--tiny-siglip" / "snapshots").iterdir())
    target = cache.parent / "vision-config-only"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


def test_cached_config_without_weights_is_one_clear_line(offline_cache):
    from refvllm.model.vision import VisionTower

    cache, _ = offline_cache
    write_hub_cache(cache, {"refvllm-test/config-only": tiny_vision_without_weights(cache)})
    with pytest.raises(ConfigError, match=r"^model.vision_path: cannot load a vision encoder from "
                                          r"'refvllm-test/config-only': [^\n]*model.safetensors[^\n]*$"):
        VisionTower.from_pretrained("refvllm-test/config-only")


def test_missing_ids_and_revisions_name_the_key_and_the_id(offline_cache):
    cache, _ = offline_cache
    expected = (r"^model.vision_path: 'google/siglip-so400m-patch14-384' is neither a local directory nor in the "
                rf"hub cache \(HF_HUB_OFFLINE=1; looked in {cache}\)$")
    for required in (True, False):  # an optional file of a model that is not there is still an error
        with pytest.raises(ConfigError, match=expected):
            resolve_file("google/siglip-so400m-patch14-384", "preprocessor_config.json", "model.vision_path",
                         required=required)
    with pytest.raises(ConfigError, match=rf"^model.llm_path: '{LLM_ID}' at revision 'v2' is neither a local"):
        resolve_file(LLM_ID, "config.json", "model.llm_path", revision="v2")


def test_build_and_processor_by_hub_id(offline_cache):
    """In-process: the visual spec, the processor and the model load by hub id from the cache."""
    from refvllm.config import load_config
    from refvllm.data.processor import Processor
    from refvllm.layout import load_visual_spec
    from refvllm.model.build import build_model

    cfg = load_config(None, [f"model.vision_path={VISION_ID}", f"model.llm_path={LLM_ID}", "model.lora.r=2"])
    assert load_visual_spec(cfg.model).image_size == 64
    assert Processor.from_config(cfg).tokenizer.chat_template
    assert build_model(cfg.model, print_table=False).layout.grid == 8
    cfg.model.llm_path = "refvllm-test/missing-llm"
    with pytest.raises(ConfigError, match="^model.llm_path: 'refvllm-test/missing-llm' is neither"):
        Processor.from_config(cfg)
    with pytest.raises(ConfigError, match="^model.llm_path: 'refvllm-test/missing-llm' is neither"):
        build_model(cfg.model, print_table=False)


# ------------------------------------------------------------------- train, eval, export by hub id, offline


@pytest.fixture(scope="module")
def hub_assets(tmp_path_factory):
    """Synthetic data and a hub cache under HF_HOME holding the tiny models; config overrides by hub id."""
    root = tmp_path_factory.mktemp("hub-run")
    assets = make_assets(root / "assets", num_train=8)
    hf_home = root / "hf-home"
    write_hub_cache(hf_home / "hub", {VISION_ID: assets["model.vision_path"], LLM_ID: assets["model.llm_path"]})
    shutil.rmtree(root / "assets" / "tiny")  # nothing but the cache holds the models now
    return {"root": root, "env": _hub_env(hf_home), "cache": hf_home / "hub",
            "assets": {**assets, "model.vision_path": VISION_ID, "model.llm_path": LLM_ID}}


PLAIN_PEFT = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from refvllm.checkpoint import load_for_inference
export = sys.argv[1]
base_id = json.load(open(export + "/adapter/adapter_config.json"))["base_model_name_or_path"]
ids = torch.tensor([[5, 17, 99, 300, 12]])
plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), export + "/adapter").eval()
merged = AutoModelForCausalLM.from_pretrained(export + "/merged_llm").eval()
_, ours, _ = load_for_inference(export)
with torch.no_grad():
    logits = [m(input_ids=ids).logits for m in (plain, merged, ours.llm)]
torch.testing.assert_close(logits[0], logits[2])
torch.testing.assert_close(logits[1], logits[2], rtol=1e-4, atol=1e-4)
print("ok", base_id)
"""


@pytest.mark.slow  # four subprocesses that load torch: train 2 steps, eval, export --merge, plain peft (~40 s)
def test_train_eval_export_by_hub_id_offline(hub_assets):
    from refvllm.config import load_config

    root, env, assets = hub_assets["root"], hub_assets["env"], hub_assets["assets"]
    out = root / "train"
    check_ok(run_training(overrides(assets, out, train__max_steps=2, train__save_steps=2, train__grad_accum=1,
                                    train__warmup_steps=0), env=env))
    checkpoint = out / "checkpoint-2"
    saved = load_config(checkpoint / "config.yaml")
    assert (saved.model.vision_path, saved.model.llm_path) == (VISION_ID, LLM_ID)  # the ids, not cache paths

    metrics = root / "eval" / "metrics.json"
    proc = _refvllm(env, "eval", "--no-progress", "--model", out, "--data", assets["eval_file"], "--data-root",
                    assets["data.data_root"], "--out", metrics, "eval.max_new_tokens=2", "eval.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(metrics.read_text())["overall"]["n"] > 0

    export = root / "export"
    proc = _refvllm(env, "export", "--checkpoint", checkpoint, "--out", export, "--merge")
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapter_cfg = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == LLM_ID  # so plain peft finds the base in the hub cache
    assert load_config(export / "config.yaml").model.vision_path == VISION_ID

    proc = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(export)], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0 and f"ok {LLM_ID}" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.slow  # a training subprocess up to the model build (~7 s)
@pytest.mark.parametrize("key", ["model.vision_path", "model.llm_path"])
def test_a_missing_id_is_one_error_line(hub_assets, key):
    missing = "refvllm-test/not-in-the-cache"
    args = overrides(hub_assets["assets"], hub_assets["root"] / f"missing-{key}", **{key.replace(".", "__"): missing})
    proc = run_training(args, env=hub_assets["env"])
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "Traceback" not in proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {key}: '{missing}' is neither a local directory nor in the hub cache "
                      f"(HF_HUB_OFFLINE=1; looked in {hub_assets['cache']})"], proc.stdout[-4000:]


def test_config_revisions_pin_the_models(offline_cache):
    """model.vision_revision / model.llm_revision reach every load: a commit in the cache loads, an unknown one
    is one line naming the key."""
    from refvllm.config import load_config
    from refvllm.data.processor import Processor
    from refvllm.model.build import build_model

    _, commits = offline_cache
    cfg = load_config(None, [f"model.vision_path={VISION_ID}", f"model.llm_path={LLM_ID}", "model.lora.r=2",
                             f"model.vision_revision={commits[VISION_ID]}", f"model.llm_revision={commits[LLM_ID]}"])
    assert build_model(cfg.model, print_table=False).layout.grid == 8 and Processor.from_config(cfg).tokenizer
    for which in ("vision", "llm"):
        bad = load_config(None, [f"model.vision_path={VISION_ID}", f"model.llm_path={LLM_ID}",
                                 f"model.{which}_revision=0123456789abcdef0123456789abcdef01234567"])
        with pytest.raises(ConfigError, match=f"^model.{which}_path: "):
            build_model(bad.model, print_table=False)
