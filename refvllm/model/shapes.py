"""The exact configs of the checkpoints refvllm's recipes name, at a depth of your choosing, with random weights.

Real shapes matter where the tiny test models hide a cost or a code path: a 151,936-token vocabulary, a 27 x 27
patch grid that leaves a 6-pixel border, grouped-query attention. Benchmarks and tests build these on the spot
(nothing is downloaded).

    write_siglip_so400m(path, layers=1)    # google/siglip-so400m-patch14-384's vision config + preprocessor file
    write_qwen2_5_0_5b(path, layers=2)     # Qwen/Qwen2.5-0.5B-Instruct's config (tied head, 14 q / 2 kv heads)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "image_size": 384,
                 "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
QWEN2_5_0_5B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1_000_000.0,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643,
                "eos_token_id": 151645}


def write_siglip_so400m(path: str | os.PathLike, layers: int = 1, seed: int = 0) -> str:
    """A SigLIP-so400m/14 @ 384 vision tower (random weights, ``layers`` deep) with its preprocessor file."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M, num_hidden_layers=layers))
    model.save_pretrained(path)
    pre = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 384, "width": 384},
           "do_normalize": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return str(path)


def write_qwen2_5_0_5b(path: str | os.PathLike, layers: int = 2, seed: int = 0) -> str:
    """A Qwen2.5-0.5B-shaped causal LM (random weights, ``layers`` deep; no tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_0_5B, num_hidden_layers=layers))
    model.save_pretrained(path)
    return str(path)
