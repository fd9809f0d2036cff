"""Writing evaluation results: predictions JSONL, METRICS.json, and the results table printed at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refvllm.fileio import atomic_write_text


def predictions_path(metrics_path: str | Path) -> Path:
    """Where the predictions go: next to the metrics, ``metrics.json`` -> ``metrics.predictions.jsonl``."""
    path = Path(metrics_path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + ".predictions.jsonl")


def write_predictions(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """One JSON object per line, in the order given. Returns the path."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """METRICS.json, indented for reading. Returns the path."""
    return atomic_write_text(path, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if percent else f"{value:.3f}"
    return str(value)


def results_table(metrics: dict[str, Any]) -> str:
    """The per-type table and the overall row as aligned text.

    Columns: type, n, bad, accuracy (%; by the published rule for Bench-Q, refvllm's extractor's accuracy
    then beside it), chance (%), needs_region, exact match (%), token F1 (%); with judge scores (Bench-D) also
    the four dimension means and their average (0..5).
    """
    groups = [*metrics["per_type"].items(), ("OVERALL", metrics["overall"])]
    # Multiple choice scored by the published rule: refvllm's own extractor's figure beside it.
    second = (metrics.get("run", {}).get("choice_rule") == "videorefer"
              and any(m.get("accuracy_refvllm") is not None for _, m in groups))
    header = ["type", "n", "bad", "acc%", *(["acc%(refvllm)"] if second else []), "chance%", "region", "EM%", "F1%"]
    rows = []
    for name, m in groups:
        rows.append([name, _fmt(m["n"]), _fmt(m.get("num_bad", 0)), _fmt(m["accuracy"], True),
                     *([_fmt(m.get("accuracy_refvllm"), True)] if second else []),
                     _fmt(m.get("chance"), True), _fmt(m.get("needs_region")), _fmt(m["exact_match"], True),
                     _fmt(m["f1"], True)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    captioning = metrics.get("captioning")
    if captioning and captioning["overall"]["n"]:
        c = captioning["overall"]
        lines.append(f"captioning: BLEU-4={_fmt(c['bleu4'])} ROUGE-L={_fmt(c['rouge_l'])} CIDEr-D={_fmt(c['cider'])} "
                     f"n={c['n']} coverage={_fmt(c['coverage'], True)}%")
    judge = metrics.get("judge")
    if judge and judge.get("scores"):
        parts = [f"{k}={_fmt(v)}" for k, v in judge["scores"].items()]
        lines.append(f"judge ({judge['model']}, T={judge['temperature']}): {' '.join(parts)} "
                     f"average={_fmt(judge['average'])} scored={judge['n_scored']} failed={judge['n_failed']} "
                     f"coverage={_fmt(judge.get('coverage'), True)}% prompt={judge.get('prompt_version')}")
    return "\n".join(lines)
