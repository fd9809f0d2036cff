"""What a user sees of a run: ``metrics.jsonl`` per step, TensorBoard scalars, and the loss-curve PNG.

Only the main process writes. ``metrics.jsonl`` holds one JSON object per optimizer step with at least
``step``, ``loss``, ``lr``, ``tokens_per_s`` and ``num_skipped`` (cumulative skipped samples); on resume the
lines after the resumed step (written by the interrupted run after its last checkpoint) are dropped, so the
file always tells one consistent story.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from refvllm.fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file (an empty list when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keep only the records with ``step <= last_step`` (atomic rewrite)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Per-step metrics to ``OUTPUT_DIR/metrics.jsonl`` and TensorBoard; a no-op on other processes.

    ``resume_step``: the step the run restarts from; later records of an earlier run are dropped.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step > 0:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh file
        self._file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step``); numbers also go to TensorBoard as ``train/KEY``."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> str | None:
    """Draw loss (and a smoothed loss) against step from ``metrics.jsonl`` into ``out_png``; returns the path.

    Returns None when there is nothing to plot. Uses matplotlib's Agg backend (no display needed).
    """
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    ax.plot(steps, _ema(losses, 0.9), lw=1.6, label="loss (EMA 0.9)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per label token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return str(out_png)


def _ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out
