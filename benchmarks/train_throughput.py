"""Training throughput: the peer stack (plain transformers + peft, padded) against refvllm's own training step,
on the same samples and global batch (docs/performance.md, "Training throughput").

    python benchmarks/train_throughput.py --preset cpu    [--out runs/bench/throughput]   # ~5 min on 2 cores
    python benchmarks/train_throughput.py --preset h200                                     # one GPU, < 8 min

Models are built on the spot from real configs at reduced depth (random weights, no download):
    cpu   SigLIP-so400m/14@384 at 1 layer + Qwen2.5-0.5B at 2 layers (its 151,936-token vocabulary), float32,
          8 sequences of 256-1,024 tokens (the real 1k-4k spread at a quarter), micro-batches of 4
    h200  SigLIP-so400m 27 layers + Qwen2.5-7B 28 layers, bf16, 16 sequences of 1k-4k tokens, micro-batches of 4

Cases, each in a fresh process (its own peak memory), each timing the same global batch (one optimizer step):
    peer     AutoModelForCausalLM + peft LoRA (r=64, alpha=128, every linear layer of the LLM), gradient
             checkpointing, sdpa, padded micro-batches of 4, the model's own loss (logits at every position)
    padded   refvllm's step (refvllm.train.loop.train_step, configs/sft.yaml with the same LoRA), text-only
             samples of the same tokens, padded micro-batches (train.packing=false), logits at label positions
    refvllm  the same, packed (the default)
    budget   the same, packed, micro-batches cut by the token budget (train.max_tokens = 2 x the longest
             sequence, at most all sequences each; refvllm.data.dataset.budget_cuts, the sampler's own rule)
    vlm      the same step on referring samples: 16 frames (4 on cpu) through the frozen vision tower, the
             projector and the region encoder (2 objects), the rest text; each as long as the text sample or,
             where the visual tokens do not fit in that, visual + region tokens + 64 text tokens

Effective tokens/s = non-padding tokens of the global batch / step time: on the h200 preset the median of 3
timed steps after a warm-up step; on the cpu preset the faster of its 2 steps (no warm-up, to stay near 5
minutes; the faster of two because this machine's noise only ever slows a step, and a single timed step once
took twice its rerun's time).
MFU = model FLOPs / (time x peak), with the model FLOPs of a
frozen-base LoRA step (no weight gradients for the base; LoRA's own FLOPs and recomputation not counted):
    4 x P_body x T  +  6 x layers x d_model x sum_i n_i^2  +  6 x V x d_model x T_label
i.e. forward 2PT and input-gradient 2PT for the body's linear layers (P_body: LLM parameters without the
embedding and the head), causal attention 2 n^2 d per layer forward and twice that backward, and the head only
where the loss needs it (the vision tower's FLOPs are not counted: the vlm row's MFU is the LLM's).
Peak: 989 TFLOP/s bf16 dense on H200; on CPU a float32 matmul measured in the same run.
``packed_matches_unpacked``: refvllm's loss on the micro-batch with the most padding, packed and padded, within
1e-4 relative (float32) or 2e-2 (bf16). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ("peer", "padded", "refvllm", "budget", "vlm")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Preset:
    vision_layers: int
    llm_shape: str
    llm_layers: int
    num_sequences: int
    min_len: int
    max_len: int
    micro_batch: int
    frames: int
    dtype: str  # float32 | bfloat16
    steps: int  # timed steps
    warmup: int  # untimed steps before them


PRESETS = {
    "cpu": Preset(1, "qwen2.5-0.5b", 2, 8, 256, 1024, 4, 4, "float32", 2, 0),
    "h200": Preset(27, "qwen2.5-7b", 28, 16, 1024, 4096, 4, 16, "bfloat16", 3, 1),
}
H200_PEAK_BF16 = 989e12


# ------------------------------------------------------------------------------------------------ samples


def lengths(p: Preset) -> list[int]:
    """Sequence lengths evenly spread over [min_len, max_len], in a shuffled (seeded) order."""
    g = torch.Generator().manual_seed(0)
    spread = torch.linspace(p.min_len, p.max_len, p.num_sequences).round().long()
    return spread[torch.randperm(p.num_sequences, generator=g)].tolist()


def label_count(n: int) -> int:
    """The answer: the last 15% of the tokens (at least 16)."""
    return max(16, int(0.15 * n))


def text_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 150_000, (n,), generator=g).tolist()


def text_items(p: Preset) -> list[dict]:
    """Text-only processed samples (Processor.encode's layout) of the preset's lengths."""
    from refvllm.constants import IGNORE_INDEX

    items = []
    for i, n in enumerate(lengths(p)):
        ids = text_ids(n, i)
        k = label_count(n)
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor([IGNORE_INDEX] * (n - k) + ids[-k:]),
                      "pixel_values": torch.zeros(0, 3, 384, 384), "region_masks": torch.zeros(0, 384, 384,
                                                                                              dtype=torch.bool),
                      "region_frame_index": torch.zeros(0, dtype=torch.long),
                      "region_object_index": torch.zeros(0, dtype=torch.long), "num_objects": 0,
                      "sample_index": i, "sample_id": str(i)})
    return items


def referring_items(p: Preset, layout, size: int) -> list[dict]:
    """Referring samples of the same lengths: ``p.frames`` frames, 2 objects (3 and 1 mask frames), the rest
    text; the same labelled answer length."""
    from refvllm.constants import IGNORE_INDEX, REGION_TOKEN_ID, VISUAL_TOKEN_ID

    objects = [[0, p.frames // 2, p.frames - 1], [1]]
    visual = [VISUAL_TOKEN_ID] * layout.num_visual_tokens(p.frames)
    regions = [[REGION_TOKEN_ID] * layout.num_region_tokens(len(f)) for f in objects]
    fixed = len(visual) + sum(map(len, regions))
    items = []
    for i, n in enumerate(lengths(p)):
        n = max(n, fixed + 64)
        text = text_ids(n - fixed, i)
        ids = text[:10] + visual + text[10:15] + regions[0] + text[15:20] + regions[1] + text[20:]
        k = min(label_count(n), len(text) - 20)  # the answer is text after the last region
        masks = torch.zeros(4, size, size, dtype=torch.bool)
        for m, (top, left) in enumerate([(40, 60), (60, 80), (80, 100), (200, 200)]):
            masks[m, top:top + 100, left:left + 120] = True
        g = torch.Generator().manual_seed(i)
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor([IGNORE_INDEX] * (n - k) + ids[-k:]),
                      "pixel_values": torch.randn(p.frames, 3, size, size, generator=g), "region_masks": masks,
                      "region_frame_index": torch.tensor([f for fr in objects for f in fr]),
                      "region_object_index": torch.tensor([0, 0, 0, 1]), "num_objects": 2,
                      "sample_index": i, "sample_id": str(i)})
    return items


def micro_batches(items: list[dict], size: int, pad: int, max_tokens: int = 0) -> list[dict]:
    """Collated micro-batches of ``size`` items in order, or (``max_tokens`` > 0) the sampler's token-budget
    cuts of at most ``size`` items."""
    import numpy as np

    from refvllm.data.collate import collate
    from refvllm.data.dataset import budget_cuts

    if max_tokens:
        starts = budget_cuts(np.array([len(it["input_ids"]) for it in items]), size, max_tokens).tolist()
    else:
        starts = [*range(0, len(items), size), len(items)]
    return [collate(items[a:b], pad) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def budget(p: Preset) -> int:
    """The budget case's ``train.max_tokens``: twice the longest sequence (a bound on every micro-batch's
    tokens that the fixed micro-batches of 4 exceed when long sequences meet)."""
    return 2 * p.max_len


# --------------------------------------------------------------------------------------------------- cases


def time_steps(step, p: Preset, device: str) -> tuple[float, list[float]]:
    """Seconds of a step (the median of ``p.steps`` timed calls of ``step()`` after ``p.warmup`` untimed ones;
    the faster one when 2 are timed: the cpu preset, module docstring), and every loss."""
    losses, times = [], []
    for i in range(p.warmup + p.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(float(step()))
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= p.warmup:
            times.append(time.perf_counter() - start)
    return (min(times) if len(times) == 2 else statistics.median(times)), losses


def run_peer(p: Preset, llm_path: str, device: str) -> dict:
    """Plain transformers + peft, padded micro-batches, the model's own loss (every position's logits)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, p.dtype)
    model = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation="sdpa").to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=LORA_TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    batches = micro_batches(text_items(p), p.micro_batch, 0)

    def step():
        total = 0.0
        for b in batches:
            out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                        labels=b["labels"].to(device))
            (out.loss / len(batches)).backward()
            total += float(out.loss.detach()) / len(batches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    seconds, losses = time_steps(step, p, device)
    return {"seconds": seconds, "losses": losses, **batch_figures(batches)}


def refvllm_run(p: Preset, vision: str, llm: str, packing: bool):
    """A :class:`refvllm.train.loop.Run` of configs/sft.yaml on these checkpoints (no data loader: the benchmark
    hands the micro-batches to ``train_step`` itself)."""
    from refvllm.config import load_config
    from refvllm.data.dataset import BadSampleCounter
    from refvllm.model.build import build_model, parameter_groups
    from refvllm.train import checkpoint as ckpt
    from refvllm.train import loop
    from refvllm.train.distributed import make_accelerator
    from refvllm.train.schedule import build_optimizer, build_scheduler

    precision = "bf16" if torch.cuda.is_available() else "'no'"  # quoted: YAML reads a bare no as false
    cfg = load_config(ROOT / "configs" / "sft.yaml", [
        f"model.vision_path={vision}", f"model.llm_path={llm}", f"model.dtype={p.dtype}",
        f"train.mixed_precision={precision}", f"train.micro_batch_size={p.micro_batch}",
        f"train.grad_accum={p.num_sequences // p.micro_batch}", "train.warmup_steps=0", "train.max_steps=100",
        f"train.packing={str(packing).lower()}"])
    acc = make_accelerator(cfg)
    torch.manual_seed(0)
    raw = build_model(cfg.model, print_table=False, float32_masters=True)
    optimizer = build_optimizer(parameter_groups(raw), cfg)
    run = loop.Run(cfg, acc, raw, raw, optimizer, build_scheduler(optimizer, cfg), None, None,
                   BadSampleCounter(0), ckpt.TrainerState())
    run.model, run.optimizer = acc.prepare(raw, optimizer)
    run.trainable = [q for q in run.model.parameters() if q.requires_grad]
    return run


def run_refvllm(p: Preset, vision: str, llm: str, device: str, referring: bool, packing: bool = True,
                max_tokens: int = 0) -> dict:
    from refvllm.train import loop

    run = refvllm_run(p, vision, llm, packing)
    pad = run.raw.pad_token_id
    items = referring_items(p, run.raw.layout, 384) if referring else text_items(p)
    batches = (micro_batches(items, p.num_sequences, pad, max_tokens) if max_tokens
               else micro_batches(items, p.micro_batch, pad))
    with torch.no_grad():  # packed == padded on the micro-batch with the most padding, before any update
        most = max(batches, key=lambda b: int((b["attention_mask"] == 0).sum()))
        first = loop.to_device(most, run.accelerator.device)
        with run.accelerator.autocast():
            padded, packed = (float(run.model(first, logits_at="labels", pack=pk).loss) for pk in (False, True))
    seconds, losses = time_steps(lambda: loop.train_step(run, batches).loss, p, device)
    return {"seconds": seconds, "losses": losses, **batch_figures(batches), "packed_loss": packed,
            "padded_loss": padded,
            "packed_rel_diff": abs(packed - padded) / max(abs(padded), 1e-12)}


# ---------------------------------------------------------------------------------------------- figures


def batch_figures(batches: list[dict]) -> dict:
    """Sequence lengths, label tokens (after the shift) and padded positions of a step's micro-batches."""
    from refvllm.model.refvlm import count_label_tokens

    lens = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    return {"lengths": lens, "label_tokens": sum(count_label_tokens(b["labels"]) for b in batches),
            "padded_positions": sum(b["attention_mask"].numel() for b in batches), "micro_batches": len(batches)}


def model_flops(llm_path: str, seq_lengths: list[int], label_tokens: int) -> float:
    """FLOPs of one step by the formula of the module docstring."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(llm_path)
    d, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * c.intermediate_size  # q, o; k, v; gate, up, down
    attention = sum(6 * layers * d * n * n for n in seq_lengths)
    return 4 * per_layer * layers * sum(seq_lengths) + attention + 6 * vocab * d * label_tokens


def cpu_peak_flops() -> float:
    """float32 matmul FLOP/s on this machine now (best of 5, 1024^3)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(case: str, preset: str, vision: str, llm: str) -> None:
    p = PRESETS[preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    if case == "peer":
        result = run_peer(p, llm, device)
    else:
        result = run_refvllm(p, vision, llm, device, case == "vlm", packing=case != "padded",
                             max_tokens=budget(p) if case == "budget" else 0)
    result["peak_mem_gb"] = round(peak_memory_gb(device), 2)
    print(json.dumps(result))


def measure(case: str, preset: str, vision: str, llm: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", case, "--preset", preset, "--vision", vision,
                           "--llm", llm], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"the {case} case failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_checkpoints(p: Preset, out: Path) -> tuple[str, str]:
    from refvllm.model.shapes import write_llm, write_vision

    vision, llm = out / f"siglip-so400m-{p.vision_layers}l", out / f"{p.llm_shape}-{p.llm_layers}l"
    dtype = getattr(torch, p.dtype)
    if not (vision / "config.json").is_file():
        write_vision(vision, "siglip-so400m", layers=p.vision_layers, full=False, dtype=dtype)
    if not (llm / "config.json").is_file():
        write_llm(llm, p.llm_shape, layers=p.llm_layers, dtype=dtype)
    return str(vision), str(llm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--out", default="runs/bench/throughput")
    parser.add_argument("--child", choices=CASES)
    parser.add_argument("--vision")
    parser.add_argument("--llm")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.preset, args.vision, args.llm)
        return
    p = PRESETS[args.preset]
    start = time.perf_counter()
    vision, llm = build_checkpoints(p, Path(args.out) / args.preset)
    rows = {case: measure(case, args.preset, vision, llm) for case in CASES}
    peak = H200_PEAK_BF16 if torch.cuda.is_available() else cpu_peak_flops()
    print(f"preset {args.preset}: {asdict(p)}; peak {peak / 1e12:.3f} TFLOP/s")
    print(f"{'case':<8} {'tokens':>7} {'padded':>7} {'step s':>8} {'tokens/s':>10} {'MFU %':>6} {'peak GB':>8} "
          f"{'first loss':>10}")
    for case, r in rows.items():
        tokens = sum(r["lengths"])
        r["tokens_per_s"] = tokens / r["seconds"]
        r["mfu"] = model_flops(llm, r["lengths"], r["label_tokens"]) / r["seconds"] / peak
        print(f"{case:<8} {tokens:>7} {r['padded_positions']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>10.0f} "
              f"{100 * r['mfu']:>6.1f} {r['peak_mem_gb']:>8.2f} {r['losses'][0]:>10.4f}")
    tolerance = 1e-4 if p.dtype == "float32" else 2e-2
    print(json.dumps({
        "preset": args.preset, "peer_tokens_per_s": round(rows["peer"]["tokens_per_s"], 1),
        "tokens_per_s": round(rows["refvllm"]["tokens_per_s"], 1),
        "ratio": round(rows["refvllm"]["tokens_per_s"] / rows["peer"]["tokens_per_s"], 2),
        "padded_tokens_per_s": round(rows["padded"]["tokens_per_s"], 1),
        "packing_gain": round(rows["refvllm"]["tokens_per_s"] / rows["padded"]["tokens_per_s"], 2),
        "budget_tokens_per_s": round(rows["budget"]["tokens_per_s"], 1),
        "budget_micro_batches": rows["budget"]["micro_batches"],
        "vlm_tokens_per_s": round(rows["vlm"]["tokens_per_s"], 1),
        "vlm_vs_llm": round(rows["vlm"]["tokens_per_s"] / rows["refvllm"]["tokens_per_s"], 2),
        "mfu": round(rows["refvllm"]["mfu"], 4), "peer_mfu": round(rows["peer"]["mfu"], 4),
        "peak_mem_gb": {case: r["peak_mem_gb"] for case, r in rows.items()},
        "packed_matches_unpacked": all(rows[c]["packed_rel_diff"] < tolerance for c in ("refvllm", "vlm")),
        "packed_rel_diff": {c: rows[c]["packed_rel_diff"] for c in ("refvllm", "vlm")},
        "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
