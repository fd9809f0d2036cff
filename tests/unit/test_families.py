"""The family registry: chosen by the checkpoint's model_type, every hook importable, clear errors."""

import json

import pytest

from refvllm.config import load_config
from refvllm.errors import ConfigError
from refvllm.families import ASSEMBLED, FAMILIES, QWEN2_5_VL, family_of


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_hook_of_every_family_imports(family):
    for hook in ("processor", "build", "write_tiny", "export_merged"):
        assert callable(family.hook(hook)), hook
    model = load_config(None).model
    assert all(hasattr(model, key) for key in (*family.paths, family.adapter_base))


def _checkpoint(tmp_path, model_type):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({} if model_type is None else {"model_type": model_type}))
    return str(path)


def test_the_family_is_the_checkpoints_model_type_not_its_name(tmp_path):
    """A directory named like anything is a Qwen2.5-VL when its config.json says so."""
    path = _checkpoint(tmp_path, "qwen2_5_vl")
    assert family_of(load_config(None, [f"model.vlm_path={path}"]).model) is QWEN2_5_VL
    assert family_of(load_config(None).model) is ASSEMBLED


def test_an_unknown_model_type_names_the_key_and_the_supported_ones(tmp_path):
    path = _checkpoint(tmp_path, "llava_onevision")
    with pytest.raises(ConfigError, match=r"model.vlm_path: .* is a 'llava_onevision' model; .* qwen2_5_vl"):
        family_of(load_config(None, [f"model.vlm_path={path}"]).model)


def test_a_config_without_model_type_is_a_clear_error(tmp_path):
    path = _checkpoint(tmp_path, None)
    with pytest.raises(ConfigError, match="has no model_type"):
        family_of(load_config(None, [f"model.vlm_path={path}"]).model)


def test_a_hub_id_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="model.vlm_path"):
        family_of(load_config(None, ["model.vlm_path=nobody/no-such-vlm"]).model)
