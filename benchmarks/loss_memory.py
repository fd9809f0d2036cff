"""Peak memory and time of one training step on a 3.5k-token, 16-frame sample with a real vocabulary
(docs/performance.md, "The loss at label positions").

Model: SigLIP-so400m/14 @ 384 (1 layer, random) + Qwen2.5-0.5B's exact config at 2 layers (151,936-token
vocabulary, tied head; 0.17B parameters), float32, LoRA on the LLM (the default targets), projector and region
encoder trained. One sample: 16 frames (16 x 196 = 3,136 visual tokens), 2 objects, 300 text tokens, the last 60
labelled. Each case runs in a fresh process (peak RSS from ``wait4``): ``all`` computes logits at every position
(the path before), ``labels`` only where a label is (``RefVLM.forward(logits_at="labels")``, the trainer's),
each without and with gradient checkpointing (configs/sft.yaml turns it on). Each process builds the model,
runs one warm-up step and times 3 (forward, backward, AdamW).

    python benchmarks/loss_memory.py [--out runs/bench/loss]     # about 6 minutes on 2 cores

Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

STEPS, FRAMES, TEXT, LABELS = 3, 16, 300, 60


def build_checkpoints(out: Path) -> tuple[str, str]:
    from refvllm.model.shapes import write_qwen2_5_0_5b, write_siglip_so400m

    vision, llm = out / "siglip-so400m-1layer", out / "qwen2.5-0.5b-2layers"
    if not (vision / "config.json").is_file():
        write_siglip_so400m(vision, layers=1)
    if not (llm / "config.json").is_file():
        write_qwen2_5_0_5b(llm, layers=2)
    return str(vision), str(llm)


def make_batch(model, size: int) -> dict:
    """The sample as a batch of one (collate's layout): text, visual run, two region runs, labelled answer."""
    from refvllm.constants import IGNORE_INDEX, REGION_TOKEN_ID, VISUAL_TOKEN_ID

    g = torch.Generator().manual_seed(0)
    layout = model.layout
    text = torch.randint(0, 150_000, (TEXT,), generator=g).tolist()
    objects = [[0, 5, 10], [3]]
    ids = text[:20] + [VISUAL_TOKEN_ID] * layout.num_visual_tokens(FRAMES)
    for frames in objects:
        ids += text[20:30] + [REGION_TOKEN_ID] * layout.num_region_tokens(len(frames))
    ids += text[30:]
    labels = [IGNORE_INDEX] * (len(ids) - LABELS) + ids[-LABELS:]
    masks, mask_frame, mask_obj = [], [], []
    for o, frames in enumerate(objects):
        for f in frames:
            m = torch.zeros(size, size, dtype=torch.bool)
            m[40 + 30 * o: 120 + 30 * o, 60:200] = True
            masks.append(m)
            mask_frame.append(f)
            mask_obj.append(o)
    n = len(ids)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "attention_mask": torch.ones(1, n, dtype=torch.long),
            "pixel_values": torch.randn(FRAMES, 3, size, size, generator=g),
            "frame_sample_index": torch.zeros(FRAMES, dtype=torch.long), "frames_per_sample": torch.tensor([FRAMES]),
            "region_masks": torch.stack(masks), "region_frame_index": torch.tensor(mask_frame),
            "region_object_index": torch.tensor(mask_obj), "object_sample_index": torch.zeros(2, dtype=torch.long)}


def child(mode: str, checkpointing: bool, vision: str, llm: str) -> None:
    """One process, one case: build, warm up, time STEPS steps; prints a JSON line."""
    from refvllm.config import load_config
    from refvllm.model.build import build_model

    torch.manual_seed(0)
    cfg = load_config(None, [f"model.vision_path={vision}", f"model.llm_path={llm}", "model.dtype=float32",
                             f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    model = build_model(cfg.model, print_table=False).train()
    batch = make_batch(model, 384)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for step in range(STEPS + 1):
        start = time.perf_counter()
        loss = model(batch, logits_at=mode).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first is a warm-up
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    print(json.dumps({"mode": mode, "checkpointing": checkpointing, "tokens": int(batch["input_ids"].shape[1]),
                      "step_s": sum(times) / len(times),
                      "first_loss": losses[0]}))


def measure(mode: str, checkpointing: bool, vision: str, llm: str) -> dict:
    flag = ["--checkpointing"] if checkpointing else []
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, *flag, "--vision", vision, "--llm", llm],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {mode} run failed")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = round(usage.ru_maxrss / 2**20, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/loss")
    parser.add_argument("--child", choices=("all", "labels"))
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--vision")
    parser.add_argument("--llm")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.checkpointing, args.vision, args.llm)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vision, llm = build_checkpoints(out)
    rows = [measure(mode, ckpt, vision, llm) for ckpt in (False, True) for mode in ("all", "labels")]
    print(f"{'logits at':<10} {'checkpointing':>13} {'tokens':>6} {'step s':>7} {'peak RSS GB':>12} {'first loss':>10}")
    for r in rows:
        print(f"{r['mode']:<10} {str(r['checkpointing']):>13} {r['tokens']:>6} {r['step_s']:>7.2f} "
              f"{r['peak_rss_gb']:>12} {r['first_loss']:>10.4f}")
    pairs = {ckpt: (rows[2 * i], rows[2 * i + 1]) for i, ckpt in enumerate(("off", "on"))}
    print(json.dumps({"rows": rows, **{f"speedup_checkpointing_{k}": round(a["step_s"] / b["step_s"], 2)
                                       for k, (a, b) in pairs.items()},
                      **{f"memory_ratio_checkpointing_{k}": round(a["peak_rss_gb"] / b["peak_rss_gb"], 2)
                         for k, (a, b) in pairs.items()}}))


if __name__ == "__main__":
    main()
