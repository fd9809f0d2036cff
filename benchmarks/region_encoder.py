"""Region encoder speed: the vectorised encoder against a per-object, per-frame Python loop computing the same.

Default case (issue 3): 8 samples x 4 objects x 16 frames, 27 x 27 x 1152 patch features (SigLIP-so400m at 384 px,
14-pixel patches), 384 x 384 masks, merge to at most 4 tokens per object, MLP to a 3584-wide LLM (Qwen2-7B).

    python benchmarks/region_encoder.py [--samples 8 --objects 4 --frames 16 --merge merge --repeats 5]

Prints the timings and ends with one JSON line holding at least ``speedup`` and ``max_abs_diff``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from refvllm.layout import TokenLayout
from refvllm.model.region import RegionEncoder, mask_patch_weights


def make_inputs(samples: int, objects: int, frames: int, grid: int, dim: int, size: int, seed: int = 0):
    """Features of every frame, and one moving box mask per (object, frame); objects of very different sizes."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(samples * frames, grid * grid, dim, generator=g)
    masks, frame_index, object_index = [], [], []
    for s in range(samples):
        for o in range(objects):
            h, w = torch.randint(4, size // 2, (2,), generator=g).tolist()
            y, x = torch.randint(0, size - h, (2,), generator=g).tolist()
            dy, dx = torch.randint(-6, 7, (2,), generator=g).tolist()
            for f in range(frames):
                m = torch.zeros(size, size, dtype=torch.bool)
                yy, xx = min(max(y + dy * f, 0), size - h), min(max(x + dx * f, 0), size - w)
                m[yy:yy + h, xx:xx + w] = True
                masks.append(m)
                frame_index.append(s * frames + f)
                object_index.append(s * objects + o)
    return features, torch.stack(masks), torch.tensor(frame_index), torch.tensor(object_index)


def loop_encoder(enc: RegionEncoder, features, masks, frame_index, object_index, num_objects, mlp: bool = True):
    """The straightforward version: for each object, for each of its frames, weight the patches by mask
    coverage and average (a mat-vec); then merge the object's tokens pair by pair; then the MLP."""
    grid, patch, k, mode = enc.layout.grid, enc.patch_size, enc.layout.region_max_tokens, enc.layout.region_merge
    out = []
    for o in range(num_objects):
        rows = sorted((int(frame_index[m]), m) for m in (object_index == o).nonzero().flatten().tolist())
        tokens = []
        for f, m in rows:
            mask = masks[m, : grid * patch, : grid * patch].float()
            w = F.avg_pool2d(mask[None, None], patch).flatten()
            if w.sum() == 0:
                w = F.adaptive_avg_pool2d(masks[m].float()[None, None], grid).flatten()
            tokens.append(w @ features[f] / w.sum())
        if mode == "merge":
            tokens = _loop_merge(tokens, k)
        elif mode == "uniform":
            n, bins = len(tokens), min(k, len(tokens))
            tokens = [torch.stack([tokens[i] for i in range(n) if i * bins // n == b]).mean(0) for b in range(bins)]
        out.append(enc.mlp(torch.stack(tokens)) if mlp else torch.stack(tokens))
    return torch.cat(out)


def _loop_merge(tokens: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    held = [1] * len(tokens)
    while len(tokens) > k:
        sims = [float(F.cosine_similarity(tokens[i], tokens[i + 1], dim=0)) for i in range(len(tokens) - 1)]
        j = sims.index(max(sims))
        merged = (tokens[j] * held[j] + tokens[j + 1] * held[j + 1]) / (held[j] + held[j + 1])
        tokens[j:j + 2], held[j:j + 2] = [merged], [held[j] + held[j + 1]]
    return tokens


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeats`` calls (after one warm-up call on CUDA)."""
    times, out = [], None
    cuda = torch.cuda.is_available()
    if cuda:
        fn()
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--objects", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--grid", type=int, default=27)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--llm-dim", type=int, default=3584)
    p.add_argument("--merge", choices=["merge", "uniform", "none"], default="merge")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--pooling", choices=["area", "binary"], default="area")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="e.g. cuda: time the vectorised encoder there (loop on CPU)")
    args = p.parse_args()
    torch.manual_seed(0)
    layout = TokenLayout(args.grid, 2, 1, args.max_tokens, args.merge)
    enc = RegionEncoder(args.dim, args.llm_dim, args.llm_dim, layout, args.patch, args.pooling).eval()
    features, masks, frame_index, object_index = make_inputs(args.samples, args.objects, args.frames, args.grid,
                                                             args.dim, args.size)
    n_obj = args.samples * args.objects
    print(f"device={args.device} threads={torch.get_num_threads()} features={tuple(features.shape)} "
          f"masks={tuple(masks.shape)} objects={n_obj} merge={args.merge} K={args.max_tokens} pooling={args.pooling}")
    args_ = (features, masks, frame_index, object_index, n_obj)
    dev = torch.device(args.device)
    dev_args = (features.to(dev), masks.to(dev), frame_index.to(dev), object_index.to(dev), n_obj)
    dev_enc = copy.deepcopy(enc).to(dev)
    loop_repeats = max(1, args.repeats // 2)
    with torch.no_grad():
        fast_s, fast = best_time(lambda: dev_enc(*dev_args), args.repeats)
        fast = fast.cpu()
        loop_s, loop = best_time(lambda: loop_encoder(enc, *args_), loop_repeats)
        f, m, fi, oi, _ = dev_args
        weights = lambda: mask_patch_weights(m, args.grid, args.patch, args.pooling)  # noqa: E731
        stages = {"weights": best_time(weights, args.repeats), "pool": best_time(lambda: dev_enc.pool(f, m, fi),
                                                                                 args.repeats)}
        pooled = stages["pool"][1]
        stages["merge"] = best_time(lambda: dev_enc.merge(pooled, fi, oi, n_obj), args.repeats)
        stages["mlp"] = best_time(lambda: dev_enc.mlp(stages["merge"][1]), args.repeats)
        pre_fast_s = best_time(lambda: dev_enc.merge(dev_enc.pool(f, m, fi), fi, oi, n_obj), args.repeats)[0]
        pre_loop_s = best_time(lambda: loop_encoder(enc, *args_, mlp=False), loop_repeats)[0]
    diff = float((fast - loop).abs().max()) if args.pooling == "area" else None  # the loop does area pooling
    ms = {name: round(t * 1000, 1) for name, (t, _) in stages.items()}
    print("vectorised stages (ms): " + "  ".join(f"{k} {v}" for k, v in ms.items()) + "  (weights are part of pool)")
    print(f"pool + merge:   vectorised {pre_fast_s * 1000:.1f} ms   loop {pre_loop_s * 1000:.1f} ms   "
          f"speedup {pre_loop_s / pre_fast_s:.1f}x")
    print(f"whole encoder:  vectorised {fast_s * 1000:.1f} ms   loop {loop_s * 1000:.1f} ms   "
          f"speedup {loop_s / fast_s:.1f}x   region tokens {tuple(fast.shape)}   max |diff| {diff}")
    print(json.dumps({"speedup": round(loop_s / fast_s, 2), "max_abs_diff": diff,
                      "pool_merge_speedup": round(pre_loop_s / pre_fast_s, 2),
                      "vectorised_ms": round(fast_s * 1000, 1), "loop_ms": round(loop_s * 1000, 1),
                      "stages_ms": ms, "tokens": list(fast.shape), "threads": torch.get_num_threads(),
                      "merge": args.merge, "pooling": args.pooling, "llm_dim": args.llm_dim,
                      "device": args.device}))


if __name__ == "__main__":
    main()
