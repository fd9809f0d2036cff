"""scripts/train.py on a file that holds every hostile case among valid samples: the run finishes, every bad
sample is skipped and counted (none crashes a loader worker or the trainer), the valid ones are trained on."""

from __future__ import annotations

import json

import pytest
from hostile_cases import CASES, write_hostile_media
from train_helpers import check_ok, make_assets, overrides, run_training


@pytest.mark.slow
def test_training_skips_every_hostile_sample_and_finishes(tmp_path):
    assets = make_assets(tmp_path, num_train=16)
    root = write_hostile_media(tmp_path / "data")
    valid = json.loads((root / "train.json").read_text())
    bad = [text for text, category, _ in CASES.values() if category is not None]
    lines = [json.dumps(s) for s in valid]
    for k, text in enumerate(bad + [text for text, category, _ in CASES.values() if category is None]):
        lines.insert(2 * k + 1, text)  # interleaved, as they would be in a merged file
    lines += [json.dumps(s) for s in valid[: -len(lines) % 4]]  # a whole number of steps per epoch
    train_file = tmp_path / "mixed.jsonl"
    train_file.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    # One epoch exactly (micro-batch 2 x accumulation 2 x steps), two loader workers: a native crash there would
    # kill the run.
    steps = len(lines) // 4
    out = tmp_path / "run"
    proc = run_training(overrides(assets, out, data__train_file=train_file, data__max_bad_samples=-1,
                                  data__num_workers=2, train__max_steps=steps, train__save_steps=0), timeout=600)
    check_ok(proc)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps
    assert records[-1]["num_skipped"] == len(bad), proc.stdout[-4000:]
    assert proc.stdout.count("skipping sample") >= len(bad)
    assert "Traceback" not in proc.stdout
