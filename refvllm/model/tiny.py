"""Tiny Hugging Face-format checkpoints made offline: a vision encoder, a causal LM and its tokenizer.

The demo and the tests load these through plain ``from_pretrained``, exactly the path a 7B checkpoint takes;
nothing is downloaded. Everything is deterministic for a seed: the same seed writes bitwise the same files.

Contract:
    paths = write_tiny_checkpoints("runs/tiny", seed=0)          # {"vision": ".../vision", "llm": ".../llm"}
    write_tiny_vision(path, seed=0, kind="siglip" | "clip" | "siglip2")
    write_tiny_llm(path, seed=0, kind="qwen2" | "llama")        # model + generation_config + tokenizer

    refvllm tiny-model OUT [--seed N] [--vision siglip|clip|siglip2] [--llm qwen2|llama]
    refvllm tiny-model OUT --family qwen2_5_vl [--seed N]      # OUT/vlm: a tiny Qwen2.5-VL (qwen2_5_vl.py)

Vision: 64 x 64 input, 8 x 8 patches (an 8 x 8 grid), width 64, 2 layers; ``preprocessor_config.json`` holds
``image_mean``/``image_std``/``size`` (read by :func:`refvllm.layout.load_visual_spec`).
LLM: width 128, 2 layers, untied embeddings, vocabulary = the tokenizer's (a byte-level BPE of ~1,500 tokens
trained on the spot on a built-in English corpus), ChatML chat template, eos ``<|im_end|>``, pad
``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from refvllm.errors import ConfigError

VISION_KINDS = ("siglip", "clip", "siglip2")
LLM_KINDS = ("qwen2", "llama")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-style ChatML; a default system message is added when the conversation has none (as Qwen2.5 does).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_IMAGE_SIZE, _PATCH_SIZE = 64, 8
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _words(text: str) -> list[str]:
    return text.split()


# Words of the synthetic data and of common questions, so the BPE learns whole-word tokens for them.
_COLOURS = _words("red green blue yellow purple orange white black pink cyan magenta brown gray grey")
_SHAPES = _words("circle square triangle star ring rectangle diamond hexagon cross ellipse disk box ball shape object")
_DIRECTIONS = _words("left right up down upward downward leftward rightward top bottom still static stationary")
_RELATIONS = _words("above below beside near far from behind in front of next to larger smaller bigger than same")
_VERBS = _words("is are was moves moving move moved goes going stays stay does do did appear appears touch")
_MISC = _words(
    "yes no the a an of what which where how who why when color colour this that it its object region video "
    "image frame frames first last start end beginning during whole clip answer question describe option "
    "options one two three four five six seven eight nine ten and or not there here both each other "
    "direction position size kind type relation between marked highlighted masked please tell me you can "
    "see look at towards away across side corner centre center middle screen background foreground system user "
    "assistant helpful"
)
_COMMON = _words(
    "about after again all also always any around as ask back be because been before being best better big "
    "but by call came change close come could day different down each early enough even every few find fine "
    "for found from get give good great group had has have he help her high him his home house if into just "
    "keep know large later least left less let life light line little long made make man many may more most "
    "much must my name need never new next night now number off often old on once only open other our out "
    "over own part people place point put quick read real right room run said say school seem set she should "
    "show since small so some something sound still such take tell than thank the their them then these they "
    "thing think those though thought through time to together too turn under until us use very want water "
    "way we well went were what while white whole will with without word work world would write year young "
    "count counting many several none visible hidden inside outside partly fully slowly quickly fast slow "
    "circle circles squares triangles stars rings colors colours shapes objects regions videos images"
)
_TEMPLATES = (
    "What is the color of {obj}?",
    "What colour is {obj}?",
    "What shape is {obj}?",
    "Which direction does {obj} move?",
    "In which direction is {obj} moving?",
    "Is {obj} above {obj2}?",
    "Is {obj} to the left of {obj2}?",
    "Is {obj} larger than {obj2}?",
    "Does {obj} move during the video?",
    "Describe {obj} in the video.",
    "What is the relation between {obj} and {obj2}?",
    "Where is {obj} in the first frame?",
)


def _corpus() -> Iterator[str]:
    """A deterministic English corpus covering the words of the synthetic data and common question forms."""
    for words in (_COLOURS, _SHAPES, _DIRECTIONS, _RELATIONS, _VERBS, _MISC, _COMMON):
        yield " ".join(words)
        yield " ".join(w.capitalize() for w in words)
        yield " ".join(f"{a} {b}." for a, b in zip(words, reversed(words), strict=True))
        yield "\n".join(words)  # words at a line start (no leading space), e.g. ChatML role names
    objs = [f"<object{i}><region>" for i in range(4)] + [f"the {c} {s}" for c in _COLOURS for s in _SHAPES[:8]]
    for i, (template, obj) in enumerate(itertools.product(_TEMPLATES, objs)):
        yield template.format(obj=obj, obj2=objs[(i * 7 + 3) % len(objs)])
    for colour, shape, direction in itertools.product(_COLOURS, _SHAPES[:8], _DIRECTIONS[:8]):
        yield f"The {colour} {shape} moves {direction}. It is {colour}. Yes. No. The answer is {shape}."
    for n in range(64):
        yield f"Answer: ({'ABCD'[n % 4]}) option {n} frame {n} of {n + 1}. <video> <image> {n}"


def train_tokenizer(vocab_size: int = 1500, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
    """A byte-level BPE tokenizer trained on :func:`_corpus`, wrapped as a transformers fast tokenizer; the
    ``special_tokens`` get the first ids, in order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2's normaliser and pre-tokeniser: transformers' Qwen2Tokenizer rebuilds exactly these when it loads a
    # qwen2 checkpoint, so text splits the same way whichever tokenizer class AutoTokenizer picks.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_corpus()), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
    )


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``path`` when the block succeeds.

    An existing ``path`` is an error (never overwritten under a reader). Several processes may make the same
    checkpoint at once (e.g. two ranks on first use); the files are deterministic, so whichever rename lands
    first wins and the others discard their copy.
    """
    if path.exists():
        raise ConfigError(f"'{path}' already exists; remove it or choose another directory for the tiny checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _vision_model(kind: str, hidden: int, layers: int):
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, patch_size=_PATCH_SIZE)
    if kind == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel(SiglipVisionConfig(image_size=_IMAGE_SIZE, vision_use_head=False, **common))
    if kind == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionModel(CLIPVisionConfig(image_size=_IMAGE_SIZE, **common))
    if kind == "siglip2":
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        grid = _IMAGE_SIZE // _PATCH_SIZE
        return Siglip2VisionModel(Siglip2VisionConfig(num_patches=grid * grid, vision_use_head=False, **common))
    raise ConfigError(f"tiny vision kind must be one of {', '.join(VISION_KINDS)}; got {kind!r}")


def write_tiny_vision(path: str | os.PathLike, seed: int = 0, kind: str = "siglip", hidden: int = 64,
                      layers: int = 2) -> str:
    """Write a tiny vision encoder (``save_pretrained`` + ``preprocessor_config.json``) to ``path``; returns it."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = _vision_model(kind, hidden, layers)
    mean, std = (_CLIP_MEAN, _CLIP_STD) if kind == "clip" else ([0.5] * 3, [0.5] * 3)
    pre = {"image_mean": mean, "image_std": std, "size": {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
           "do_normalize": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255}
    with _atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return str(path)


def _llm_model(kind: str, vocab_size: int, special: dict[str, int], hidden: int, layers: int):
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=False, bos_token_id=special["<|endoftext|>"],
                  eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"])
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common))
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common))
    raise ConfigError(f"tiny LLM kind must be one of {', '.join(LLM_KINDS)}; got {kind!r}")


# Row norm of the tiny LM's output head. With the default init (std 0.02) a row has norm ~0.23 and the final
# RMSNorm output norm ~sqrt(hidden), so the largest reachable logit gap is ~2.6 nats: with the head and final norm
# frozen (LoRA), no answer can ever get more than ~1% probability over a 1,500-token vocabulary. A pretrained
# 7B head has no such ceiling; this gives the tiny one the same headroom (max logit ~ 11 * 2.0 = 22).
OUTPUT_HEAD_ROW_NORM = 2.0


def scale_output_head(model) -> None:
    """Rescale every row of the LM head to norm OUTPUT_HEAD_ROW_NORM (directions stay random)."""
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight.mul_(OUTPUT_HEAD_ROW_NORM / weight.norm(dim=1, keepdim=True))


def write_tiny_llm(path: str | os.PathLike, seed: int = 0, kind: str = "qwen2", hidden: int = 128,
                   layers: int = 2) -> str:
    """Write a tiny causal LM with its tokenizer and generation config to ``path``; returns it."""
    from transformers import GenerationConfig

    path = Path(path)
    tokenizer = train_tokenizer()
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1_000_003)  # not the vision tower's stream
        model = _llm_model(kind, len(tokenizer), special, hidden, layers)
        scale_output_head(model)
    model.generation_config = GenerationConfig(
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=[special["<|im_end|>"], special["<|endoftext|>"]],
        pad_token_id=special["<|endoftext|>"],
        do_sample=False,
    )
    with _atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(path)


def write_tiny_checkpoints(out_dir: str | os.PathLike, seed: int = 0, vision: str = "siglip",
                           llm: str = "qwen2") -> dict[str, str]:
    """Write ``out_dir/vision`` and ``out_dir/llm`` (existing ones are replaced); returns their paths."""
    out = Path(out_dir)
    for name in ("vision", "llm"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    return {"vision": write_tiny_vision(out / "vision", seed, vision), "llm": write_tiny_llm(out / "llm", seed, llm)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="refvllm tiny-model", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output directory (gets vision/ and llm/, or vlm/ with --family qwen2_5_vl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=("assembled", "qwen2_5_vl"), default="assembled",
                        help="assembled: a vision tower + a text LLM (default); qwen2_5_vl: one pretrained-VLM "
                             "checkpoint with its processor files")
    parser.add_argument("--vision", choices=VISION_KINDS, default="siglip")
    parser.add_argument("--llm", choices=LLM_KINDS, default="qwen2")
    args = parser.parse_args(argv)
    if args.family == "qwen2_5_vl":
        print(json.dumps({"vlm": write_tiny_vlm(Path(args.out) / "vlm", args.seed)}))
        return 0
    print(json.dumps(write_tiny_checkpoints(args.out, args.seed, args.vision, args.llm)))
    return 0


TINY_VLM_MIN_PIXELS = 112 * 112


def write_tiny_vlm(path: str | os.PathLike, seed: int = 0) -> str:
    """A tiny Qwen2.5-VL at ``path`` (an existing one is replaced, as :func:`write_tiny_checkpoints` does),
    float32, its generation config greedy as the tiny LLM's; see
    :func:`refvllm.model.qwen2_5_vl.write_checkpoint`."""
    from refvllm.model.qwen2_5_vl import write_checkpoint

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    with _atomic_dir(path) as tmp:
        # 64 x 64 synthetic media at the hub's min_pixels would be 2 x 2 merged tokens a frame; at 112 x 112 they
        # are 4 x 4 (8 x 8 patches of 14 px, the tiny assembled tower's patch grid).
        write_checkpoint(tmp, "tiny", seed=seed, dtype=torch.float32, sampling=False,
                         min_pixels=TINY_VLM_MIN_PIXELS)
    return str(path)


def write_tiny_assembled(model) -> None:
    """The assembled family's ``model.tiny`` hook: the tiny vision tower and LLM at ``model.vision_path`` /
    ``model.llm_path`` where missing (not a local directory with config.json, nor in the hub cache)."""
    from refvllm.errors import ConfigError
    from refvllm.hub import cached_file, config_revision

    for which, path, write in (("vision", model.vision_path, write_tiny_vision),
                               ("llm", model.llm_path, write_tiny_llm)):
        if not path:
            raise ConfigError(f"config key 'model.{which}_path' is empty; with model.tiny it names where the tiny "
                              "checkpoint goes")
        if cached_file(path, "config.json", config_revision(model, which)) is None:
            write(path)


def write_tiny_vlm_at(model) -> None:
    """The Qwen2.5-VL family's ``model.tiny`` hook: the tiny VLM at ``model.vlm_path`` when missing."""
    from refvllm.hub import cached_file

    if cached_file(model.vlm_path, "config.json", model.vlm_revision or None) is None:
        write_tiny_vlm(model.vlm_path)
