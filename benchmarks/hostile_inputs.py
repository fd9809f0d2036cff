"""Peak memory and time of `refvllm validate` and `refvllm show` on each hostile sample (docs/performance.md,
"Hostile inputs").

Each case of tests/hostile_cases.py (the cases of the issue "Hostile inputs") is written as a one-sample JSONL
file beside the media it names, and `refvllm validate --workers 1` runs on it in a fresh process; its peak RSS
is read from ``wait4``'s rusage. The baseline, in the same run, is a valid sample (the interpreter, numpy,
pycocotools, PyAV and decord imported and used). Also `refvllm show` on one 8000 x 8000 JPEG with three RLE
masks at full resolution.

    python benchmarks/hostile_inputs.py [--out runs/bench/hostile]

Prints a table and a final JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the cases live with the tests that pin them

from helpers_media import image_sample, video_sample  # noqa: E402
from hostile_cases import CASES, box, write_hostile_media  # noqa: E402

from refvllm.data.masks import encode_rle  # noqa: E402


def run_measured(cmd: list[str]) -> tuple[int, float, float]:
    """(exit code, peak RSS in MiB, seconds) of ``cmd`` run to completion in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def validate_case(root: Path, name: str, text: str) -> dict:
    path = root / "one.jsonl"
    path.write_text(text + "\n", encoding="utf-8", errors="surrogatepass")
    code, rss, seconds = run_measured([sys.executable, "-m", "refvllm", "validate", str(path), "--workers", "1",
                                       "--cache-dir", str(root / "cache")])
    return {"case": name, "exit": code, "peak_rss_mib": round(rss), "seconds": round(seconds, 2)}


def show_case(root: Path) -> dict:
    """`refvllm show` on an 8000 x 8000 JPEG with three masks at its size."""
    side = 8000
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    Image.fromarray(np.stack([np.broadcast_to(ramp, (side, side))] * 3, -1).astype(np.uint8)).save(
        root / "huge.jpg", quality=80)
    masks = []
    for k in range(3):
        mask = np.zeros((side, side), bool)
        mask[1000 + 2000 * k: 2500 + 2000 * k, 1000:7000] = True
        masks.append(encode_rle(mask))
    (root / "huge.jsonl").write_text(json.dumps(image_sample("huge.jpg", masks)) + "\n")
    code, rss, seconds = run_measured([sys.executable, "-m", "refvllm", "show", str(root / "huge.jsonl"),
                                       "--index", "0", "--out", str(root / "huge.png")])
    return {"case": "show: 8000x8000 image, 3 masks", "exit": code, "peak_rss_mib": round(rss),
            "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/hostile")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    write_hostile_media(root)
    rows = [validate_case(root, "baseline: a valid video sample", json.dumps(video_sample("v.mp4", [{2: box()}])))]
    rows += [validate_case(root, name, text) for name, (text, _, _) in CASES.items()]
    rows.append(show_case(root))
    base = rows[0]["peak_rss_mib"]
    print(f"{'case':<45} {'exit':>4} {'peak MiB':>9} {'over base':>9} {'s':>6}")
    for row in rows:
        row["over_baseline_mib"] = row["peak_rss_mib"] - base
        print(f"{row['case']:<45} {row['exit']:>4} {row['peak_rss_mib']:>9} {row['over_baseline_mib']:>9} "
              f"{row['seconds']:>6}")
    print(json.dumps({"rows": rows, "max_validate_peak_mib": max(r["peak_rss_mib"] for r in rows[:-1])}))


if __name__ == "__main__":
    main()
