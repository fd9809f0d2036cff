"""The vision tower (any supported HF vision encoder) and the projector that makes the video/image tokens.

Contract:
    tower = VisionTower.from_pretrained(path, feature_layer=-1, attn_implementation="sdpa", dtype=torch.float32)
    feats = tower(pixel_values)                 # [N_F, 3, S, S] -> [N_F, grid * grid, D_v] (no CLS token)
    proj = Projector(D_v, D_llm, hidden, layout)
    tokens = proj(feats, frames_per_sample)     # -> [sum_i layout.num_visual_tokens(F_i), D_llm]

Visual tokens are ordered sample-major, then temporal group of frames, then row-major over the pooled grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refvllm.errors import ConfigError
from refvllm.hub import check_model, first_line
from refvllm.layout import TokenLayout

# config model_type -> (transformers class name, number of prefix tokens (CLS) before the patch tokens)
_VISION_CLASSES = {
    "siglip": ("SiglipVisionModel", 0),
    "siglip_vision_model": ("SiglipVisionModel", 0),
    "siglip2": ("Siglip2VisionModel", 0),
    "siglip2_vision_model": ("Siglip2VisionModel", 0),
    "clip": ("CLIPVisionModel", 1),
    "clip_vision_model": ("CLIPVisionModel", 1),
}


class VisionTower(nn.Module):
    """A HF vision encoder cut at ``feature_layer``; returns patch features without CLS token.

    ``feature_layer`` indexes the encoder's ``hidden_states`` (0 = embeddings, -1 = last layer, -2 = the one
    before, ...), the LLaVA convention. The layers after it, the final layer norm and the pooling head are
    removed at construction: they cost compute and would hold parameters that never get a gradient (which
    hangs DDP/ZeRO-3 when the tower trains). So ``forward`` returns exactly ``hidden_states[feature_layer]``.
    """

    def __init__(self, model: nn.Module, feature_layer: int = -1):
        super().__init__()
        model_type = model.config.model_type
        if model_type not in _VISION_CLASSES:
            raise ConfigError(_unsupported(model_type))
        self.model = model
        self.naflex = model_type.startswith("siglip2")
        self.num_prefix_tokens = _VISION_CLASSES[model_type][1]
        self.patch_size = int(model.config.patch_size)
        self.grid = _native_grid(model.config)
        self._truncate(feature_layer)

    @classmethod
    def from_pretrained(cls, path: str, feature_layer: int = -1, attn_implementation: str = "sdpa",
                        dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                        revision: str | None = None) -> VisionTower:
        """Load the vision encoder at ``path`` (local directory or hub id, at ``revision``; resolved by
        transformers: hub cache, ``HF_HUB_OFFLINE``); a full SigLIP/CLIP checkpoint loads only its vision tower.
        The class is chosen by the config's ``model_type``. ConfigError (naming model.vision_path) when it
        cannot load."""
        import transformers

        check_model(path, "model.vision_path", revision)
        try:
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                             revision=revision)
            if config.model_type not in _VISION_CLASSES:
                raise ConfigError(f"model.vision_path '{path}': {_unsupported(config.model_type)}")
            model_cls = getattr(transformers, _VISION_CLASSES[config.model_type][0])
            model = model_cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                              trust_remote_code=trust_remote_code, revision=revision)
        except OSError as e:  # e.g. a cached config.json whose weights were never downloaded, offline
            message = f"model.vision_path: cannot load a vision encoder from '{path}': {first_line(e)}"
            raise ConfigError(message) from None
        return cls(model, feature_layer)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _truncate(self, feature_layer: int) -> None:
        layers = self.model.encoder.layers
        keep = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
        if not 0 <= keep <= len(layers):
            raise ConfigError(f"model.vision_feature_layer {feature_layer} is out of range for a vision tower with "
                              f"{len(layers)} layers (use -{len(layers) + 1}..{len(layers)})")
        self.model.encoder.layers = nn.ModuleList(list(layers)[:keep])
        self.model.config.num_hidden_layers = keep
        self.model.post_layernorm = nn.Identity()
        if getattr(self.model, "use_head", False):
            self.model.use_head = False
            del self.model.head
            self.model.config.vision_use_head = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N_F, 3, S, S] normalised frames -> [N_F, grid * grid, D_v] patch features (row-major grid)."""
        if self.naflex:
            out = self.model(**_naflex_inputs(pixel_values, self.patch_size)).last_hidden_state
        else:
            out = self.model(pixel_values=pixel_values).last_hidden_state
        return out[:, self.num_prefix_tokens:]


def _unsupported(model_type: str) -> str:
    kinds = ", ".join(sorted(_VISION_CLASSES))
    return f"vision model_type '{model_type}' is not supported (supported: {kinds})"


def _native_grid(config) -> int:
    if getattr(config, "image_size", None):
        return int(config.image_size) // int(config.patch_size)
    return math.isqrt(int(config.num_patches))  # SigLIP2 NaFlex: the grid of its position embeddings


def _naflex_inputs(pixel_values: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """SigLIP2 NaFlex takes patchified pixels: [N, 3, S, S] -> [N, g*g, p*p*3] in (row, col, py, px, channel)
    order (as its image processor makes them), with every patch valid and the (g, g) grid per image."""
    n, c, s, _ = pixel_values.shape
    g = s // patch
    patches = pixel_values[:, :, : g * patch, : g * patch].reshape(n, c, g, patch, g, patch)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, patch * patch * c)
    mask = torch.ones(n, g * g, dtype=torch.long, device=pixel_values.device)
    shapes = torch.tensor([[g, g]], dtype=torch.long, device=pixel_values.device).expand(n, 2)
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The 2-layer GELU MLP used by the projector and the region encoder."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class Projector(nn.Module):
    """Spatial k x k pooling of the patch grid, temporal pooling of t consecutive frames, then a 2-layer MLP."""

    def __init__(self, vision_dim: int, llm_dim: int, hidden: int, layout: TokenLayout):
        super().__init__()
        self.layout = layout
        self.mlp = mlp(vision_dim, hidden, llm_dim)

    def pool(self, features: torch.Tensor, frames_per_sample: torch.Tensor) -> torch.Tensor:
        """[N_F, grid*grid, D_v] -> [sum_i ceil(F_i / t) * pooled_grid**2, D_v], before the MLP."""
        n, p, d = features.shape
        g, k = self.layout.grid, self.layout.spatial_pool
        if p != g * g:
            raise ConfigError(f"vision tower gives {p} patches per frame; the token layout expects {g}x{g}")
        x = features.transpose(1, 2).reshape(n, d, g, g)
        # ceil_mode: the edge windows average only the patches they cover (27 -> 14 for k=2), = pooled_grid.
        x = F.avg_pool2d(x, k, stride=k, ceil_mode=True).flatten(2).transpose(1, 2)  # [N_F, P', D_v]
        return _temporal_pool(x, frames_per_sample, self.layout.temporal_pool).flatten(0, 1)

    def forward(self, features: torch.Tensor, frames_per_sample: torch.Tensor) -> torch.Tensor:
        """[N_F, grid*grid, D_v] -> [sum_i layout.num_visual_tokens(F_i), D_llm]."""
        return self.mlp(self.pool(features, frames_per_sample))


def _temporal_pool(x: torch.Tensor, frames_per_sample: torch.Tensor, t: int) -> torch.Tensor:
    """Average every ``t`` consecutive frames within each sample (the last group may be shorter).

    x: [N_F, P', D] frames sample-major; frames_per_sample: [B]. Returns [sum_i ceil(F_i / t), P', D].
    """
    if t == 1:
        return x
    fps = frames_per_sample.to(device=x.device, dtype=torch.long)
    groups = (fps + t - 1) // t
    sample = torch.repeat_interleave(torch.arange(len(fps), device=x.device), fps)
    first_frame = torch.cumsum(fps, 0) - fps
    first_group = torch.cumsum(groups, 0) - groups
    pos = torch.arange(x.shape[0], device=x.device) - first_frame[sample]
    group = first_group[sample] + pos // t
    n_groups = int(groups.sum())
    sums = x.new_zeros(n_groups, *x.shape[1:]).index_add_(0, group, x)
    counts = torch.bincount(group, minlength=n_groups).to(x.dtype)
    return sums / counts[:, None, None]
