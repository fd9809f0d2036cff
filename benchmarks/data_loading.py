"""Data loading speed and memory (docs/performance.md, "Data loading").

1. Samples/s of one loader worker for a 720p, 30 s, 30 fps H.264 video (keyframe every 250 frames, x264's
   default) with 16 planned frames and 4 objects x 16 masks (compressed RLE): ``decode_sample`` against a
   naive path that decodes every frame and keeps the planned ones. Also the time of each decord read strategy
   of refvllm.data.media on the planned frames, for that video and for one with a keyframe every 30 frames.
2. A synthetic 1M-sample file, as JSONL and as a JSON array: first indexing time and peak memory, reopen time
   (cache hit) in a fresh process, and the memory a loader worker adds when it unpickles the index and reads
   10,000 random samples.

    python benchmarks/data_loading.py [--out runs/bench] [--samples 1000000] [--skip-video] [--skip-index]

Media and data files are made once and cached under --out. Prints the figures and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np

from refvllm.data.decode import decode_sample
from refvllm.data.index import SampleIndex
from refvllm.data.media import VIDEO_STRATEGIES, VideoFileReader, open_media, plan_frames
from refvllm.data.schema import parse_sample

REPO = Path(__file__).resolve().parents[1]

HEIGHT, WIDTH, FPS, SECONDS = 720, 1280, 30, 30
NUM_FRAMES, IMAGE_SIZE, NUM_OBJECTS, MASKS_PER_OBJECT = 16, 384, 4, 16


# ---------------------------------------------------------------------------------------------- media


def write_bench_video(path: Path, gop: int) -> Path:
    """720p, 30 s, 30 fps: a scrolling texture with per-frame noise (so the encoder spends real bits) and a
    moving square. x264 veryfast, crf 23, keyframe every ``gop`` frames."""
    import av

    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 200, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(FPS * SECONDS):
            img = np.roll(texture, 2 * i, axis=1) + rng.integers(0, 16, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            cx, cy = (200 + 4 * i) % WIDTH, 360 + int(150 * np.sin(i / 20))
            img[max(cy - 60, 0): cy + 60, max(cx - 60, 0): cx + 60] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def bench_sample(video_name: str) -> dict:
    """4 objects, each with an RLE mask on the same 16 annotated frames (not the uniform ones)."""
    from pycocotools import mask as mask_utils

    total = FPS * SECONDS
    frames = [int(5 + j * (total - 10) / MASKS_PER_OBJECT) for j in range(MASKS_PER_OBJECT)]
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    annotation = []
    for k in range(NUM_OBJECTS):
        obj = {}
        for f in frames:
            cx, cy = 150 + 250 * k + (f % 200), 200 + 80 * k
            mask = ((xx - cx) / 90.0) ** 2 + ((yy - cy) / 60.0) ** 2 <= 1
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            obj[str(f)] = {"segmentation": {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()}}
        annotation.append(obj)
    question = "<video>\n" + ", ".join(f"<object{k}><region>" for k in range(NUM_OBJECTS)) + ": what happens?"
    return {"id": "bench", "video": video_name, "annotation": annotation,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "They move."}]}


def naive_decode(sample, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode every frame of the video (RGB), keep the planned ones, then masks as ``decode_sample`` does."""
    import decord
    from PIL import Image

    from refvllm.data.masks import decode_mask, resize_mask_any

    vr = decord.VideoReader(str(root / sample.media), ctx=decord.cpu(0), num_threads=1)
    plan = plan_frames(len(vr), NUM_FRAMES, [sorted(obj) for obj in sample.objects])
    wanted = set(plan.frame_indices)
    frames = [np.asarray(Image.fromarray(frame).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
              for i, frame in enumerate(vr.next().asnumpy() for _ in range(len(vr))) if i in wanted]
    masks = [resize_mask_any(decode_mask(sample.objects[k][f], HEIGHT, WIDTH), IMAGE_SIZE)
             for k, obj_frames in enumerate(plan.object_frames) for f in obj_frames]
    return np.stack(frames), np.stack(masks)


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _strategy_times(path: Path, indices: list[int], repeats: int) -> dict[str, float]:
    """Median seconds to open ``path`` and read ``indices`` with each decord read strategy."""
    return {s: round(_timed(lambda s=s: VideoFileReader(path, s).read(indices), repeats), 3)
            for s in VIDEO_STRATEGIES}


def video_figures(out: Path, repeats: int) -> dict:
    root = out / "media"
    root.mkdir(parents=True, exist_ok=True)
    videos = {gop: write_bench_video(root / f"video_720p_30s_gop{gop}.mp4", gop).name for gop in (250, 30)}
    sample = parse_sample(bench_sample(videos[250]), 0)
    decoded = decode_sample(sample, root, NUM_FRAMES, IMAGE_SIZE)
    assert decoded.frames.shape == (NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert decoded.masks.shape == (NUM_OBJECTS * MASKS_PER_OBJECT, IMAGE_SIZE, IMAGE_SIZE)
    ours = _timed(lambda: decode_sample(sample, root, NUM_FRAMES, IMAGE_SIZE), repeats)
    naive = _timed(lambda: naive_decode(sample, root), max(1, repeats // 3))
    strategies = {}
    for gop, name in videos.items():
        sample_g = parse_sample(bench_sample(name), 0)
        indices = decode_sample(sample_g, root, NUM_FRAMES, IMAGE_SIZE).plan.frame_indices
        reader = open_media(root, sample_g)
        keys = len(reader._vr.get_key_indices())
        strategies[f"gop{gop}"] = {"keyframes": keys, **_strategy_times(root / name, indices, repeats)}
    return {"video": f"{WIDTH}x{HEIGHT}, {SECONDS} s, {FPS} fps, H.264 keyframe every 250 frames",
            "planned_frames": NUM_FRAMES, "objects": NUM_OBJECTS, "masks_per_object": MASKS_PER_OBJECT,
            "image_size": IMAGE_SIZE, "ours_s_per_sample": round(ours, 3), "naive_s_per_sample": round(naive, 3),
            "ours_samples_per_s": round(1 / ours, 2), "naive_samples_per_s": round(1 / naive, 3),
            "speedup": round(naive / ours, 1), "read_strategy_s": strategies}


# ---------------------------------------------------------------------------------------------- 1M index


def write_big_files(out: Path, num_samples: int) -> tuple[Path, Path]:
    """JSONL and JSON array of ``num_samples`` realistic single-object samples (~1 KB each)."""
    jsonl, array = out / f"index_{num_samples}.jsonl", out / f"index_{num_samples}.json"
    if jsonl.is_file() and array.is_file():
        return jsonl, array
    template = bench_sample("videos/v.mp4")
    template["annotation"] = [{"12": template["annotation"][0][next(iter(template["annotation"][0]))]}]
    template["conversations"][0]["value"] = "<video>\nWhat is <region> doing, and where does it go next?"
    template["conversations"][1]["value"] = "It walks to the left and then sits down next to the red car."
    body = json.dumps(template)[len('{"id": "bench", '):]
    tmp_l, tmp_a = Path(f"{jsonl}.tmp"), Path(f"{array}.tmp")
    with open(tmp_l, "w") as fl, open(tmp_a, "w") as fa:
        fa.write("[\n")
        for start in range(0, num_samples, 10_000):
            lines = [f'{{"id": "s{i:07d}", {body}' for i in range(start, min(start + 10_000, num_samples))]
            fl.write("\n".join(lines) + "\n")
            fa.write(",\n".join(lines) + (",\n" if start + 10_000 < num_samples else "\n"))
        fa.write("]\n")
    tmp_l.rename(jsonl)
    tmp_a.rename(array)
    return jsonl, array


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child_index(path: str, cache: str, queue) -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: measure the indexing alone
    before = _rss_mb()
    start = time.perf_counter()
    idx = SampleIndex(path, cache_dir=cache)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "n": len(idx), "peak_rss_added_mb": _rss_mb("VmHWM") - before})


def _child_worker(blob: bytes, queue) -> None:
    before = _rss_mb()
    idx = pickle.loads(blob)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in rng.integers(0, len(idx), 10_000):
        parse_sample(idx.raw(int(i)), int(i))
    seconds = time.perf_counter() - start
    queue.put({"rss_added_mb": _rss_mb() - before, "us_per_sample": 1e6 * seconds / 10_000})


def _in_child(target, *args) -> dict:
    """Run ``target(*args, queue)`` in a fresh (spawned) process; its result dict."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def index_figures(out: Path, num_samples: int) -> dict:
    figures = {}
    for path in write_big_files(out, num_samples):
        cache = out / "index_cache"
        shutil.rmtree(cache, ignore_errors=True)
        first = _in_child(_child_index, str(path), str(cache))
        again = _in_child(_child_index, str(path), str(cache))
        idx = SampleIndex(path, cache_dir=cache)
        worker = _in_child(_child_worker, pickle.dumps(idx))
        figures[path.suffix.lstrip(".")] = {
            "samples": first["n"], "file_mb": round(path.stat().st_size / 2**20),
            "first_index_s": round(first["seconds"], 1),
            "first_index_peak_rss_added_mb": round(first["peak_rss_added_mb"]),
            "reopen_s": round(again["seconds"], 3),
            "pickle_bytes": len(pickle.dumps(idx)), "worker_rss_added_mb": round(worker["rss_added_mb"], 1),
            "read_parse_us_per_sample": round(worker["us_per_sample"])}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--skip-index", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"cpu_count": os.cpu_count()}
    if not args.skip_video:
        result["video"] = video_figures(out, args.repeats)
        v = result["video"]
        print(f"video ({v['video']}), {NUM_FRAMES} planned frames, {NUM_OBJECTS} objects x {MASKS_PER_OBJECT} masks:")
        print(f"  ours  {v['ours_samples_per_s']:.2f} samples/s per worker ({v['ours_s_per_sample']} s/sample)")
        print(f"  naive {v['naive_samples_per_s']:.3f} samples/s per worker ({v['naive_s_per_sample']} s/sample), "
              f"speed-up {v['speedup']}x")
        for name, times in v["read_strategy_s"].items():
            print(f"  read strategies, {name}: {times}")
    if not args.skip_index:
        result["index"] = index_figures(out, args.samples)
        for fmt, f in result["index"].items():
            print(f"index {fmt}: {f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
