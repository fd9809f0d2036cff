"""``refvllm eval``: generate answers for an evaluation file with a trained model and score them.

    refvllm eval --model DIR --data FILE --data-root ROOT --out METRICS.json
                 [--format seed|bench-q|bench-d] [--mode multi|single] [--ablate-regions] [key=value ...]

DIR is a training checkpoint (``checkpoint-STEP``) or an export directory; its saved config gives the frame
count, mask resizing and everything else of the data path, so evaluation sees inputs exactly as training did.
Overrides are config keys (``eval.batch_size=16``, ``eval.max_new_tokens=64``, ``eval.judge_endpoint=...``).

Steps: read the file (:mod:`refvllm.eval.formats`; a malformed entry is reported and counted) -> load the model
-> parse, decode and encode every prompt in DataLoader workers (a sample that fails there is reported and
counted too) -> batched generation with the KV cache (greedy unless ``eval.do_sample``), with a progress bar ->
score (:mod:`refvllm.eval.metrics`) -> for Bench-D the optional judge (:mod:`refvllm.eval.judge`) -> write
``METRICS.predictions.jsonl`` (one record per entry, in file order, bad entries with their ``error``) and
``METRICS.json`` -> print the results table, then the metrics path as the last line.

Exit status: 0 when the evaluation ran (bad samples are counted in the metrics, not a failure), 1 on a user
error (missing model or file, bad config), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from refvllm.data.types import Skipped
from refvllm.errors import DataError
from refvllm.eval.formats import FORMATS, MODES, BadEntry, EvalEntry, read_eval_file
from refvllm.eval.judge import NO_JUDGE_MESSAGE, judge_from_config, judge_predictions
from refvllm.eval.metrics import Scored, aggregate, score_answer
from refvllm.eval.report import predictions_path, results_table, write_metrics, write_predictions
from refvllm.infer import Generation, RefInference


class PromptDataset(torch.utils.data.Dataset):
    """Prepared prompts of evaluation entries: ``ds[i]`` is an ``encode_prompt`` dict or a :class:`Skipped`.

    Holds the processor and the entries' seed dicts, never the model, so DataLoader workers get a cheap copy.
    """

    def __init__(self, entries: list[EvalEntry], processor, data_root: str | Path):
        self.entries = entries
        self.processor = processor
        self.data_root = str(data_root)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict | Skipped:
        from refvllm.data.schema import parse_sample
        from refvllm.infer import prepare_prompt

        entry = self.entries[i]
        try:
            sample = parse_sample(entry.raw, entry.index)
            return prepare_prompt(self.processor, sample, self.data_root)
        except DataError as e:
            return Skipped(entry.index, entry.id, e.reason)


def _as_list(items: list) -> list:
    """The DataLoader's collate: keep the items; batching happens in :meth:`RefInference.generate_items`."""
    return items


def generate_all(engine: RefInference, entries: list[EvalEntry], data_root: str | Path,
                 ablate_regions: bool = False, progress: bool = True) -> tuple[dict[int, Generation], list[Skipped]]:
    """Generations by entry index, and the entries that could not be prepared (bad media, masks, length...)."""
    loader = torch.utils.data.DataLoader(
        PromptDataset(entries, engine.processor, data_root), batch_size=engine.cfg.eval.batch_size,
        num_workers=engine.cfg.data.num_workers, collate_fn=_as_list)
    generations: dict[int, Generation] = {}
    skipped: list[Skipped] = []
    with tqdm(total=len(entries), desc="eval", unit="sample", disable=not progress, file=sys.stderr) as bar:
        for items in loader:
            skipped += [x for x in items if isinstance(x, Skipped)]
            kept = [x for x in items if not isinstance(x, Skipped)]
            for gen in engine.generate_items(kept, ablate_regions):
                generations[gen.index] = gen
            bar.update(len(items))
    return generations, skipped


def _prompt_text(entry: EvalEntry) -> str:
    """The question as the user wrote it (last human turn, media placeholder removed) for the predictions file."""
    humans = [t.get("value", "") for t in entry.raw["conversations"] if t.get("from") in ("human", "user")]
    return humans[-1].replace("<video>\n", "").replace("<image>\n", "") if humans else ""


def prediction_record(entry: EvalEntry, gen: Generation) -> tuple[dict[str, Any], Scored]:
    """The predictions-file record of one answered entry, and its score."""
    score = score_answer(gen.text, entry.reference, entry.options)
    record = {"index": entry.index, "id": entry.id, "type": entry.type, "question": _prompt_text(entry),
              "reference": entry.reference, "prediction": gen.text, "kind": score.kind, "correct": score.correct,
              "extracted": score.extracted, "exact_match": score.exact_match, "f1": round(score.f1, 6),
              "num_tokens": gen.num_tokens, "chance": entry.chance, "needs_region": entry.needs_region,
              "options": entry.options, **entry.extra, "pred": gen.text}  # "pred": the reference scripts' key
    return record, Scored(entry.type, score, entry.chance, entry.needs_region)


def bad_record(bad: BadEntry) -> dict[str, Any]:
    return {"index": bad.index, "id": bad.id, "type": bad.type, "error": bad.reason}


def score_all(entries: list[EvalEntry | BadEntry], generations: dict[int, Generation],
              skipped: list[Skipped]) -> tuple[list[dict], list[Scored], list[BadEntry]]:
    """Records in file order, scores of the answered entries, and every bad entry (read or prepare time)."""
    reasons = {s.index: s.reason for s in skipped}
    records, scored, bad = [], [], []
    for entry in entries:
        if isinstance(entry, EvalEntry) and entry.index in reasons:
            entry = BadEntry(entry.index, entry.id, entry.type, reasons[entry.index])
        if isinstance(entry, BadEntry):
            bad.append(entry)
            records.append(bad_record(entry))
            continue
        record, score = prediction_record(entry, generations[entry.index])
        records.append(record)
        scored.append(score)
    return records, scored, bad


def _bad_per_type(bad: list[BadEntry]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in bad:
        key = b.type or "unknown"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _run_judge(engine: RefInference, records: list[dict], fmt: str, progress: bool) -> dict[str, Any] | None:
    """The judge's summary for Bench-D (scores written into ``records``), or a note that it is off."""
    if fmt != "bench-d":
        return None
    client = judge_from_config(engine.cfg.eval)
    if client is None:
        print(NO_JUDGE_MESSAGE, file=sys.stderr)
        return {"enabled": False, "message": NO_JUDGE_MESSAGE}
    answered = [r for r in records if "prediction" in r]
    with tqdm(total=len(answered), desc="judge", disable=not progress, file=sys.stderr) as bar:
        return {"enabled": True, **judge_predictions(client, answered, bar)}


def evaluate(engine: RefInference, data: str | Path, data_root: str | Path, out: str | Path, fmt: str = "seed",
             mode: str = "multi", ablate_regions: bool = False, progress: bool = True,
             entries: list[EvalEntry | BadEntry] | None = None) -> dict[str, Any]:
    """Evaluate ``engine`` on ``data``; writes METRICS.json at ``out`` and the predictions next to it.

    Returns the metrics dict (see docs/evaluation.md): ``overall``, ``per_type``, ``bad_samples``, ``judge``
    (Bench-D) and ``run`` (what was evaluated, how, and how long it took).
    """
    entries = entries if entries is not None else read_eval_file(data, fmt, mode)
    if fmt == "bench-d":
        judge_from_config(engine.cfg.eval)  # a bad judge config fails before minutes of generation
    start = time.perf_counter()
    good = [e for e in entries if isinstance(e, EvalEntry)]
    generations, skipped = generate_all(engine, good, data_root, ablate_regions, progress)
    seconds = time.perf_counter() - start
    records, scored, bad = score_all(entries, generations, skipped)
    for b in bad:
        print(f"bad sample {b.index} (id {b.id!r}): {b.reason}", file=sys.stderr)
    metrics = aggregate(scored, _bad_per_type(bad))
    metrics["bad_samples"] = [b.as_dict() for b in bad]
    judge = _run_judge(engine, records, fmt, progress)
    if judge is not None:
        metrics["judge"] = judge
    metrics["run"] = _run_info(engine, data, data_root, fmt, mode, ablate_regions, len(entries), seconds)
    write_predictions(predictions_path(out), records)
    write_metrics(out, metrics)
    return metrics


def _run_info(engine: RefInference, data, data_root, fmt: str, mode: str, ablate_regions: bool, n: int,
              seconds: float) -> dict[str, Any]:
    return {"data": str(data), "data_root": str(data_root), "format": fmt, "mode": mode,
            "ablate_regions": ablate_regions, "num_entries": n, "num_frames": engine.processor.num_frames,
            "generation": engine.generation_kwargs(), "batch_size": engine.cfg.eval.batch_size,
            "device": str(engine.device), "seconds": round(seconds, 2),
            "samples_per_s": round(n / seconds, 3) if seconds > 0 else None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refvllm eval", description="Evaluate a checkpoint or export on a data file.")
    p.add_argument("--model", required=True, help="training checkpoint (checkpoint-STEP) or export directory")
    p.add_argument("--data", required=True, help="evaluation file (JSON array or JSONL)")
    p.add_argument("--data-root", default=None, help="folder the media paths are relative to (default: the "
                                                     "data file's folder)")
    p.add_argument("--out", required=True, help="METRICS.json to write; predictions go next to it")
    p.add_argument("--format", choices=FORMATS, default="seed", help="seed (default), bench-q or bench-d")
    p.add_argument("--mode", choices=MODES, default="multi",
                   help="multi: every mask of the annotation (default); single: only the mask at frame_idx")
    p.add_argument("--ablate-regions", action="store_true", help="replace the region tokens with zeros")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. eval.batch_size=16)")
    return p


def _warn_frame_override(overrides: list[str]) -> None:
    if any(o.split("=", 1)[0].strip() == "data.num_frames" for o in overrides):
        print("warning: data.num_frames is overridden: the model sees another frame count than in training",
              file=sys.stderr)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    entries = read_eval_file(args.data, args.format, args.mode)  # a bad file fails before the model loads
    _warn_frame_override(args.overrides)
    engine = RefInference.from_pretrained(args.model, args.overrides, args.device)
    data_root = args.data_root or str(Path(args.data).parent)
    metrics = evaluate(engine, args.data, data_root, args.out, args.format, args.mode, args.ablate_regions,
                       not args.no_progress, entries)
    print(results_table(metrics))
    print(f"predictions: {predictions_path(args.out)}")
    print(args.out)
    return 0
