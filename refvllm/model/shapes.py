"""The exact configs of the checkpoints refvllm's recipes name, at a depth of your choosing, with random weights.

Real shapes matter where the tiny test models hide a cost or a code path: a 151,936-token vocabulary, a 27 x 27
patch grid that leaves a 6-pixel border, a CLS token, grouped-query attention, a tied or untied head, a
generation config that samples. Tests, benchmarks and ``refvllm smoke`` build these on the spot (nothing is
downloaded). Only the depth is reduced: every width, head count, vocabulary, image and patch size is the
published checkpoint's.

Contract:
    write_vision(path, "siglip-so400m", layers=1)         # dual-tower SiglipModel dir, as on the hub
    write_vision(path, "siglip-so400m", full=False)       # SiglipVisionModel only
    write_vision(path, "clip-l-336")                      # dual-tower CLIPModel (CLS token: 577 = 24 * 24 + 1)
    write_vision(path, "siglip2-so400m-naflex")           # Siglip2VisionModel (NaFlex, 16 x 16 grid of 16 px)
    write_llm(path, "qwen2.5-0.5b", layers=1)             # model + tokenizer + Qwen's generation_config.json
    vision_shape_for("google/siglip-so400m-patch14-384")  # -> "siglip-so400m" (None when unknown)
    llm_shape_for("Qwen/Qwen2.5-7B-Instruct")             # -> "qwen2.5-7b"

    write_siglip_so400m(path, layers=1)    # as before: SiglipVisionModel, float32 (benchmarks/loss_memory.py)
    write_qwen2_5_0_5b(path, layers=2)     # as before (same weights, float32), now with tokenizer + generation config

Weights are written in ``dtype`` (default bfloat16, as the hub checkpoints are); ``from_pretrained(dtype=...)``
casts them to the run's ``model.dtype``. The same (name, layers, seed, dtype) writes the same tensors.

The tokenizer (:func:`qwen2_5_tokenizer`) is not Qwen's (that would need a download) but has its layout: 151,643
regular tokens (ids 0..151,642), then Qwen2.5's 22 added tokens at their real ids (``<|endoftext|>`` 151643,
``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ...), so ``len(tokenizer)`` is 151,665 and the embedding's
last 271 rows (and 128 more for 7B's 152,064) are ids no text maps to, as in the real model. The regular
tokens are the tiny byte-level BPE of :func:`refvllm.model.tiny.train_tokenizer` (Qwen2's pre-tokenizer, ~1,500
tokens with their merges) at the lowest ids, padded with filler tokens ``<unusedN>`` that no merge produces.
The chat template is :data:`refvllm.model.tiny.CHAT_TEMPLATE` (ChatML; a default system prompt when the
conversation has none, as Qwen2.5's does).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refvllm.errors import ConfigError

# ------------------------------------------------------------------------------------------------ vision

# google/siglip-so400m-patch14-384. The fixed-resolution SigLIP2 checkpoint google/siglip2-so400m-patch14-384 is
# a plain SiglipModel with these same shapes (model_type "siglip"), so this shape covers it too.
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "image_size": 384,
                 "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
SIGLIP_SO400M_TEXT = {"vocab_size": 32000, "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                      "max_position_embeddings": 64, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
                      # SigLIP's sentencepiece tokenizer: eos = pad = 1, no bos (transformers' defaults are CLIP's
                      # ids, outside this vocabulary)
                      "pad_token_id": 1, "eos_token_id": 1, "bos_token_id": None}
# openai/clip-vit-large-patch14-336
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "image_size": 336,
              "patch_size": 14, "projection_dim": 768, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
CLIP_L_336_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                   "max_position_embeddings": 77, "projection_dim": 768, "layer_norm_eps": 1e-5,
                   "hidden_act": "quick_gelu"}
# google/siglip2-so400m-patch16-naflex (vision tower; NaFlex: no fixed image size, 256 position embeddings)
SIGLIP2_SO400M_NAFLEX = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                         "patch_size": 16, "num_patches": 256, "layer_norm_eps": 1e-6,
                         "hidden_act": "gelu_pytorch_tanh"}

_HALF = [0.5, 0.5, 0.5]
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class VisionShape:
    """A published vision checkpoint: its hub id, tower family, configs and ``preprocessor_config.json``."""

    hub_id: str
    family: str  # siglip | clip | siglip2
    vision: dict
    text: dict | None  # the text tower of the dual-tower checkpoint; None: the hub has no dual-tower form here
    layers: int  # the published depth (for reference; writers take their own)
    preprocessor: dict = field(default_factory=dict)


VISION_SHAPES: dict[str, VisionShape] = {
    "siglip-so400m": VisionShape(
        "google/siglip-so400m-patch14-384", "siglip", SIGLIP_SO400M, SIGLIP_SO400M_TEXT, 27,
        {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 384, "width": 384},
         "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "image_mean": _HALF, "image_std": _HALF}),
    "clip-l-336": VisionShape(
        "openai/clip-vit-large-patch14-336", "clip", CLIP_L_336, CLIP_L_336_TEXT, 24,
        {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 336},
         "resample": 3, "do_center_crop": True, "crop_size": {"height": 336, "width": 336}, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
         "do_convert_rgb": True}),
    # The hub checkpoint is a dual-tower Siglip2Model, but its text tower has a 256,000-token vocabulary (1.2 GB
    # in float32 even at one layer, all of it discarded by the loader), so only the vision tower is written.
    "siglip2-so400m-naflex": VisionShape(
        "google/siglip2-so400m-patch16-naflex", "siglip2", SIGLIP2_SO400M_NAFLEX, None, 27,
        {"image_processor_type": "Siglip2ImageProcessorFast", "do_resize": True, "max_num_patches": 256,
         "patch_size": 16, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "image_mean": _HALF, "image_std": _HALF}),
}


def vision_config(name: str, layers: int = 1, full: bool | None = None, text_layers: int = 1):
    """The transformers config of shape ``name`` (see :data:`VISION_SHAPES`) at ``layers`` layers.

    ``full`` (default: when the shape has a text tower) gives the dual-tower ``SiglipConfig``/``CLIPConfig`` with a
    ``text_layers``-deep text tower, the layout of the hub checkpoint; else the vision config alone."""
    import transformers

    shape = _vision_shape(name)
    full = shape.text is not None if full is None else full
    if full and shape.text is None:
        raise ConfigError(f"vision shape '{name}' is written as its vision tower only (no dual-tower form)")
    vision = {**shape.vision, "num_hidden_layers": layers}
    if not full:
        return getattr(transformers, f"{_PREFIX[shape.family]}VisionConfig")(**vision)
    text = {**shape.text, "num_hidden_layers": text_layers}
    extra = {"projection_dim": shape.vision["projection_dim"]} if shape.family == "clip" else {}
    return getattr(transformers, f"{_PREFIX[shape.family]}Config")(vision_config=vision, text_config=text, **extra)


def vision_model(name: str, layers: int = 1, full: bool | None = None, text_layers: int = 1):
    """A randomly initialised model of :func:`vision_config` (``SiglipModel``, ``CLIPVisionModel``, ...)."""
    import transformers

    config = vision_config(name, layers, full, text_layers)
    kind = "Model" if hasattr(config, "vision_config") else "VisionModel"
    return getattr(transformers, f"{_PREFIX[VISION_SHAPES[name].family]}{kind}")(config)


_PREFIX = {"siglip": "Siglip", "clip": "CLIP", "siglip2": "Siglip2"}  # transformers' class name prefixes


def write_vision(path: str | os.PathLike, name: str, layers: int = 1, full: bool | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, text_layers: int = 1) -> str:
    """Write a vision checkpoint of shape ``name`` (``save_pretrained`` + ``preprocessor_config.json``) to
    ``path``; returns it. ``full`` as in :func:`vision_model`."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = vision_model(name, layers, full, text_layers)
    model.to(dtype).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(VISION_SHAPES[name].preprocessor, indent=2) + "\n")
    return str(path)


def _vision_shape(name: str) -> VisionShape:
    if name not in VISION_SHAPES:
        raise ConfigError(f"unknown vision shape '{name}' (known: {', '.join(VISION_SHAPES)})")
    return VISION_SHAPES[name]


# --------------------------------------------------------------------------------------------------- LLM

_QWEN2_5_COMMON = {"max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
                   "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
                   "use_sliding_window": False, "sliding_window": 32768, "attention_dropout": 0.0}
QWEN2_5_0_5B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                "num_key_value_heads": 2, "tie_word_embeddings": True, **_QWEN2_5_COMMON}


@dataclass(frozen=True)
class LLMShape:
    """A Qwen2.5 config. ``real`` is False for a variant no published checkpoint has (said in ``note``)."""

    hub_id: str
    config: dict
    layers: int  # the published depth
    real: bool = True
    note: str = ""


LLM_SHAPES: dict[str, LLMShape] = {
    "qwen2.5-0.5b": LLMShape("Qwen/Qwen2.5-0.5B-Instruct", QWEN2_5_0_5B, 24),
    "qwen2.5-1.5b": LLMShape("Qwen/Qwen2.5-1.5B-Instruct", {
        **QWEN2_5_0_5B, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12}, 28),
    "qwen2.5-3b": LLMShape("Qwen/Qwen2.5-3B-Instruct", {
        **QWEN2_5_0_5B, "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16}, 36),
    # configs/sft.yaml's LLM. Untied, 152,064 rows: at one layer 1.3B parameters (5.3 GB in float32), so the
    # tests use the untied variant below; refvllm smoke builds this one for sft.yaml.
    "qwen2.5-7b": LLMShape("Qwen/Qwen2.5-7B-Instruct", {
        **QWEN2_5_0_5B, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}, 28),
    "qwen2.5-0.5b-untied": LLMShape("", {**QWEN2_5_0_5B, "tie_word_embeddings": False}, 24, real=False,
                                    note="Qwen2.5-0.5B's widths with an untied head: every untied Qwen2.5 "
                                         "(7B and up) is too large for a CPU test even at one layer"),
}

# Qwen2.5's added tokens from id 151643 on, in order, with their ``special`` flag.
QWEN2_5_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
QWEN2_5_REGULAR_TOKENS = 151643  # ids 0..151642; the added tokens follow
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
# Qwen2.5-7B-Instruct's generation_config.json (the recipe's LLM): it samples by default.
QWEN2_5_GENERATION = {"bos_token_id": ENDOFTEXT_ID, "pad_token_id": ENDOFTEXT_ID, "do_sample": True,
                      "eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "repetition_penalty": 1.05, "temperature": 0.7,
                      "top_p": 0.8, "top_k": 20}


def llm_config(name: str, layers: int = 1):
    """The ``Qwen2Config`` of shape ``name`` (see :data:`LLM_SHAPES`) at ``layers`` layers."""
    from transformers import Qwen2Config

    if name not in LLM_SHAPES:
        raise ConfigError(f"unknown LLM shape '{name}' (known: {', '.join(LLM_SHAPES)})")
    return Qwen2Config(**LLM_SHAPES[name].config, num_hidden_layers=layers)


def llm_model(name: str, layers: int = 1):
    """A randomly initialised ``Qwen2ForCausalLM`` of :func:`llm_config`."""
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM(llm_config(name, layers))


def generation_config():
    """Qwen's sampling ``GenerationConfig`` (:data:`QWEN2_5_GENERATION`)."""
    from transformers import GenerationConfig

    return GenerationConfig(**QWEN2_5_GENERATION)


def write_llm(path: str | os.PathLike, name: str, layers: int = 1, seed: int = 0,
              dtype: torch.dtype = torch.bfloat16) -> str:
    """Write a causal LM of shape ``name`` with :func:`qwen2_5_tokenizer` and Qwen's sampling
    ``generation_config.json`` to ``path``; returns it."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # not the vision tower's stream
        model = llm_model(name, layers)
    model.generation_config = generation_config()
    model.to(dtype).save_pretrained(path)
    write_tokenizer(path)
    return str(path)


def write_tokenizer(path: str | os.PathLike) -> str:
    """Write :func:`qwen2_5_tokenizer` to ``path`` (tokenizer.json, tokenizer_config.json naming
    ``Qwen2Tokenizer`` as Qwen's does, the chat template); returns it."""
    path = Path(path)
    qwen2_5_tokenizer().save_pretrained(path)
    _set_tokenizer_class(path / "tokenizer_config.json", "Qwen2Tokenizer")
    return str(path)


def _set_tokenizer_class(config_file: Path, name: str) -> None:
    """Name the class Qwen's own tokenizer_config.json names (transformers reads the same files either way)."""
    data = json.loads(config_file.read_text())
    data["tokenizer_class"] = name
    config_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@functools.lru_cache(maxsize=1)
def _qwen2_5_tokenizer_json() -> str:
    """tokenizer.json text of :func:`qwen2_5_tokenizer` (cached: the BPE training takes ~2 s)."""
    from refvllm.model.tiny import train_tokenizer

    data = json.loads(train_tokenizer().backend_tokenizer.to_str())
    added = {t["content"] for t in data["added_tokens"]}
    trained = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in added]
    vocab = {token: i for i, token in enumerate(trained)}
    # Fillers: in the vocabulary (so ids stay contiguous, as in Qwen's) but produced by no merge.
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), QWEN2_5_REGULAR_TOKENS)})
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [
        {"id": QWEN2_5_REGULAR_TOKENS + k, "content": content, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": special}
        for k, (content, special) in enumerate(QWEN2_5_ADDED_TOKENS)
    ]
    return json.dumps(data, ensure_ascii=False)


def qwen2_5_tokenizer():
    """A fast tokenizer with Qwen2.5's id layout, special tokens and chat-template behaviour (module docstring);
    eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, as Qwen2.5-Instruct's."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from refvllm.model.tiny import CHAT_TEMPLATE

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_qwen2_5_tokenizer_json()), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE, model_max_length=131072, padding_side="right",
        clean_up_tokenization_spaces=False)
    ids = [tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN2_5_ADDED_TOKENS]
    if ids != list(range(QWEN2_5_REGULAR_TOKENS, QWEN2_5_REGULAR_TOKENS + len(ids))):  # a tokenizers change
        raise AssertionError(f"the added tokens did not land at Qwen2.5's ids: {ids}")
    return tokenizer


# ------------------------------------------------------------------------------------ names -> shapes

_VISION_PATTERNS = (("siglip2-so400m-naflex", r"siglip2.*so400m.*naflex"), ("siglip-so400m", r"siglip2?-so400m"),
                    ("clip-l-336", r"clip-vit-large-patch14-336"))
_LLM_PATTERN = re.compile(r"qwen2\.5-(0\.5|1\.5|3|7)b", re.IGNORECASE)


def vision_shape_for(path: str) -> str | None:
    """The shape of a vision checkpoint named ``path`` (a hub id or a folder named like one, or a shape name);
    None when no known shape matches."""
    if path in VISION_SHAPES:
        return path
    for name, pattern in _VISION_PATTERNS:
        if re.search(pattern, path, re.IGNORECASE):
            return name
    return None


def llm_shape_for(path: str) -> str | None:
    """The shape of an LLM named ``path`` (e.g. ``Qwen/Qwen2.5-7B-Instruct``, or a shape name); None if unknown."""
    if path in LLM_SHAPES:
        return path
    match = _LLM_PATTERN.search(path)
    return f"qwen2.5-{match.group(1).lower()}b" if match else None


# ------------------------------------------------------------------------------- earlier entry points


def write_siglip_so400m(path: str | os.PathLike, layers: int = 1, seed: int = 0) -> str:
    """A SigLIP-so400m/14 @ 384 vision tower (``SiglipVisionModel``, float32, ``layers`` deep) with its
    preprocessor file."""
    return write_vision(path, "siglip-so400m", layers, full=False, seed=seed, dtype=torch.float32)


def write_qwen2_5_0_5b(path: str | os.PathLike, layers: int = 2, seed: int = 0) -> str:
    """A Qwen2.5-0.5B-shaped causal LM (float32, ``layers`` deep) with tokenizer and generation config."""
    return write_llm(path, "qwen2.5-0.5b", layers, seed=seed, dtype=torch.float32)
