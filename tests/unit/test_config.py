import pytest

from refvllm.config import dump_yaml, from_dict, load_config, to_dict
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
