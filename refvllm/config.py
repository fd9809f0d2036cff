"""Typed configuration: nested dataclasses, loaded from YAML with ``key=value`` overrides.

Every key a user can set lives here, with its type and default. Unknown keys are errors that suggest the
nearest valid key. Every value is checked in :func:`validate_config`, the one place for checks: a rule per key
(ranges, choices, non-empty) and the cross-field rules, so a bad value fails in one line before anything loads.

Contract:
    cfg = load_config("configs/demo.yaml", ["train.max_steps=20", "model.lora.r=16"])
    cfg.train.max_steps == 20
    to_dict(cfg) round-trips through ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refvllm.constants import REGION_PLACEHOLDER
from refvllm.data.limits import DataLimits
from refvllm.errors import ConfigError


@dataclass
class PromptConfig:
    """How prompts are written, read by training (the processor) and evaluation alike: an evaluation loads
    them from the checkpoint's config, so both see the same text."""

    # What each <region> placeholder becomes; {region} stands for the object's region tokens (e.g.
    # "<obj>{region}</obj>" or "object {region}"). The default: the tokens alone, in the placeholder's place.
    region: str = "{region}"
    # The line after a multiple-choice question's options (bench-q evaluation); empty = none. Write your
    # multiple-choice training questions with the same line.
    choice_instruction: str = "Answer with the option's letter from the given choices directly."


@dataclass
class SynthConfig:
    """Synthetic data made on first use when ``data.train_file`` is missing (the embedded default)."""

    enabled: bool = False  # make the data when the train file is missing
    out_dir: str = "runs/demo/data"
    num_train: int = 600
    num_eval: int = 120
    seed: int = 0


@dataclass
class DataConfig:
    train_file: str = ""  # JSON array or JSONL in the seed's format
    data_root: str = ""  # media paths are relative to this; empty = the train file's folder
    num_frames: int = 16  # the frame budget T per video; every mask frame is one of them
    # Frames per second of media that state none (folders of frames), for a model that encodes the time between
    # frames (Qwen2.5-VL); 0 = none: such media are then a data error, never a guessed interval.
    default_fps: float = 0.0
    max_length: int = 4096  # samples longer than this (after placeholder expansion) are rejected, never cut
    max_bad_samples: int = 100  # training stops with an error after this many skipped samples (-1 = no limit)
    mask_resize: str = "rescale"  # mask whose size differs from the media's with the same aspect: rescale | error
    num_workers: int = 2  # data loader worker processes
    index_cache_dir: str = ""  # where sample offset indexes are cached; empty = ~/.cache/refvllm/index
    limits: DataLimits = field(default_factory=DataLimits)  # per-sample resource bounds (docs/data-format.md)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class LoraConfig:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ProjectorConfig:
    spatial_pool: int = 2  # k x k average pooling of the patch grid before the MLP
    temporal_pool: int = 1  # average every t consecutive frames of a clip
    hidden_size: int = 0  # MLP hidden width; 0 = the LLM's hidden size


@dataclass
class RegionConfig:
    pooling: str = "area"  # area (coverage-weighted) | binary (bilinear + >0, reference parity)
    max_tokens: int = 4  # K: at most K region tokens per object after the temporal merge
    merge: str = "merge"  # merge (adjacent-similarity) | uniform (equal bins) | none (one token per mask frame)
    geometry: bool = False  # add a learned embedding of mask centroid, box and displacement since the first frame
    # What a pretrained VLM's regions pool: merged (its merged tokens) | encoder (its encoder's patch features,
    # before the merger) | both (each patch beside its merged token); auto = the family's choice (both). The
    # assembled family pools its tower's patches.
    features: str = "auto"
    hidden_size: int = 0  # MLP hidden width; 0 = the LLM's hidden size
    # Training only: the probability that a sample's region tokens are replaced by zeros (the input
    # --ablate-regions gives), so the model learns to guess among the question's answers without region evidence.
    dropout: float = 0.0


@dataclass
class ModelConfig:
    # A model is either assembled (vision_path + llm_path: a fresh projector between them) or one pretrained VLM
    # (vlm_path: its own vision encoder, merger and LLM), never both; the family is the checkpoint's model_type.
    vlm_path: str = ""  # local directory or hub id of a pretrained video-LLM (Qwen/Qwen2.5-VL-7B-Instruct)
    vlm_revision: str = ""  # hub revision of vlm_path; empty = main
    # A VLM's pixel budget per frame (Qwen2.5-VL: frames are resized to keep their aspect ratio with a pixel count
    # in [min_pixels, max_pixels]); 0 = the checkpoint's preprocessor_config.json. Visual tokens per frame pair
    # = pixels / 28^2, so max_pixels bounds a video's share of data.max_length.
    min_pixels: int = 0
    max_pixels: int = 0
    vision_path: str = ""  # local directory or hub id of a HF vision encoder (SigLIP, SigLIP2, CLIP)
    llm_path: str = ""  # local directory or hub id of a HF causal LM; its tokenizer is used
    vision_revision: str = ""  # hub revision (branch, tag or commit) of vision_path; empty = main
    llm_revision: str = ""  # hub revision of llm_path (and its tokenizer); empty = main
    tiny: bool = False  # make tiny offline checkpoints at the model paths when missing (demo, tests)
    vision_feature_layer: int = -1  # hidden-state index taken from the vision tower
    image_mean: list[float] | None = None  # None = read from the vision checkpoint's preprocessor_config.json
    image_std: list[float] | None = None
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    train_vision: str = "frozen"  # frozen | lora | full
    # auto = the family's default: full for the assembled family's fresh projector, frozen for a VLM's merger
    train_projector: str = "auto"  # auto | full | frozen
    train_region: str = "full"  # full | frozen
    train_llm: str = "lora"  # lora | full | frozen
    lora: LoraConfig = field(default_factory=LoraConfig)
    vision_lora: LoraConfig = field(
        default_factory=lambda: LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    )
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention | flash_attention_2
    dtype: str = "float32"  # float32 | bfloat16 (weights and compute of the frozen parts)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/sft"
    max_steps: int = 1000
    micro_batch_size: int = 1  # per process
    # The LLM runs each micro-batch's samples end to end in one row, each attending only to itself
    # (refvllm.model.packing): no compute on padding, the same loss and gradients. false = padded rows.
    packing: bool = True
    # Token budget per micro-batch (0 = off): micro-batches of consecutive samples whose estimated lengths
    # (refvllm.data.lengths) sum to at most this, at most micro_batch_size samples each. Pairs with packing.
    max_tokens: int = 0
    group_by_length: bool = False  # sort samples by length within windows (for padded micro-batches)
    grad_accum: int = 1
    lr: float = 2e-4  # LLM (LoRA) learning rate
    projector_lr: float = 1e-3
    region_lr: float = 1e-3
    vision_lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    log_steps: int = 1
    save_steps: int = 500
    save_total_limit: int = 3
    resume: str = "none"  # none | auto | path to a checkpoint directory
    tensorboard: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    judge_endpoint: str = ""  # OpenAI-compatible base URL; empty = no judge
    judge_model: str = ""
    judge_temperature: float = 0.0
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_timeout_s: float = 60.0  # per request
    judge_max_retries: int = 3  # retries of a failed request (connection, 429/5xx, unparseable reply)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {
    "data.mask_resize": ("rescale", "error"),
    "model.region.pooling": ("area", "binary"),
    "model.region.merge": ("merge", "uniform", "none"),
    "model.region.features": ("auto", "merged", "encoder", "both"),
    "model.train_vision": ("frozen", "lora", "full"),
    "model.train_projector": ("auto", "full", "frozen"),
    "model.train_region": ("full", "frozen"),
    "model.train_llm": ("lora", "full", "frozen"),
    "model.attn_implementation": ("sdpa", "eager", "flex_attention", "flash_attention_2"),
    "model.dtype": ("float32", "bfloat16"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
}


# Keys removed from the schema, with why. Every checkpoint written before a removal still has the key in its
# config.yaml, so a retired key is dropped with a warning instead of failing as unknown (which would make old
# checkpoints unloadable by eval, infer and export).
_RETIRED = {
    "data.eval_file": "nothing read it; evaluate with `refvllm eval --data FILE`",
}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass type, leaves and sections alike."""
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        sub = _maybe_dc(tp)
        if sub is not None:
            keys.extend(_all_keys(sub, prefix + name + "."))
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _maybe_dc(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it is
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names and prefix + key in _RETIRED:
            warnings.warn(f"config key '{prefix + key}' is retired and ignored ({_RETIRED[prefix + key]})",
                          stacklevel=2)
            continue
        if key not in names:
            raise _unknown_key(prefix + key)
        tp = hints[key]
        sub = _maybe_dc(tp)
        kwargs[key] = from_dict(value, sub, prefix + key + ".") if sub else _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain nested dict (YAML-ready)."""
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.max_steps=20)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from None
    return key.strip(), value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in the nested dict ``data``; the key must exist in the schema."""
    if key not in _all_keys(Config) and key not in _RETIRED:  # a retired key is dropped by from_dict
        raise _unknown_key(key)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (optional), apply ``key=value`` overrides, validate. Raises ConfigError on any problem."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    for text in overrides or []:
        apply_override(data, *_parse_override(text))
    cfg = from_dict(data)
    validate_config(cfg)
    return cfg


def config_value(cfg: Config, key: str) -> Any:
    """The value of dotted ``key`` (e.g. ``data.num_frames``) in ``cfg``."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@dataclass(frozen=True)
class _Allowed:
    """A value rule: the predicate and the words that say what it allows (they go into the error)."""

    ok: Callable[[Any], bool]
    text: str


def _at_least(low: float) -> _Allowed:
    return _Allowed(lambda v: v >= low, f">= {low}")


def _above(low: float) -> _Allowed:
    return _Allowed(lambda v: v > low, f"> {low}")


def _within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> _Allowed:
    def ok(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return _Allowed(ok, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def _one_of(choices: tuple[str, ...]) -> _Allowed:
    return _Allowed(lambda v: v in choices, f"one of {', '.join(choices)}")


_NON_EMPTY = _Allowed(lambda v: v.strip() != "", "non-empty")
_MODULE_NAMES = _Allowed(lambda v: len(v) > 0 and all(name.strip() for name in v),
                         "a non-empty list of module names")
# numpy's legacy seeding (accelerate's set_seed) takes 0 .. 2^32 - 1 only.
_SEED = _within(0, 2**32 - 1)


def _lora_rules(prefix: str) -> list[tuple[str, _Allowed]]:
    return [
        (f"{prefix}.r", _at_least(1)),
        (f"{prefix}.alpha", _at_least(1)),  # LoRA's update is scaled by alpha / r: 0 would switch it off
        (f"{prefix}.dropout", _within(0, 1, high_open=True)),
        (f"{prefix}.target_modules", _MODULE_NAMES),  # PEFT adapts nothing (and errors late) on an empty list
    ]


# One rule per key (a float must also be finite, checked for every float key before these). Keys without a rule
# are in _NO_RULE with the reason; tests/unit/test_config.py checks that every key is in one or the other.
_RULES: list[tuple[str, _Allowed]] = [
    *((key, _one_of(choices)) for key, choices in _CHOICES.items()),
    ("data.num_frames", _at_least(1)),
    ("data.default_fps", _at_least(0)),  # 0 = none
    ("model.min_pixels", _at_least(0)),  # 0 = the checkpoint's
    ("model.max_pixels", _at_least(0)),
    ("data.max_length", _at_least(1)),
    ("data.max_bad_samples", _at_least(-1)),  # -1 = no limit
    ("data.num_workers", _at_least(0)),  # 0 = load in the training process
    ("data.synth.num_train", _at_least(1)),  # training on the synthetic set needs a sample
    ("data.synth.num_eval", _at_least(0)),
    ("data.synth.seed", _SEED),
    ("model.projector.spatial_pool", _at_least(1)),
    ("model.projector.temporal_pool", _at_least(1)),
    ("model.projector.hidden_size", _at_least(0)),  # 0 = the LLM's hidden size
    ("model.region.max_tokens", _at_least(1)),
    ("model.region.hidden_size", _at_least(0)),  # 0 = the LLM's hidden size
    ("model.region.dropout", _within(0, 1, high_open=True)),  # 1 would never show the model a region token
    *_lora_rules("model.lora"),
    *_lora_rules("model.vision_lora"),
    ("train.output_dir", _NON_EMPTY),  # empty would write checkpoints into the working directory
    ("train.max_steps", _at_least(1)),  # a run of 0 steps trains nothing and writes no checkpoint
    ("train.micro_batch_size", _at_least(1)),
    ("train.max_tokens", _at_least(0)),
    ("train.grad_accum", _at_least(1)),
    # A module that trains needs a rate > 0; a frozen one should say so with model.train_*, not with lr 0.
    ("train.lr", _above(0)),
    ("train.projector_lr", _above(0)),
    ("train.region_lr", _above(0)),
    ("train.vision_lr", _above(0)),
    ("train.weight_decay", _at_least(0)),
    # May exceed max_steps (a shortened smoke run of a recipe): the rate then ramps up for the whole run.
    ("train.warmup_steps", _at_least(0)),
    ("train.min_lr_ratio", _within(0, 1)),
    ("train.max_grad_norm", _at_least(0)),  # 0 = no clipping
    ("train.seed", _SEED),
    ("train.log_steps", _at_least(1)),  # the loop logs when step % log_steps == 0
    ("train.save_steps", _at_least(0)),  # 0 = only at the end
    ("train.save_total_limit", _at_least(0)),  # 0 = keep all
    ("eval.batch_size", _at_least(1)),
    ("eval.max_new_tokens", _at_least(1)),
    ("eval.temperature", _above(0)),  # divides the logits when sampling; greedy ignores it
    ("eval.top_p", _within(0, 1, low_open=True)),  # 0 would keep no token
    ("eval.judge_temperature", _at_least(0)),  # 0 = the judge's most deterministic reply
    ("eval.judge_timeout_s", _above(0)),
    ("eval.judge_max_retries", _at_least(0)),
]

# Keys with no value rule of their own (bools need none beyond their type), and why.
_NO_RULE = {
    "data.train_file": "may be empty at load: eval, infer and export load configs too; training checks the file",
    "data.data_root": "empty = the train file's folder",
    "data.index_cache_dir": "empty = ~/.cache/refvllm/index",
    "data.synth.out_dir": "checked with data.synth.enabled (cross-field)",
    "model.vlm_path": "empty = an assembled model; checked against vision_path/llm_path (cross-field), and when loaded",
    "model.vlm_revision": "any branch, tag or commit; empty = main; resolved (or refused) when loaded",
    "model.vision_path": "may be empty at load (the default config); checked with model.tiny and when loaded",
    "model.llm_path": "may be empty at load (the default config); checked with model.tiny and when loaded",
    "model.vision_revision": "any branch, tag or commit; empty = main; resolved (or refused) when loaded",
    "model.llm_revision": "any branch, tag or commit; empty = main; resolved (or refused) when loaded",
    "model.vision_feature_layer": "any hidden-state index, negative from the end; the tower's depth bounds it",
    "model.image_mean": "checked with model.image_std (cross-field)",
    "model.image_std": "checked with model.image_mean (cross-field)",
    "train.resume": "none | auto | a checkpoint path (empty = none); the path is checked when training starts",
    "data.prompt.choice_instruction": "any line; empty = none",
    "data.prompt.region": "checked in the cross-field rules: exactly one {region}",
    "eval.judge_endpoint": "empty = no judge",
    "eval.judge_model": "checked with eval.judge_endpoint (cross-field)",
    "eval.judge_api_key_env": "empty = no API key",
}


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every non-section field of a config dataclass."""
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_leaves(value, prefix + f.name + "."))
        else:
            out.append((prefix + f.name, value))
    return out


def _bad(key: str, allowed: str, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' must be {allowed}; got {value!r}")


def _check_cross_field(cfg: Config) -> None:
    """Rules that tie keys together; each error names the key to change."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if (m.image_mean is None) != (m.image_std is None):
        raise ConfigError("config keys 'model.image_mean' and 'model.image_std' must be set together")
    if m.image_mean is not None:
        for key, values in (("model.image_mean", m.image_mean), ("model.image_std", m.image_std)):
            if len(values) != 3:  # one per RGB channel
                raise _bad(key, "a list of 3 numbers (R, G, B)", values)
        if not all(s > 0 for s in m.image_std):  # pixels are divided by it
            raise _bad("model.image_std", "a list of 3 numbers > 0", m.image_std)
    # fp16 autocast over bfloat16 weights mixes the two half types (and fp16's loss scaling expects fp32 grads).
    if t.mixed_precision == "fp16" and m.dtype == "bfloat16":
        raise ConfigError("config key 'train.mixed_precision' must be bf16 or no with model.dtype=bfloat16; got 'fp16'")
    # FlashAttention-2 kernels take half precision only. Training's bf16 autocast would cast float32 weights'
    # activations, but eval and infer run without autocast on the same config, and fail in the first forward.
    if m.attn_implementation == "flash_attention_2" and m.dtype != "bfloat16":
        raise ConfigError(f"config key 'model.dtype' must be bfloat16 with model.attn_implementation="
                          f"flash_attention_2 (its kernels run in half precision only; or use sdpa); got {m.dtype!r}")
    if d.prompt.region.count("{region}") != 1 or REGION_PLACEHOLDER in d.prompt.region.replace("{region}", ""):
        raise _bad("data.prompt.region", f"text with exactly one {{region}} (where the region tokens go) and no "
                   f"{REGION_PLACEHOLDER}", d.prompt.region)
    if t.max_tokens and t.micro_batch_size == 1:  # the budget fills micro-batches of up to micro_batch_size
        raise ConfigError("config key 'train.micro_batch_size' must be > 1 with train.max_tokens (it is the most "
                          "samples a token-budget micro-batch takes); got 1")
    _check_model_source(cfg)
    if d.synth.enabled:  # the data is written to out_dir and then read as train_file (its train.json)
        for key in ("data.synth.out_dir", "data.train_file"):
            if not config_value(cfg, key).strip():
                raise _bad(key, "non-empty with data.synth.enabled", config_value(cfg, key))
    if cfg.eval.judge_endpoint and not cfg.eval.judge_model.strip():
        raise _bad("eval.judge_model", "non-empty (the judge model's name) when eval.judge_endpoint is set",
                   cfg.eval.judge_model)


# Keys of the assembled family that a pretrained VLM has no use for (it brings its own tower and merger), with
# their defaults: a VLM config that sets one gets an error instead of a setting that silently does nothing.
_ASSEMBLED_ONLY = ("model.vision_feature_layer", "model.image_mean", "model.image_std", "model.projector.spatial_pool",
                   "model.projector.temporal_pool", "model.projector.hidden_size")


def _check_model_source(cfg: Config) -> None:
    """Either ``model.vlm_path`` or ``model.vision_path`` + ``model.llm_path``; the keys of the other kind at
    their defaults; with ``model.tiny`` the paths the tiny checkpoints go to."""
    m = cfg.model
    if m.vlm_path.strip():
        for key in ("model.vision_path", "model.llm_path", "model.vision_revision", "model.llm_revision"):
            if config_value(cfg, key):
                raise ConfigError(f"config keys 'model.vlm_path' and '{key}' are both set: a model is one pretrained "
                                  "VLM (vlm_path) or assembled from a vision encoder and an LLM (vision_path + "
                                  "llm_path), not both")
        default = Config().model
        for key in _ASSEMBLED_ONLY:
            if config_value(cfg, key) != config_value(Config(), key):
                raise ConfigError(f"config key '{key}' does not apply with model.vlm_path (a pretrained VLM keeps its "
                                  f"own vision encoder and merger); remove it (got {config_value(cfg, key)!r})")
        if m.train_vision == "lora" or default.vision_lora != m.vision_lora:
            raise ConfigError("config key 'model.train_vision' must be frozen or full with model.vlm_path (LoRA goes "
                              "on the language model; the vision encoder is frozen or fully trained)"
                              if m.train_vision == "lora" else
                              "config key 'model.vision_lora' does not apply with model.vlm_path; remove it")
        if m.min_pixels and m.max_pixels and m.min_pixels > m.max_pixels:
            raise ConfigError(f"config key 'model.min_pixels' must be <= model.max_pixels; got {m.min_pixels} > "
                              f"{m.max_pixels}")
        return
    if m.region.features != "auto":
        raise ConfigError("config key 'model.region.features' applies to a pretrained VLM (model.vlm_path) only; "
                          "the assembled family pools its vision tower's patch features")
    for key in ("model.min_pixels", "model.max_pixels"):
        if config_value(cfg, key):
            raise ConfigError(f"config key '{key}' applies to a pretrained VLM (model.vlm_path) only; the assembled "
                              "family resizes frames to its vision tower's image size")
    if m.tiny:  # the tiny checkpoints are written at these paths
        for key in ("model.vision_path", "model.llm_path"):
            if not config_value(cfg, key).strip():
                raise _bad(key, "non-empty with model.tiny (where the tiny checkpoint goes)", config_value(cfg, key))


def validate_config(cfg: Config) -> None:
    """Check every value (the rules above, data.limits, the cross-field rules); raises ConfigError naming the key,
    the value and what is allowed."""
    for key, value in _leaves(cfg):
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise _bad(key, "finite", value)
    for key, allowed in _RULES:
        value = config_value(cfg, key)
        if not allowed.ok(value):
            raise _bad(key, allowed.text, value)
    try:
        cfg.data.limits.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_cross_field(cfg)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
