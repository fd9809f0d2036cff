import re
import warnings
from pathlib import Path

import pytest

from refvllm.config import _NO_RULE, _RULES, Config, _leaves, dump_yaml, from_dict, load_config, to_dict
from refvllm.errors import ConfigError


def test_overrides_apply_and_round_trip():
    cfg = load_config(None, ["train.max_steps=20", "model.lora.r=16", "model.lora.target_modules=[q_proj]"])
    assert cfg.train.max_steps == 20 and cfg.model.lora.r == 16
    assert cfg.model.lora.target_modules == ["q_proj"]
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    assert "max_steps: 20" in dump_yaml(cfg)


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])


def test_bad_type_and_choice_name_the_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="model.region.merge"):
        load_config(None, ["model.region.merge=kmeans"])


def test_int_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


# ------------------------------------------------------------------------------------------------ value rules

ROOT = Path(__file__).parents[2]

# (overrides, the key the error must name). One row per rule, the examples first.
BAD_VALUES = [
    (["train.log_steps=0"], "train.log_steps"),
    (["model.lora.r=0"], "model.lora.r"),
    (["train.lr=-1e-4"], "train.lr"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["train.min_lr_ratio=1.5"], "train.min_lr_ratio"),
    (["train.mixed_precision=fp16", "model.dtype=bfloat16"], "train.mixed_precision"),
    (["model.attn_implementation=flash_attention_2"], "model.dtype"),  # the default float32
    (["data.num_frames=0"], "data.num_frames"),
    (["data.max_length=0"], "data.max_length"),
    (["data.max_bad_samples=-2"], "data.max_bad_samples"),
    (["data.mask_resize=crop"], "data.mask_resize"),
    (["data.limits.max_objects=0"], "data.limits.max_objects"),
    (["data.synth.num_train=0"], "data.synth.num_train"),
    (["data.synth.num_eval=-1"], "data.synth.num_eval"),
    (["data.synth.seed=-1"], "data.synth.seed"),
    (["data.synth.enabled=true"], "data.train_file"),  # the default train_file is empty
    (["data.synth.enabled=true", "data.train_file=d/train.json", "data.synth.out_dir="], "data.synth.out_dir"),
    (["model.tiny=true"], "model.vision_path"),  # the default paths are empty
    (["model.tiny=true", "model.vision_path=v"], "model.llm_path"),
    (["model.image_mean=[0.5, 0.5, 0.5]"], "model.image_std"),
    (["model.image_mean=[0.5, 0.5]", "model.image_std=[0.5, 0.5]"], "model.image_mean"),
    (["model.image_mean=[0.5, 0.5, 0.5]", "model.image_std=[0.5, 0, 0.5]"], "model.image_std"),
    (["model.projector.spatial_pool=0"], "model.projector.spatial_pool"),
    (["model.projector.temporal_pool=0"], "model.projector.temporal_pool"),
    (["model.projector.hidden_size=-1"], "model.projector.hidden_size"),
    (["model.region.max_tokens=0"], "model.region.max_tokens"),
    (["train.max_tokens=-1"], "train.max_tokens"),
    (["data.prompt.region=object"], "data.prompt.region"),  # no {region}: where would the tokens go?
    (["data.prompt.region=<region> {region}"], "data.prompt.region"),
    (["train.max_tokens=4096"], "train.micro_batch_size"),  # the default micro-batch of 1 leaves no budget
    (["model.region.hidden_size=-1"], "model.region.hidden_size"),
    (["model.region.dropout=1.0"], "model.region.dropout"),
    (["model.region.dropout=-0.1"], "model.region.dropout"),
    (["model.lora.alpha=0"], "model.lora.alpha"),
    (["model.lora.dropout=1.0"], "model.lora.dropout"),
    (["model.lora.target_modules=[]"], "model.lora.target_modules"),
    (["model.vision_lora.r=0"], "model.vision_lora.r"),
    (["model.vision_lora.target_modules=['']"], "model.vision_lora.target_modules"),
    (["model.train_llm=half"], "model.train_llm"),
    (["train.output_dir="], "train.output_dir"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=.inf"], "train.lr"),
    (["train.lr=.nan"], "train.lr"),
    (["train.projector_lr=0"], "train.projector_lr"),
    (["train.region_lr=-1"], "train.region_lr"),
    (["train.vision_lr=-2e-5"], "train.vision_lr"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.min_lr_ratio=-0.1"], "train.min_lr_ratio"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm"),
    (["train.seed=-1"], "train.seed"),
    (["train.seed=4294967296"], "train.seed"),
    (["train.save_steps=-1"], "train.save_steps"),
    (["train.save_total_limit=-1"], "train.save_total_limit"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens"),
    (["eval.temperature=0"], "eval.temperature"),
    (["eval.top_p=0"], "eval.top_p"),
    (["eval.top_p=1.5"], "eval.top_p"),
    (["eval.judge_temperature=-0.5"], "eval.judge_temperature"),
    (["eval.judge_timeout_s=0"], "eval.judge_timeout_s"),
    (["eval.judge_max_retries=-1"], "eval.judge_max_retries"),
    (["eval.judge_endpoint=http://127.0.0.1:9/v1"], "eval.judge_model"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_message_says_key_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.log_steps=0"])
    assert str(info.value) == "config key 'train.log_steps' must be >= 1; got 0"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.region.dropout=1"])
    assert str(info.value) == "config key 'model.region.dropout' must be in [0, 1); got 1.0"


@pytest.mark.parametrize("overrides", [
    ["train.max_grad_norm=0", "train.save_total_limit=0", "train.save_steps=0"],  # each 0 = off
    ["data.max_bad_samples=-1", "data.num_workers=0"],
    ["train.max_steps=10", "train.warmup_steps=100"],  # a shortened recipe: the rate ramps for the whole run
    ["train.min_lr_ratio=1", "eval.top_p=1", "model.region.dropout=0", "eval.judge_temperature=0"],
    ["model.attn_implementation=flash_attention_2", "model.dtype=bfloat16", "train.mixed_precision=bf16"],
    ["train.mixed_precision=fp16"],  # with the float32 default
    ["model.image_mean=[0.5, 0.5, 0.5]", "model.image_std=[0.25, 0.25, 0.25]", "model.vision_feature_layer=-2"],
    ["train.resume=", "data.data_root=", "data.index_cache_dir="],  # empty = the documented default
    ["data.synth.enabled=true", "data.train_file=d/train.json", "data.synth.out_dir=d"],
])
def test_boundary_values_are_accepted(overrides):
    load_config(None, overrides)


def test_every_key_has_a_value_rule_or_a_reason_for_none():
    """A new key must decide: a row in _RULES (or _CHOICES), or an entry in _NO_RULE saying why."""
    leaves = dict(_leaves(Config()))
    ruled = {key for key, _ in _RULES} | set(_NO_RULE) | {k for k in leaves if k.startswith("data.limits.")}
    missing = {k for k, v in leaves.items() if not isinstance(v, bool)} - ruled
    assert not missing, f"keys without a value rule: {sorted(missing)}"
    assert not (ruled - set(leaves)), "a rule names a key that does not exist"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pass_every_rule(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no retired key either
        load_config(path)


def test_retired_eval_file_is_not_a_key_but_old_checkpoint_configs_load(tmp_path):
    assert "eval_file" not in to_dict(Config())["data"]
    old = tmp_path / "config.yaml"  # as every checkpoint written before the removal has it
    old.write_text("data:\n  train_file: d/train.json\n  eval_file: d/eval.json\n")
    with pytest.warns(UserWarning, match="'data.eval_file' is retired"):
        cfg = load_config(old)
    assert cfg.data.train_file == "d/train.json" and "eval_file" not in dump_yaml(cfg)
    with pytest.warns(UserWarning, match="'data.eval_file' is retired"):
        load_config(None, ["data.eval_file=d/eval.json"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.vlm_path=Qwen/Qwen2.5-VL-7B-Instruct", "model.llm_path=Qwen/Qwen2.5-7B-Instruct"],
     "'model.vlm_path' and 'model.llm_path' are both set"),
    (["model.vlm_path=v", "model.vision_path=s"], "'model.vlm_path' and 'model.vision_path' are both set"),
    (["model.vlm_path=v", "model.vision_feature_layer=-2"], "'model.vision_feature_layer' does not apply"),
    (["model.vlm_path=v", "model.projector.spatial_pool=4"], "'model.projector.spatial_pool' does not apply"),
    (["model.vlm_path=v", "model.train_vision=lora"], "must be frozen or full with model.vlm_path"),
    (["model.vlm_path=v", "model.min_pixels=1000", "model.max_pixels=10"], "must be <= model.max_pixels"),
    (["model.max_pixels=200704"], "'model.max_pixels' applies to a pretrained VLM"),
    (["model.region.features=encoder"], "'model.region.features' applies to a pretrained VLM"),
    (["model.vlm_path=v", "model.region.features=pixels"], "one of auto, merged, encoder, both"),
    (["data.default_fps=-1"], ">= 0"),
])
def test_model_source_rules(overrides, message):
    """A model is one pretrained VLM or an assembled pair; keys of the other kind are refused, not ignored."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_a_vlm_config_loads_and_leaves_the_merger_to_its_family():
    cfg = load_config(None, ["model.vlm_path=Qwen/Qwen2.5-VL-7B-Instruct", "model.region.features=encoder",
                             "model.max_pixels=200704", "data.default_fps=8"])
    assert cfg.model.train_projector == "auto" and cfg.model.vision_path == ""
