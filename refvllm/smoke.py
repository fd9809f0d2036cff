"""``refvllm smoke``: check that a config's code paths run, on random real-shaped checkpoints at reduced depth.

    refvllm smoke CONFIG [--out DIR] [--layers N] [--steps N] [--sample-tokens N] [--as-is | --hub]
                         [--vision-shape NAME] [--llm-shape NAME] [--vlm-shape NAME] [--merge] [key=value ...]

Stages, each printed as one PASS/FAIL line with its time (a failure stops the check; the stage's output is in
``OUT/logs/STAGE.log``):

    checkpoints  random checkpoints of the shapes the config's model paths name (:mod:`refvllm.model.shapes`;
                 e.g. google/siglip-so400m-patch14-384 + Qwen/Qwen2.5-7B-Instruct for configs/sft.yaml, or
                 the Qwen2.5-VL that ``model.vlm_path`` names: :mod:`refvllm.model.qwen2_5_vl`), at
                 ``--layers`` layers (a vision tower gets the extra layers ``model.vision_feature_layer``
                 cuts off, so ``--layers`` of them run); with ``--as-is`` the config's own checkpoints are used
    data         synthetic data (``refvllm synth``: 3 train, 2 eval samples with ``data.num_frames`` frames);
                 the first training sample gets a long context, to ``--sample-tokens`` tokens (default: the
                 longest sample ``data.max_length`` accepts, less a margin)
    train        ``--steps`` optimizer steps (the trainer of ``refvllm train``), saving a checkpoint at the end
    resume       one more step, resumed from that checkpoint
    eval         ``refvllm eval`` of the last checkpoint on the 2 eval samples (4 new tokens each)
    export       ``refvllm export`` of it (``--merge``: also the merged LLM)

then the process's peak RSS (and peak CUDA memory on a GPU).

``--hub`` checks the config as a user with a pre-downloaded hub cache runs it: the checkpoints are placed in a
hub cache (``OUT/hub``) under the config's own ids (``model.vision_path``/``llm_path``, at ``model.*_revision``
or ``main``), and each stage is the command a user types, in a subprocess with ``HF_HUB_CACHE=OUT/hub`` and
``HF_HUB_OFFLINE=1``: ``refvllm train --config CONFIG`` with only ``data.train_file``, ``data.data_root``,
``train.max_steps`` and ``train.output_dir`` set (batch shape, accumulation, saving, resume as the config says;
the resume stage is the same command with one more step), ``refvllm eval`` with the config's eval settings,
``refvllm export --merge``, then a last stage ``load``: the merged LLM loads in plain transformers (and the
adapter on the base model by its hub id, through peft), offline from that cache, and both give the same logits.

Without ``--hub`` it runs in one process (no ``accelerate launch``:
DDP/DeepSpeed are not exercised), one sample per step (``train.micro_batch_size=1``, ``train.grad_accum=1``),
everything else as the config says (dtype, LoRA, gradient checkpointing, attention, frame count, pooling).
It is a check that the code paths run and a rough memory figure, not a benchmark or a quality check: the weights
are random, the depth reduced. ``key=value`` arguments override the config; the keys the check sets itself
(data files, model paths, output dir, steps, batch shape, resume) are set after them. Exit code 0 when every
stage passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from refvllm.config import Config, load_config
from refvllm.errors import ConfigError

STAGES = ("checkpoints", "data", "train", "resume", "eval", "export")
HUB_STAGES = (*STAGES, "load")
MERGED_LOGITS_RTOL = 0.05  # merged bf16 weights vs base + adapter: one rounding of W + BA apart
LENGTH_MARGIN = 32  # tokens below data.max_length for the default long sample: room for tokenisation slack
# Words of the synthetic data: the tiny BPE of the shaped tokenizer holds each as one token, and a real one mostly.
_CONTEXT = ("the red circle moves left while the blue square stays still near the bottom of the frame and the green "
            "triangle goes up behind the yellow star")
_CONTEXT_WORDS = tuple(_CONTEXT.split())


# ------------------------------------------------------------------------------------------ long sample


def context_text(tokenizer, num_tokens: int) -> str:
    """Text of synthetic-data words that ``tokenizer`` turns into at most ``num_tokens`` tokens, and as many as
    whole words allow (the count is of the text alone, as the processor tokenises a turn's text)."""
    def count(k: int) -> int:
        return len(tokenizer(_words(k), add_special_tokens=False)["input_ids"])

    lo, hi = 0, max(num_tokens, 0) + 1  # every word is at least one token: the largest fit is below hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= num_tokens else (lo, mid)
    return _words(lo)


def _words(k: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(_CONTEXT_WORDS), k))


def lengthen(record: dict, context: str) -> dict:
    """A copy of the seed-format ``record`` whose first human turn starts with ``context`` (after the visual
    placeholder line, when the turn starts with one), so the sample is longer by about the context's tokens."""
    record = json.loads(json.dumps(record))
    turn = next(t for t in record["conversations"] if t["from"] == "human")
    head, sep, rest = turn["value"].partition("\n")
    if sep and head.strip() in ("<video>", "<image>"):
        turn["value"] = f"{head}\n{context}\n{rest}"
    else:
        turn["value"] = f"{context}\n{turn['value']}"
    return record


def sample_lengths(cfg: Config, data_file: str | Path, data_root: str | Path) -> list[int]:
    """Token count of every sample of ``data_file`` as the trainer encodes it (a bad sample raises)."""
    from refvllm.data.dataset import RefDataset
    from refvllm.families import make_processor

    processor = make_processor(cfg)
    dataset = RefDataset(data_file, data_root, processor, cfg.data.num_frames, processor.frame_size,
                         cfg.data.mask_resize, cfg.data.index_cache_dir or None, cfg.data.limits)
    lengths = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, dict):
            raise ConfigError(f"smoke data: sample {i} cannot be used: {item.reason}")
        lengths.append(int(item["input_ids"].shape[0]))
    return lengths


def make_long_sample(cfg: Config, data_file: Path, data_root: Path, index: int, target: int) -> list[int]:
    """Rewrite sample ``index`` of the JSON array ``data_file`` to about ``target`` tokens (never more);
    returns the file's sample lengths after. Two passes: the second corrects what the first's estimate missed."""
    from refvllm.families import make_processor

    tokenizer = make_processor(cfg).tokenizer
    records = json.loads(data_file.read_text())
    original = records[index]
    lengths = sample_lengths(cfg, data_file, data_root)
    extra = target - lengths[index]
    for _ in range(2):
        records[index] = lengthen(original, context_text(tokenizer, extra))
        data_file.write_text(json.dumps(records))
        lengths = sample_lengths(cfg, data_file, data_root)
        if lengths[index] <= target:
            break
        extra -= lengths[index] - target
    if lengths[index] > target:
        raise ConfigError(f"smoke data: could not fit the long sample into {target} tokens")
    return lengths


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class Smoke:
    """What the stages share: the config file and overrides, the output folder, and what earlier stages made."""

    config: str
    out: Path
    args: argparse.Namespace
    user_overrides: list[str]
    paths: dict[str, str] = field(default_factory=dict)  # config key -> value, set by the stages
    made: dict[str, str] = field(default_factory=dict)  # eval_file, checkpoint: what later stages use
    local_models: dict[str, str] = field(default_factory=dict)  # --hub: the written checkpoints, for the data stage
    env: dict[str, str] = field(default_factory=dict)  # --hub: the environment of the stages' subprocesses

    @property
    def stages(self) -> tuple[str, ...]:
        return HUB_STAGES if self.args.hub else STAGES

    def cfg(self, **extra) -> Config:
        """The config with the user's overrides, then the stages' (``extra`` uses ``__`` for dots)."""
        values = {**self.paths, **{k.replace("__", "."): v for k, v in extra.items()}}
        return load_config(self.config, [*self.user_overrides, *(f"{k}={v}" for k, v in values.items())])


def stage_checkpoints(s: Smoke) -> str:
    """Write (or reuse) the real-shaped checkpoints; point the config's model paths at them (``--hub``: place
    them in the hub cache ``OUT/hub`` under the config's ids instead)."""
    cfg = s.cfg()
    if s.args.as_is:
        from refvllm.families import checkpoint_paths
        from refvllm.model.build import ensure_tiny_checkpoints

        ensure_tiny_checkpoints(cfg.model)  # model.tiny: the data stage needs them before training would write them
        return f"the config's checkpoints: {' + '.join(checkpoint_paths(cfg.model).values())}"
    plan = _vlm_checkpoint(s, cfg) if cfg.model.vlm_path else _assembled_checkpoints(s, cfg)
    written, reused = {}, []
    for key, name, write in plan:  # (config key, shape name + depth, writer of that path)
        path = s.out / "checkpoints" / name
        if (path / "config.json").is_file():  # written by an earlier check (same shape, depth and seed)
            reused.append(name)
        else:
            if path.exists():
                shutil.rmtree(path)
            write(path)
        written[key] = str(path)
    n = s.args.layers
    note = f" ({', '.join(reused)} reused from {s.out / 'checkpoints'})" if reused else ""
    what = f"{' + '.join(name for _, name, _ in plan)}, {n} layer{'s' if n != 1 else ''} each run, random weights{note}"
    if s.args.hub:
        return f"{what}; {place_in_hub_cache(s, cfg, written)}"
    s.paths.update({**written, "model.tiny": "false"})
    return what


def _assembled_checkpoints(s: Smoke, cfg: Config) -> list[tuple[str, str, Callable]]:
    """The vision tower and LLM shapes the config's paths name (or --vision-shape / --llm-shape)."""
    from refvllm.model import shapes

    vision = s.args.vision_shape or shapes.vision_shape_for(cfg.model.vision_path)
    llm = s.args.llm_shape or shapes.llm_shape_for(cfg.model.llm_path)
    for which, name, path, known in (("vision", vision, cfg.model.vision_path, shapes.VISION_SHAPES),
                                     ("llm", llm, cfg.model.llm_path, shapes.LLM_SHAPES)):
        if name is None:
            raise ConfigError(f"no known real shape for model.{which}_path '{path}'; pass --{which}-shape "
                              f"({', '.join(known)}) or --as-is")
    n, nv = s.args.layers, vision_layers(cfg, s.args.layers)
    return [("model.vision_path", f"{vision}-{nv}layers", lambda path: shapes.write_vision(path, vision, nv)),
            ("model.llm_path", f"{llm}-{n}layers", lambda path: shapes.write_llm(path, llm, n))]


def _vlm_checkpoint(s: Smoke, cfg: Config) -> list[tuple[str, str, Callable]]:
    """The Qwen2.5-VL shape ``model.vlm_path`` names (its hub config at ``--layers`` text and vision blocks,
    bfloat16, Qwen's sampling generation config)."""
    from refvllm.model import qwen2_5_vl

    shape = s.args.vlm_shape or qwen2_5_vl.shape_for(cfg.model.vlm_path)
    if shape is None:
        raise ConfigError(f"no known real shape for model.vlm_path '{cfg.model.vlm_path}' (known: "
                          f"{', '.join(qwen2_5_vl.SHAPES[k].hub_id for k in qwen2_5_vl.REAL_SHAPES)}); or --as-is")
    n = s.args.layers
    return [("model.vlm_path", f"{shape}-{n}layers",
             lambda path: qwen2_5_vl.write_checkpoint(path, shape, layers=n, vision_layers=n))]


def vision_layers(cfg: Config, layers: int) -> int:
    """Layers to write so that ``layers`` of them run: a negative ``model.vision_feature_layer`` (-2, the
    recipe's) cuts the last ones off."""
    feature_layer = cfg.model.vision_feature_layer
    return layers + (-feature_layer - 1 if feature_layer < 0 else 0)


def place_in_hub_cache(s: Smoke, cfg: Config, written: dict[str, str]) -> str:
    """``--hub``: the written checkpoints (``{config key: directory}``) as the config's hub ids in ``OUT/hub``;
    the stages' environment reads that cache offline."""
    from refvllm.hub import is_local, write_snapshot

    cache = s.out / "hub"
    placed = []
    for key, directory in written.items():
        repo_id = getattr(cfg.model, key.removeprefix("model."))
        if is_local(repo_id) or repo_id.count("/") != 1:
            raise ConfigError(f"--hub needs hub ids ('org/name') in {key}, got '{repo_id}'")
        revision = getattr(cfg.model, key.removeprefix("model.").replace("_path", "_revision")) or "main"
        write_snapshot(cache, repo_id, directory, revision)
        placed.append(f"{repo_id}@{revision}")
    s.local_models = dict(written)
    s.env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    s.env.pop("HUGGINGFACE_HUB_CACHE", None)  # the old name would win over HF_HUB_CACHE in some versions
    return f"in the hub cache {cache} as {', '.join(placed)} (HF_HUB_OFFLINE=1)"


def stage_data(s: Smoke) -> str:
    """Synthetic train/eval data with the config's frame count; the first training sample made long."""
    from refvllm.data.synthetic import generate

    cfg = s.cfg()
    root = s.out / "data"
    if root.exists():
        shutil.rmtree(root)
    files = generate(root, num_train=3, num_eval=2, seed=0, num_frames=max(cfg.data.num_frames, 2))
    s.paths.update({"data.train_file": str(files.train_file), "data.data_root": str(root)})
    if not s.args.hub:  # --hub leaves every other data key as the config says
        s.paths.update({"data.synth.enabled": "false", "data.num_workers": "0",
                        "data.index_cache_dir": str(s.out / "index-cache")})
    s.made["eval_file"] = str(files.eval_file)
    cfg = s.cfg(**{k.replace(".", "__"): v for k, v in s.local_models.items()})  # --hub: the same files, by path
    target = s.args.sample_tokens or cfg.data.max_length - LENGTH_MARGIN
    if target > cfg.data.max_length:
        raise ConfigError(f"--sample-tokens {target} is more than data.max_length={cfg.data.max_length}")
    lengths = make_long_sample(cfg, Path(files.train_file), root, 0, target)
    return (f"{len(lengths)} train samples ({', '.join(map(str, lengths))} tokens; {cfg.data.num_frames} frames "
            f"per video), 2 eval")


def _train_overrides(s: Smoke, max_steps: int, resume: str) -> dict:
    return {"train__output_dir": str(s.out / "train"), "train__max_steps": max_steps, "train__save_steps": max_steps,
            "train__save_total_limit": 0, "train__micro_batch_size": 1, "train__max_tokens": 0,
            "train__grad_accum": 1,
            "train__warmup_steps": 0, "train__tensorboard": "false", "train__resume": resume}


def stage_train(s: Smoke) -> str:
    """``--steps`` steps from scratch, with a checkpoint at the end."""
    from refvllm.train.loop import train

    if (s.out / "train").exists():
        shutil.rmtree(s.out / "train")
    summary = train(s.cfg(**_train_overrides(s, s.args.steps, "none")))
    if summary["step"] != s.args.steps or not summary["checkpoint"]:
        raise AssertionError(f"training ended at step {summary['step']} without its checkpoint: {summary}")
    s.made["checkpoint"] = summary["checkpoint"]
    return f"{summary['step']} steps, last loss {summary['final_loss']:.4f}, saved {summary['checkpoint']}"


def stage_resume(s: Smoke) -> str:
    """One more step, resumed from the checkpoint of :func:`stage_train`."""
    from refvllm.train.loop import train

    summary = train(s.cfg(**_train_overrides(s, s.args.steps + 1, s.made["checkpoint"])))
    if summary["step"] != s.args.steps + 1 or summary["steps_this_run"] != 1:
        raise AssertionError(f"the resumed run did not take exactly one step: {summary}")
    s.made["checkpoint"] = summary["checkpoint"]
    return f"step {summary['step']}, loss {summary['final_loss']:.4f}, saved {summary['checkpoint']}"


def stage_eval(s: Smoke) -> str:
    """``refvllm eval`` of the last checkpoint on the eval split: every sample must get a prediction."""
    from refvllm.eval.run import main as eval_main

    out = s.out / "eval" / "metrics.json"
    code = eval_main(["--model", s.made["checkpoint"], "--data", s.made["eval_file"], "--data-root",
                      s.paths["data.data_root"], "--out", str(out), "--no-progress", "eval.batch_size=1",
                      "eval.max_new_tokens=4"])
    overall = json.loads(out.read_text())["overall"]
    if code != 0 or overall["num_bad"] != 0 or overall["n"] != 2:
        raise AssertionError(f"eval exit code {code}, overall {overall}")
    return f"{overall['n']} samples predicted ({out})"


def stage_export(s: Smoke) -> str:
    """``refvllm export`` of the last checkpoint."""
    from refvllm.export import main as export_main

    out = s.out / "export"
    code = export_main(["--checkpoint", s.made["checkpoint"], "--out", str(out), "--overwrite",
                        *(["--merge"] if s.args.merge else [])])
    if code != 0:
        raise AssertionError(f"export exit code {code}")
    return str(out)


# ------------------------------------------------------------------------ --hub: the user's commands


def run_refvllm(s: Smoke, *args: str) -> str:
    """``python -m refvllm ARGS`` in the stages' environment (the hub cache, offline); its output goes to the
    stage's log (this process's stdout while a stage runs). Returns the output; a failure raises."""
    proc = subprocess.run([sys.executable, "-m", "refvllm", *args], env=s.env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(f"$ refvllm {' '.join(args)}\n{proc.stdout}", flush=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        raise AssertionError(f"refvllm {args[0]} exited {proc.returncode}: {lines[-1] if lines else ''}")
    return proc.stdout


def _train_command(s: Smoke, max_steps: int) -> list[str]:
    """``refvllm train`` of the config, as the user's: their overrides, then only the data paths, the step
    count and the output folder."""
    return ["train", "--config", str(Path(s.config).resolve()), *s.user_overrides,
            *(f"{k}={v}" for k, v in s.paths.items()), f"train.max_steps={max_steps}",
            f"train.output_dir={s.out / 'train'}"]


def stage_train_hub(s: Smoke) -> str:
    """``refvllm train`` from scratch to ``--steps`` steps; training saves its last step."""
    if (s.out / "train").exists():
        shutil.rmtree(s.out / "train")
    output = run_refvllm(s, *_train_command(s, s.args.steps))
    return _saved(s, output, s.args.steps)


def stage_resume_hub(s: Smoke) -> str:
    """The same command with one more step: the config's ``train.resume`` must pick up the last checkpoint."""
    output = run_refvllm(s, *_train_command(s, s.args.steps + 1))
    if f"checkpoint-{s.args.steps}" not in "".join(line for line in output.splitlines() if "resum" in line):
        raise AssertionError(f"the run did not resume from checkpoint-{s.args.steps} (train.resume is "
                             f"'{s.cfg().train.resume}')")
    return _saved(s, output, s.args.steps + 1)


def _saved(s: Smoke, output: str, step: int) -> str:
    from refvllm.checkpoint import checkpoint_dir

    checkpoint = Path(checkpoint_dir(s.out / "train", step))
    if not checkpoint.is_dir():
        raise AssertionError(f"training did not save {checkpoint}")
    s.made["checkpoint"] = str(checkpoint)
    losses = [line for line in output.splitlines() if line.startswith("loss ")]
    return f"{losses[-1] if losses else 'no loss line'}; saved {checkpoint}"


def stage_eval_hub(s: Smoke) -> str:
    """``refvllm eval`` of the last checkpoint with the config's eval settings."""
    out = s.out / "eval" / "metrics.json"
    run_refvllm(s, "eval", "--no-progress", "--model", s.made["checkpoint"], "--data", s.made["eval_file"],
                "--data-root", s.paths["data.data_root"], "--out", str(out))
    result = json.loads(out.read_text())
    if result["overall"]["num_bad"] != 0 or result["overall"]["n"] != 2:
        raise AssertionError(f"eval overall {result['overall']}")
    generation = {k: result["run"]["generation"].get(k) for k in ("do_sample", "repetition_penalty", "max_new_tokens")}
    return f"{result['overall']['n']} samples predicted, generation {generation} ({out})"


def stage_export_hub(s: Smoke) -> str:
    """``refvllm export --merge`` of the last checkpoint."""
    out = s.out / "export"
    output = run_refvllm(s, "export", "--checkpoint", s.made["checkpoint"], "--out", str(out), "--overwrite",
                         "--merge")
    manifest = json.loads(output.strip().splitlines()[-1])
    s.made["merged"] = manifest.get("merged_vlm_dir") or manifest["merged_llm_dir"]
    s.made["adapter"] = manifest["adapter_dir"] or ""
    s.made["model_class"] = "Qwen2_5_VLForConditionalGeneration" if manifest.get("merged_vlm_dir") else \
        "AutoModelForCausalLM"
    return str(out)


# Plain transformers and peft, nothing of refvllm: the merged model (an LLM, or a whole VLM by its class), and the
# adapter on the base model by the hub id its adapter_config.json names, both from the offline cache; the same
# prompt's logits from each.
_PLAIN_LOAD = """
import json, sys, torch
import transformers
from transformers import AutoTokenizer
merged_dir, adapter_dir = sys.argv[1], sys.argv[2]
AutoModelForCausalLM = getattr(transformers, sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(merged_dir)
ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the red circle doing?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
vocab = merged.get_input_embeddings().weight.shape[0]  # a VLM's config has no top-level vocab_size
result = {"dtype": str(merged.dtype), "vocab": vocab, "prompt_tokens": ids.shape[1]}
with torch.no_grad():
    a = merged(ids).logits.float()
    out = merged.generate(ids, max_new_tokens=4, do_sample=False)
result["generated"] = out.shape[1] - ids.shape[1]
if adapter_dir:
    from peft import PeftModel
    base_id = json.load(open(adapter_dir + "/adapter_config.json"))["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_id, dtype=merged.dtype)
    with torch.no_grad():
        b = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits.float()
    result.update(base=base_id, rel_diff=float((a - b).norm() / a.norm()))
print(json.dumps(result))
"""


def stage_load_hub(s: Smoke) -> str:
    """The merged LLM (and base + adapter) in plain transformers, offline from the hub cache."""
    proc = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, s.made["merged"], s.made["adapter"],
                           s.made["model_class"]], env=s.env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(proc.stdout, flush=True)
    if proc.returncode != 0:
        raise AssertionError(f"plain transformers could not load the export: {proc.stdout.strip().splitlines()[-1]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result.get("rel_diff", 0.0) > MERGED_LOGITS_RTOL:
        raise AssertionError(f"merged and base + adapter logits differ by {result['rel_diff']:.3g} (relative)")
    return ", ".join(f"{k} {v}" for k, v in result.items())


_STAGE_FUNCTIONS: dict[str, Callable[[Smoke], str]] = {
    "checkpoints": stage_checkpoints, "data": stage_data, "train": stage_train, "resume": stage_resume,
    "eval": stage_eval, "export": stage_export,
}
_HUB_STAGE_FUNCTIONS: dict[str, Callable[[Smoke], str]] = {
    **_STAGE_FUNCTIONS, "train": stage_train_hub, "resume": stage_resume_hub, "eval": stage_eval_hub,
    "export": stage_export_hub, "load": stage_load_hub,
}


# ---------------------------------------------------------------------------------------------- running


def peak_memory() -> str:
    """The process's peak RSS so far (and peak CUDA memory allocated, on a GPU)."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    text = f"peak RSS {rss:.2f} GB"
    if torch.cuda.is_available():
        text += f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GB"
    return text


class _Switchable:
    """A text stream writing to ``target``, which can change. While a check runs, ``sys.stdout``/``sys.stderr``
    are two of these: a logging handler created meanwhile (transformers makes its own on first use) binds to
    the switchable stream, not to a log file that is closed later, and follows it back to the terminal."""

    def __init__(self, target):
        self.target = target

    def write(self, text: str) -> int:
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str):  # encoding, isatty, fileno, ...: the current target's
        return getattr(self.target, name)


@contextlib.contextmanager
def _switchable_std():
    """Install switchable ``sys.stdout``/``sys.stderr``; yields (stdout, stderr, original stdout)."""
    original = sys.stdout, sys.stderr
    out, err = _Switchable(original[0]), _Switchable(original[1])
    sys.stdout, sys.stderr = out, err
    try:
        yield out, err, original[0]
    finally:
        out.target, err.target = original
        sys.stdout, sys.stderr = original


def run_stage(s: Smoke, name: str, streams) -> bool:
    """Run one stage with its output in ``OUT/logs/NAME.log``; print its PASS/FAIL line; True when it passed."""
    out, err, terminal = streams
    log = s.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        out.target = err.target = f
        try:
            functions = _HUB_STAGE_FUNCTIONS if s.args.hub else _STAGE_FUNCTIONS
            detail, ok = functions[name](s), True
        except Exception as e:  # noqa: BLE001 (a smoke check reports every failure as a FAIL line)
            traceback.print_exc()
            detail, ok = f"{type(e).__name__}: {_first_line(e)}", False
        finally:
            out.target, err.target = terminal, terminal
    seconds = time.perf_counter() - start
    suffix = "" if ok else f" (log: {log})"
    print(f"{'PASS' if ok else 'FAIL'} {name:<11} {seconds:6.1f}s  {detail}{suffix}", flush=True)
    return ok


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def smoke(config: str, out: str | Path, args: argparse.Namespace, overrides: list[str]) -> int:
    """Run the stages in order until one fails; prints a line per stage and the peak memory. Returns the exit code."""
    s = Smoke(config, Path(out), args, overrides)
    s.out.mkdir(parents=True, exist_ok=True)
    print(f"smoke check of {config} in {s.out}", flush=True)
    passed, stages = 0, s.stages
    with _switchable_std() as streams:
        for name in stages:
            if not run_stage(s, name, streams):
                for skipped in stages[stages.index(name) + 1:]:
                    print(f"SKIP {skipped}")
                break
            passed += 1
    print(peak_memory() + (" (this process; the stages ran in subprocesses)" if s.args.hub else ""))
    print(f"{passed}/{len(stages)} stages passed")
    return 0 if passed == len(stages) else 1


def _parser() -> argparse.ArgumentParser:
    from refvllm.model.qwen2_5_vl import SHAPES as VLM_SHAPES
    from refvllm.model.shapes import LLM_SHAPES, VISION_SHAPES

    p = argparse.ArgumentParser(prog="refvllm smoke", description="Check that a config's code paths run (train, "
                                "resume, eval, export) on random real-shaped checkpoints at reduced depth.")
    p.add_argument("config", help="the YAML config to check (e.g. configs/sft.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--out", default="runs/smoke", help="working folder (default runs/smoke)")
    p.add_argument("--layers", type=int, default=1, help="layers of each written tower (default 1)")
    p.add_argument("--steps", type=int, default=2, help="training steps before the resume (default 2)")
    p.add_argument("--sample-tokens", type=int, default=0,
                   help="tokens of the long training sample (default: data.max_length - 32)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--as-is", action="store_true", help="use the config's checkpoints instead of written ones")
    mode.add_argument("--hub", action="store_true", help="place the written checkpoints in an offline hub cache "
                      "under the config's ids, and run each stage as the user's command (train, eval, "
                      "export --merge, then load the merged LLM in plain transformers)")
    p.add_argument("--vision-shape", choices=VISION_SHAPES,
                   help="vision shape to write (default: the one model.vision_path names)")
    p.add_argument("--vlm-shape", choices=VLM_SHAPES,
                   help="Qwen2.5-VL shape to write (default: the one model.vlm_path names; tiny: the test VLM)")
    p.add_argument("--llm-shape", choices=LLM_SHAPES, help="LLM shape to write (default: the one model.llm_path names)")
    p.add_argument("--merge", action="store_true", help="export the merged LLM too")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)  # options may come after key=value overrides
    if args.layers < 1 or args.steps < 1:
        raise ConfigError("--layers and --steps must be >= 1")
    if not Path(args.config).is_file():
        raise ConfigError(f"config file '{args.config}' does not exist")
    return smoke(args.config, args.out, args, args.overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
