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
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from refvllm.config import config_value
from refvllm.data.types import Skipped
from refvllm.errors import DataError
from refvllm.eval.formats import FORMATS, MODES, BadEntry, EvalEntry, read_eval_file
from refvllm.eval.judge import NO_JUDGE_MESSAGE, judge_from_config, judge_predictions
from refvllm.eval.metrics import CHOICE_RULES, Scored, aggregate, score_answer
from refvllm.eval.report import predictions_path, results_table, write_metrics, write_predictions
from refvllm.eval.shards import PartFiles, ProcessContext, batch_plan, process_context, run_key
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


def generate_batches(engine: RefInference, good: list[EvalEntry], data_root: str | Path, plan: list[range],
                     batches: list[int], parts: PartFiles, rank: int = 0, ablate_regions: bool = False,
                     progress: bool = True) -> None:
    """Generate the answers of ``batches`` (positions in ``plan``, batches of ``good``) and write each batch to
    this rank's part file as it finishes (refvllm.eval.shards); prompts are prepared in DataLoader workers."""
    loader = torch.utils.data.DataLoader(
        PromptDataset(good, engine.processor, data_root), batch_sampler=[list(plan[k]) for k in batches],
        num_workers=engine.cfg.data.num_workers, collate_fn=_as_list)
    total = sum(len(plan[k]) for k in batches)
    with tqdm(total=total, desc="eval", unit="sample", disable=not progress, file=sys.stderr) as bar:
        for k, items in zip(batches, loader, strict=True):
            kept = [x for x in items if not isinstance(x, Skipped)]
            results = [{"index": g.index, "id": g.id, "text": g.text, "num_tokens": g.num_tokens}
                       for g in engine.generate_items(kept, ablate_regions)]
            results += [{"index": x.index, "id": x.id, "skipped": x.reason} for x in items if isinstance(x, Skipped)]
            parts.append(rank, k, results)
            bar.update(len(items))


def collect(done: dict[int, list[dict]], plan: list[range], good: list[EvalEntry]
            ) -> tuple[dict[int, Generation], list[Skipped]]:
    """Generations by entry index and the entries that could not be prepared, from every batch's results;
    RuntimeError when a batch is missing (a process did not finish its share)."""
    missing = [k for k in range(len(plan)) if k not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(plan)} evaluation batches have no results (first: {missing[0]})")
    generations: dict[int, Generation] = {}
    skipped: list[Skipped] = []
    for k in range(len(plan)):
        for r in done[k]:
            if "skipped" in r:
                skipped.append(Skipped(r["index"], r["id"], r["skipped"]))
            else:
                generations[r["index"]] = Generation(r["index"], r["id"], r["text"], r["num_tokens"])
    expected = {e.index for e in good}
    if set(generations) | {s.index for s in skipped} != expected:
        raise RuntimeError("the evaluation batches' results do not cover the questions exactly")
    return generations, skipped


def _prompt_text(entry: EvalEntry) -> str:
    """The question as the user wrote it (last human turn, media placeholder removed) for the predictions file."""
    humans = [t.get("value", "") for t in entry.raw["conversations"] if t.get("from") in ("human", "user")]
    return humans[-1].replace("<video>\n", "").replace("<image>\n", "") if humans else ""


def choice_rule(fmt: str) -> str:
    """The rule behind a format's headline multiple-choice accuracy (refvllm.eval.metrics.CHOICE_RULES):
    bench-q figures are computed as the published scorer computes them."""
    return "videorefer" if fmt == "bench-q" else "refvllm"


def scoring_info(fmt: str) -> dict[str, str]:
    """What the metrics file says about how each accuracy figure was computed."""
    rule = choice_rule(fmt)
    return {"accuracy": f"{rule}: {CHOICE_RULES[rule]}",
            **{f"accuracy_{r}": f"{r}: {text}" for r, text in CHOICE_RULES.items()},
            "overall.accuracy": "micro average over every graded question (the published Bench-Q average)",
            "overall.macro_accuracy": "mean of the per-type accuracies"}


def prediction_record(entry: EvalEntry, gen: Generation, fmt: str = "seed") -> tuple[dict[str, Any], Scored]:
    """The predictions-file record of one answered entry, and its score (the headline rule of ``fmt``)."""
    score = score_answer(gen.text, entry.reference, entry.options, choice_rule(fmt))
    choice = ({"correct_refvllm": score.correct_refvllm, "correct_videorefer": score.correct_videorefer,
               "extracted_videorefer": score.extracted_videorefer} if score.kind == "choice" else {})
    record = {"index": entry.index, "id": entry.id, "type": entry.type, "question": _prompt_text(entry),
              "reference": entry.reference, "prediction": gen.text, "kind": score.kind, "correct": score.correct,
              "extracted": score.extracted, **choice, "exact_match": score.exact_match, "f1": round(score.f1, 6),
              "num_tokens": gen.num_tokens, "chance": entry.chance, "needs_region": entry.needs_region,
              "options": entry.options, **entry.extra, "pred": gen.text}  # "pred": the reference scripts' key
    return record, Scored(entry.type, score, entry.chance, entry.needs_region)


def bad_record(bad: BadEntry) -> dict[str, Any]:
    return {"index": bad.index, "id": bad.id, "type": bad.type, "error": bad.reason}


def score_all(entries: list[EvalEntry | BadEntry], generations: dict[int, Generation],
              skipped: list[Skipped], fmt: str = "seed") -> tuple[list[dict], list[Scored], list[BadEntry]]:
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
        record, score = prediction_record(entry, generations[entry.index], fmt)
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
        return {"enabled": True, **judge_predictions(client, answered, bar, num_entries=len(records))}


def evaluate(engine: RefInference, data: str | Path, data_root: str | Path, out: str | Path, fmt: str = "seed",
             mode: str = "multi", ablate_regions: bool = False, progress: bool = True,
             entries: list[EvalEntry | BadEntry] | None = None, ctx: ProcessContext | None = None
             ) -> dict[str, Any] | None:
    """Evaluate ``engine`` on ``data``; writes METRICS.json at ``out`` and the predictions next to it.

    Every process of ``ctx`` (default: this one alone) generates its share of the batches
    (refvllm.eval.shards), continuing from the part files an interrupted run left; the main process then
    scores everything, writes both files and removes the part files. Returns the metrics dict on the main
    process (see docs/evaluation.md: ``overall``, ``per_type``, ``bad_samples``, ``scoring``, ``judge`` for
    Bench-D, ``run``), None on the others.
    """
    ctx = ctx or ProcessContext()
    entries = entries if entries is not None else read_eval_file(
        data, fmt, mode, engine.cfg.data.prompt.choice_instruction)
    if fmt == "bench-d":
        judge_from_config(engine.cfg.eval)  # a bad judge config fails before minutes of generation
    start = time.perf_counter()
    good = [e for e in entries if isinstance(e, EvalEntry)]
    plan = batch_plan(len(good), engine.cfg.eval.batch_size)
    parts = PartFiles(out, run_key(_answer_settings(engine, data, fmt, mode, ablate_regions, len(entries))))
    done = parts.read()
    ctx.barrier()  # every process has read the part files before any appends to them
    if done and ctx.is_main:
        print(f"resuming: {len(done)} of {len(plan)} batches already answered ({', '.join(map(str, parts.files()))})",
              file=sys.stderr)
    mine = [k for k in range(len(plan)) if k % ctx.world == ctx.rank and k not in done]
    generate_batches(engine, good, data_root, plan, mine, parts, ctx.rank, ablate_regions, progress and ctx.is_main)
    ctx.barrier()
    if not ctx.is_main:
        return None
    generations, skipped = collect(parts.read(), plan, good)
    seconds = time.perf_counter() - start
    records, scored, bad = score_all(entries, generations, skipped, fmt)
    for b in bad:
        print(f"bad sample {b.index} (id {b.id!r}): {b.reason}", file=sys.stderr)
    metrics = aggregate(scored, _bad_per_type(bad))
    metrics["bad_samples"] = [b.as_dict() for b in bad]
    metrics["scoring"] = scoring_info(fmt)
    if fmt == "caption":
        metrics["captioning"] = captioning_summary(records)
    judge = _run_judge(engine, records, fmt, progress)
    if judge is not None:
        metrics["judge"] = judge
    metrics["run"] = _run_info(engine, data, data_root, fmt, mode, ablate_regions, len(entries), seconds) | {
        "num_processes": ctx.world, "batches": len(plan), "batches_resumed": len(done)}
    write_predictions(predictions_path(out), records)
    write_metrics(out, metrics)
    parts.remove()
    return metrics


def captioning_summary(records: list[dict]) -> dict[str, Any]:
    """BLEU-4, ROUGE-L and CIDEr-D (refvllm.eval.captioning) of the answered caption entries, overall and per
    type, with ``coverage``: answered / all entries (a bad entry is counted there, never silently dropped)."""
    from refvllm.eval.captioning import caption_metrics

    answered = [r for r in records if "prediction" in r]
    by_type: dict[str, list[dict]] = {}
    for r in answered:
        by_type.setdefault(r["type"], []).append(r)

    def summary(rs: list[dict]) -> dict[str, Any]:
        return caption_metrics([r["prediction"] for r in rs], [r["captions"] for r in rs])

    return {"overall": summary(answered) | {"coverage": len(answered) / len(records) if records else None},
            "per_type": {t: summary(rs) for t, rs in sorted(by_type.items())},
            "metrics": "BLEU-4, ROUGE-L, CIDEr-D as pycocoevalcap computes them; tokens: lower-cased, punctuation "
                       "removed (not the PTB tokenizer); no METEOR (refvllm.eval.captioning)"}


def _answer_settings(engine: RefInference, data, fmt: str, mode: str, ablate_regions: bool, n: int) -> dict:
    """Everything that decides the answers (the part files' key, refvllm.eval.shards)."""
    source = Path(engine.source) if engine.source else None
    stamp = (source / "config.yaml").stat().st_mtime_ns if source and (source / "config.yaml").is_file() else None
    return {"model": str(source), "model_stamp": stamp, "data": str(Path(data).resolve()), "format": fmt,
            "mode": mode, "ablate_regions": ablate_regions, "num_entries": n, **_answer_shaping(engine)}


def _answer_shaping(engine: RefInference) -> dict[str, Any]:
    """The settings besides model and data that shape the answers: generation, batching, prompts, frames."""
    return {"generation": engine.generation_kwargs(), "batch_size": engine.cfg.eval.batch_size,
            "prompt": dataclasses.asdict(engine.cfg.data.prompt), "frames": frame_settings(engine.cfg)}


def _run_info(engine: RefInference, data, data_root, fmt: str, mode: str, ablate_regions: bool, n: int,
              seconds: float) -> dict[str, Any]:
    return {"data": str(data), "data_root": str(data_root), "format": fmt, "mode": mode,
            "choice_rule": choice_rule(fmt),
            "ablate_regions": ablate_regions, "num_entries": n, "num_frames": engine.processor.num_frames,
            **_answer_shaping(engine), "device": str(engine.device), "seconds": round(seconds, 2),
            "samples_per_s": round(n / seconds, 3) if seconds > 0 else None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refvllm eval", description="Evaluate a checkpoint or export on a data file.")
    p.add_argument("--model", required=True, help="training checkpoint (checkpoint-STEP) or export directory")
    p.add_argument("--data", required=True, help="evaluation file (JSON array or JSONL)")
    p.add_argument("--data-root", default=None, help="folder the media paths are relative to (default: the "
                                                     "data file's folder)")
    p.add_argument("--out", required=True, help="METRICS.json to write; predictions go next to it")
    p.add_argument("--format", choices=FORMATS, default="seed", help="seed (default), bench-q, bench-d or caption")
    p.add_argument("--mode", choices=MODES, default="multi",
                   help="multi: every mask of the annotation (default); single: only the mask at frame_idx")
    p.add_argument("--ablate-regions", action="store_true", help="replace the region tokens with zeros")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. eval.batch_size=16)")
    return p


# The keys that decide what the model sees of a video besides the prompt text (docs/evaluation.md).
FRAME_KEYS = ("data.num_frames", "data.default_fps", "data.mask_resize", "model.min_pixels", "model.max_pixels")
PROMPT_KEYS = ("data.prompt.region", "data.prompt.choice_instruction")


def frame_settings(cfg) -> dict[str, Any]:
    """The values of :data:`FRAME_KEYS` in ``cfg``."""
    return {key: config_value(cfg, key) for key in FRAME_KEYS}


def warn_settings_differ(trained, evaluated) -> list[str]:
    """Warn (stderr) for every frame or prompt setting an evaluation changes from the checkpoint's training
    config; returns the keys."""
    changed = [key for key in (*FRAME_KEYS, *PROMPT_KEYS) if config_value(trained, key) != config_value(evaluated, key)]
    for key in changed:
        print(f"warning: {key} is {config_value(evaluated, key)!r} here but {config_value(trained, key)!r} in "
              "training: the model sees its inputs otherwise than it was trained on", file=sys.stderr)
    return changed


def main(argv: list[str]) -> int:
    from refvllm.checkpoint import load_config_of, resolve_model_dir

    args = _parser().parse_args(argv)
    ctx = process_context()
    model_dir = resolve_model_dir(args.model)
    cfg = load_config_of(model_dir, args.overrides)
    if ctx.is_main:
        warn_settings_differ(load_config_of(model_dir), cfg)
    # a bad file fails before the model loads
    entries = read_eval_file(args.data, args.format, args.mode, cfg.data.prompt.choice_instruction)
    engine = RefInference.from_pretrained(model_dir, args.overrides, args.device or ctx.device)
    data_root = args.data_root or str(Path(args.data).parent)
    metrics = evaluate(engine, args.data, data_root, args.out, args.format, args.mode, args.ablate_regions,
                       not args.no_progress, entries, ctx)
    if ctx.is_main:
        print(results_table(metrics))
        print(f"predictions: {predictions_path(args.out)}")
        print(args.out)
    return 0
