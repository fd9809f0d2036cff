"""How many placeholder positions each visual input occupies, and how frames are preprocessed.

The processor (which expands placeholders before the model runs) and the model (which fills them) both derive
their counts from one :class:`TokenLayout`, so the two can never disagree by construction; the model still
checks the count at run time and raises a clear error if they do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from refvllm.config import ModelConfig
from refvllm.errors import ConfigError
from refvllm.hub import config_revision, resolve_file


@dataclass(frozen=True)
class VisualSpec:
    """Frame preprocessing of the vision tower: square ``image_size`` input, ``patch_size`` patches, normalisation."""

    image_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def grid(self) -> int:
        """Patches per side of the vision tower's output grid (e.g. 384 / 14 -> 27)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TokenLayout:
    """Placeholder counts. ``tokens_per_frame`` = ceil(grid / spatial_pool) ** 2."""

    grid: int
    spatial_pool: int
    temporal_pool: int
    region_max_tokens: int
    region_merge: str

    @property
    def pooled_grid(self) -> int:
        return math.ceil(self.grid / self.spatial_pool)

    @property
    def tokens_per_frame(self) -> int:
        return self.pooled_grid**2

    def num_visual_tokens(self, num_frames: int) -> int:
        """Video/image tokens for a clip of ``num_frames`` frames (an image is a 1-frame clip)."""
        return math.ceil(num_frames / self.temporal_pool) * self.tokens_per_frame

    def num_region_tokens(self, num_mask_frames: int) -> int:
        """Region tokens for an object whose masks cover ``num_mask_frames`` planned frames (>= 1)."""
        if self.region_merge == "none":
            return num_mask_frames
        return min(self.region_max_tokens, num_mask_frames)


def _vision_config_dict(vision_path: str, revision: str | None = None) -> dict:
    """The vision tower's config (``config.json`` of a local directory or hub id, see :mod:`refvllm.hub`)."""
    data = json.loads(Path(resolve_file(vision_path, "config.json", "model.vision_path", revision)).read_text())
    # A full SigLIP/CLIP checkpoint nests the vision tower's config.
    return data.get("vision_config", data)


def load_visual_spec(model: ModelConfig) -> VisualSpec:
    """Read image size, patch size and normalisation of ``model.vision_path`` (a local directory or a hub id,
    resolved like transformers does: hub cache, ``HF_HUB_OFFLINE``, revision).

    Normalisation comes from ``model.image_mean/std`` when set, else from the checkpoint's
    ``preprocessor_config.json``; a checkpoint without one and no config values is an error, not a guess.
    """
    path, revision = model.vision_path, config_revision(model, "vision")
    vcfg = _vision_config_dict(path, revision)
    if "image_size" not in vcfg and "num_patches" in vcfg:
        # SigLIP2 NaFlex has no fixed size: feed it the square grid its position embeddings were trained on.
        vcfg = {**vcfg, "image_size": math.isqrt(int(vcfg["num_patches"])) * int(vcfg.get("patch_size", 0))}
    try:
        image_size, patch_size = int(vcfg["image_size"]), int(vcfg["patch_size"])
    except KeyError as e:
        raise ConfigError(f"model.vision_path: config.json of '{path}' has no {e}") from None
    if model.image_mean is not None:
        mean, std = model.image_mean, model.image_std
    else:
        mean, std = _normalisation(path, revision)
    return VisualSpec(image_size, patch_size, tuple(mean), tuple(std))


def _normalisation(vision_path: str, revision: str | None) -> tuple[list[float], list[float]]:
    """``image_mean``/``image_std`` of the checkpoint's ``preprocessor_config.json``."""
    pre = resolve_file(vision_path, "preprocessor_config.json", "model.vision_path", revision, required=False)
    if pre is None:
        raise ConfigError(f"model.vision_path: '{vision_path}' has no preprocessor_config.json; set "
                          "model.image_mean and model.image_std in the config")
    data = json.loads(Path(pre).read_text())
    try:
        return data["image_mean"], data["image_std"]
    except KeyError as e:
        raise ConfigError(f"model.vision_path: preprocessor_config.json of '{vision_path}' has no {e}; set "
                          "model.image_mean and model.image_std in the config") from None


def make_token_layout(model: ModelConfig, spec: VisualSpec) -> TokenLayout:
    """The layout for the model config ``model`` (``cfg.model``) and vision tower."""
    return TokenLayout(
        grid=spec.grid,
        spatial_pool=model.projector.spatial_pool,
        temporal_pool=model.projector.temporal_pool,
        region_max_tokens=model.region.max_tokens,
        region_merge=model.region.merge,
    )


def region_layout(model: ModelConfig) -> TokenLayout:
    """The region-token rule alone (``model.region.max_tokens``/``merge``), for a family whose visual token
    counts come from the checkpoint's own processor (a pretrained VLM's grids), not from a fixed layout."""
    return TokenLayout(grid=1, spatial_pool=1, temporal_pool=1, region_max_tokens=model.region.max_tokens,
                       region_merge=model.region.merge)
