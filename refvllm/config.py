"""Typed configuration: nested dataclasses, loaded from YAML with ``key=value`` overrides.

Every key a user can set lives here, with its type and default. Unknown keys are errors that suggest the
nearest valid key. Derived values and cross-field checks live in :func:`validate_config`, the one place
they are computed.

Contract:
    cfg = load_config("configs/demo.yaml", ["train.max_steps=20", "model.lora.r=16"])
    cfg.train.max_steps == 20
    to_dict(cfg) round-trips through ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refvllm.data.limits import DataLimits
from refvllm.errors import ConfigError


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
    eval_file: str = ""
    data_root: str = ""  # media paths are relative to this; empty = the train file's folder
    num_frames: int = 16  # the frame budget T per video; every mask frame is one of them
    max_length: int = 4096  # samples longer than this (after placeholder expansion) are rejected, never cut
    max_bad_samples: int = 100  # training stops with an error after this many skipped samples (-1 = no limit)
    mask_resize: str = "rescale"  # mask whose size differs from the media's with the same aspect: rescale | error
    num_workers: int = 2  # data loader worker processes
    index_cache_dir: str = ""  # where sample offset indexes are cached; empty = ~/.cache/refvllm/index
    limits: DataLimits = field(default_factory=DataLimits)  # per-sample resource bounds (docs/data-format.md)
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
    hidden_size: int = 0  # MLP hidden width; 0 = the LLM's hidden size
    # Training only: the probability that a sample's region tokens are replaced by zeros (the input
    # --ablate-regions gives), so the model learns to guess among the question's answers without region evidence.
    dropout: float = 0.0


@dataclass
class ModelConfig:
    vision_path: str = ""  # local directory or hub id of a HF vision encoder (SigLIP, SigLIP2, CLIP)
    llm_path: str = ""  # local directory or hub id of a HF causal LM; its tokenizer is used
    tiny: bool = False  # make tiny offline checkpoints at vision_path/llm_path when missing (demo, tests)
    vision_feature_layer: int = -1  # hidden-state index taken from the vision tower
    image_mean: list[float] | None = None  # None = read from the vision checkpoint's preprocessor_config.json
    image_std: list[float] | None = None
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    train_vision: str = "frozen"  # frozen | lora | full
    train_projector: str = "full"  # full | frozen
    train_region: str = "full"  # full | frozen
    train_llm: str = "lora"  # lora | full | frozen
    lora: LoraConfig = field(default_factory=LoraConfig)
    vision_lora: LoraConfig = field(
        default_factory=lambda: LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    )
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    dtype: str = "float32"  # float32 | bfloat16 (weights and compute of the frozen parts)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/sft"
    max_steps: int = 1000
    micro_batch_size: int = 1  # per process
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
    "model.train_vision": ("frozen", "lora", "full"),
    "model.train_projector": ("full", "frozen"),
    "model.train_region": ("full", "frozen"),
    "model.train_llm": ("lora", "full", "frozen"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "model.dtype": ("float32", "bfloat16"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
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
    if key not in _all_keys(Config):
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


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_config(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {_get(cfg, key)!r}")
    positive = ["data.num_frames", "data.max_length", "model.projector.spatial_pool", "model.projector.temporal_pool",
                "model.region.max_tokens", "train.micro_batch_size", "train.grad_accum", "eval.batch_size"]
    for key in positive:
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1; got {_get(cfg, key)}")
    if cfg.train.max_steps < 0 or cfg.train.save_steps < 0 or cfg.train.warmup_steps < 0:
        raise ConfigError("config keys 'train.max_steps', 'train.save_steps', 'train.warmup_steps' must be >= 0")
    if not 0.0 <= cfg.model.region.dropout < 1.0:
        raise ConfigError(f"config key 'model.region.dropout' must be in [0, 1); got {cfg.model.region.dropout}")
    try:
        cfg.data.limits.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if (cfg.model.image_mean is None) != (cfg.model.image_std is None):
        raise ConfigError("config keys 'model.image_mean' and 'model.image_std' must be set together")


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
