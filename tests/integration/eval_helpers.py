"""Shared by the eval/infer integration tests: a tiny trained checkpoint, benchmark files, a stub judge server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from helpers_media import box_mask, rle, write_frame_folder
from train_helpers import make_assets, overrides

FRAME = 64  # media size of the benchmark clips (the tiny vision tower's input size)


_TRAINED: dict[str, tuple[Path, dict[str, str]]] = {}


def train_tiny_checkpoint(base: Path) -> tuple[Path, dict[str, str]]:
    """Synthetic data + tiny checkpoints + one training step in-process, under ``base/tiny-eval-run``, made once
    per process (the eval and infer modules share it); returns (checkpoint dir, assets as config overrides)."""
    from refvllm.config import load_config
    from refvllm.train.loop import train

    root = Path(base) / "tiny-eval-run"
    if str(root) not in _TRAINED:
        assets = make_assets(root, num_train=4)
        args = overrides(assets, root / "train", train__max_steps=1, train__save_steps=1, train__grad_accum=1,
                         train__warmup_steps=0, data__num_frames=8, eval__batch_size=4, eval__max_new_tokens=4)
        summary = train(load_config(Path(__file__).parents[2] / "configs" / "demo.yaml", args))
        _TRAINED[str(root)] = (Path(summary["checkpoint"]), assets)
    return _TRAINED[str(root)]


def _clip_frames(num_frames: int, x0: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A red square moving right over grey, and its mask per frame."""
    frames = np.full((num_frames, FRAME, FRAME, 3), 60, np.uint8)
    masks = []
    for f in range(num_frames):
        x = min(x0 + f, FRAME - 16)
        frames[f, 24:40, x:x + 16] = (220, 40, 40)
        masks.append(box_mask(FRAME, FRAME, 24, 40, x, x + 16))
    return frames, masks


def write_bench_files(root: Path) -> tuple[Path, Path]:
    """Bench-Q (3 questions, types 'Basic Questions' x2 and 'Sequential Questions') and Bench-D (2 entries, 32
    masked frames per object) files over frame-folder clips under ``root``; returns their paths."""
    frames, masks = _clip_frames(32, 0)
    write_frame_folder(root / "clips" / "c0", frames)
    annotation = [{str(f): {"segmentation": rle(masks[f])} for f in range(0, 32, 4)}]
    options = ["(A) red", "(B) green", "(C) blue", "(D) yellow"]
    bench_q = [
        {"video": "clips/c0", "Question": "What colour is <object0><region>?", "type": "Basic Questions",
         "options": options, "Answer": "(A) red", "frame_idx": "8", "annotation": annotation},
        {"video": "clips/c0", "Question": "Which way does <object0><region> move?", "type": "Sequential Questions",
         "options": ["(A) left", "(B) right"], "Answer": "(B) right", "frame_idx": 4, "annotation": annotation},
        {"video": "clips/c0", "Question": "Is <object0><region> a square?", "type": "Basic Questions",
         "options": ["(A) yes", "(B) no"], "Answer": "(A) yes", "frame_idx": 0, "annotation": annotation},
    ]
    full = [{str(f): {"segmentation": rle(masks[f])} for f in range(32)}]
    bench_d = [
        {"video": "clips/c0", "caption": "A red square slides to the right.", "frame_idx": 5, "annotation": full},
        {"video": "clips/c0", "caption": "A small red box moves right.", "frame_idx": 20, "annotation": full},
    ]
    q, d = root / "bench_q.json", root / "bench_d.json"
    q.write_text(json.dumps(bench_q))
    d.write_text(json.dumps(bench_d))
    return q, d


class StubJudge:
    """An OpenAI-compatible /chat/completions stub on 127.0.0.1 answering every request with ``content``."""

    def __init__(self, content: str):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                stub.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


GOOD_JUDGE = '{"subject_correspondence": 4, "appearance": 3, "temporal": 2, "hallucination": 5}'
