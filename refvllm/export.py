"""Export a training checkpoint (loading one, or an export, for inference: refvllm/checkpoint.py).

    refvllm export --checkpoint DIR --out OUT [--merge] [--overwrite]
    python scripts/export.py ...                                      (the same)

The export directory (docs/export.md) needs nothing but the two base checkpoints the config names:

    OUT/config.yaml                     the resolved training config (local model paths made absolute)
    OUT/adapter/                        the LLM LoRA adapter, plain PEFT layout; adapter_config.json names the base
    OUT/extra_trainables.safetensors    projector.*, region.* (and any other trained non-LoRA weight)
    OUT/tokenizer/                      the LLM's tokenizer files (chat template included)
    OUT/merged_llm/                     (--merge, assembled family) the LLM with the adapter merged: a plain
                                        transformers causal-LM directory with its tokenizer, loadable without peft
    OUT/merged_vlm/                     (--merge, a pretrained VLM) the VLM with the adapter merged into its language
                                        model and its processor files: a plain Qwen2.5-VL directory
    OUT/export.json                     what was written (also printed as the last line, one JSON object)

It is written into a temporary sibling directory and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from refvllm.checkpoint import (
    ADAPTER_DIR,
    CONFIG_FILE,
    EXPORT_MANIFEST,
    EXTRA_FILE,
    TOKENIZER_DIR,
    check_loadable,
    load_config_of,
    load_for_inference,
)
from refvllm.config import Config, dump_yaml
from refvllm.errors import ConfigError

# --------------------------------------------------------------------------------------------- export


def _absolute_if_local(path: str) -> str:
    """A local model directory as an absolute path (so the export loads from any working directory); a hub id
    stays as it is, so the export (and plain peft, via adapter_config.json) resolves it through the hub cache."""
    from refvllm.hub import is_local

    return str(Path(path).resolve()) if is_local(path) else path


def export_config(cfg: Config) -> Config:
    """The config written with an export: local model paths absolute, nothing to resume or synthesise."""
    from refvllm.families import family_of

    for key in family_of(cfg.model).paths:
        setattr(cfg.model, key, _absolute_if_local(getattr(cfg.model, key)))
    cfg.train.resume = "none"
    return cfg


def _write_adapter(checkpoint: Path, cfg: Config, out: Path) -> str | None:
    """Copy the PEFT adapter; its adapter_config.json then names the base model (the LLM, or the whole VLM of a
    pretrained family: an absolute local path or a hub id)."""
    from refvllm.families import family_of

    if not (checkpoint / ADAPTER_DIR).is_dir():
        return None
    shutil.copytree(checkpoint / ADAPTER_DIR, out / ADAPTER_DIR)
    adapter_cfg = out / ADAPTER_DIR / "adapter_config.json"
    data = json.loads(adapter_cfg.read_text())
    data["base_model_name_or_path"] = getattr(cfg.model, family_of(cfg.model).adapter_base)
    adapter_cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return str(out / ADAPTER_DIR)


def _write_merged(checkpoint: Path, cfg: Config, out: Path) -> tuple[str, str]:
    """The model with the adapter merged, written by its family (``export_merged``: a plain HF directory with
    its tokenizer and processor files) in the training dtype ``model.dtype``; the merge itself runs in float32
    (one rounding at the end). Returns (manifest key, directory)."""
    from refvllm.families import family_of
    from refvllm.model.build import DTYPES

    family = family_of(cfg.model)
    _, model, processor = load_for_inference(checkpoint, ["model.dtype=float32"])
    directory = family.hook("export_merged")(model, processor, str(out / family.merged_dir), DTYPES[cfg.model.dtype])
    return f"{family.merged_dir}_dir", directory


def _write_tokenizer(cfg: Config, out: Path) -> str:
    from refvllm.families import make_processor

    make_processor(cfg).save_pretrained(str(out / TOKENIZER_DIR))
    return str(out / TOKENIZER_DIR)


def _write_export(checkpoint: Path, out: Path, merge: bool) -> dict:
    """Write every file of the export into ``out`` (a fresh directory); returns the manifest. The trained
    weights are copied byte for byte from the checkpoint."""
    cfg = export_config(load_config_of(checkpoint))
    (out / CONFIG_FILE).write_text(dump_yaml(cfg))
    shutil.copy2(checkpoint / EXTRA_FILE, out / EXTRA_FILE)
    manifest = {"checkpoint": str(checkpoint.resolve()), "config": CONFIG_FILE,
                "adapter_dir": _write_adapter(checkpoint, cfg, out), "extra_trainables": str(out / EXTRA_FILE),
                "tokenizer_dir": _write_tokenizer(cfg, out), "merged_llm_dir": None}
    if merge:
        key, directory = _write_merged(checkpoint, cfg, out)
        manifest[key] = directory
    return manifest


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, merge: bool = False,
           overwrite: bool = False) -> dict:
    """Export ``checkpoint`` to ``out`` atomically; returns the manifest with absolute paths of ``out``."""
    checkpoint, out = Path(checkpoint), Path(out).resolve()
    check_loadable(checkpoint)
    if out.exists() and not overwrite:
        raise ConfigError(f"export directory '{out}' exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _write_export(checkpoint, tmp, merge)
        manifest = {k: (v.replace(str(tmp), str(out)) if isinstance(v, str) else v) for k, v in manifest.items()}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    else:
        os.rename(new, target)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="refvllm export", description="Export a training checkpoint: PEFT "
                                     "adapter, projector/region weights, tokenizer, config (and a merged LLM).")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-STEP directory of a training run")
    parser.add_argument("--out", required=True, help="the export directory to write")
    parser.add_argument("--merge", action="store_true", help="also write the LLM with the adapter merged")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    args = parser.parse_args(argv)
    manifest = export(args.checkpoint, args.out, args.merge, args.overwrite)
    print(json.dumps(manifest))
    return 0
