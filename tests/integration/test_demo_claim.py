"""A smaller version of the demo's claim (README, issue 5): trained briefly on synthetic data, the tiny model
answers questions that need a region far above chance, and falls back to about chance (not below it) when its region
tokens are zeroed, while a question that needs no region is unaffected by that."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import make_assets, overrides

ROOT = Path(__file__).parents[2]
STEPS = 400
REGION_TYPES = ("colour", "shape", "image_colour", "image_shape", "motion", "relation")


def _accuracy(metrics: dict, types: tuple[str, ...]) -> float:
    """Accuracy pooled over ``types`` (each type has the same number of eval samples)."""
    per = metrics["per_type"]
    return sum(per[t]["accuracy"] for t in types) / len(types)


@pytest.mark.slow
def test_region_pathway_learns(tmp_path):
    from refvllm.config import load_config
    from refvllm.data.synthetic import generate
    from refvllm.eval.run import evaluate
    from refvllm.infer import RefInference
    from refvllm.train.loop import train

    assets = make_assets(tmp_path, num_train=1000)
    args = overrides(assets, tmp_path / "train", train__max_steps=STEPS, train__save_steps=STEPS,
                     train__grad_accum=1, train__micro_batch_size=8, train__warmup_steps=20,
                     data__num_frames=4, eval__batch_size=16, eval__max_new_tokens=4)
    summary = train(load_config(ROOT / "configs" / "demo.yaml", args))
    fresh = generate(tmp_path / "fresh", num_train=0, num_eval=96, seed=1)  # 12 per type, another seed
    engine = RefInference.from_pretrained(summary["checkpoint"])
    plain = evaluate(engine, fresh.eval_file, fresh.data_root, tmp_path / "m.json", progress=False)
    ablated = evaluate(engine, fresh.eval_file, fresh.data_root, tmp_path / "a.json", ablate_regions=True,
                       progress=False)
    chance = sum(plain["per_type"][t]["chance"] for t in REGION_TYPES) / len(REGION_TYPES)
    seen = {t: (plain["per_type"][t]["accuracy"], ablated["per_type"][t]["accuracy"]) for t in plain["per_type"]}
    # Measured at 400 steps of 4 frames (region dropout 0.1, as in the demo): colour/shape types 0.83 pooled (the
    # bar 0.75: three more wrong answers of 48 fail it), all region types 0.69 (chance 0.32; motion 0.33 and
    # relation 0.50 are not learned this early), ablated 0.30 pooled; at 600 steps of 8 frames (before the suite
    # needed the time) 0.83 / 0.65 / 0.29. Without region dropout the ablated model answered off-type (0.0),
    # which the lower bound catches.
    # Each assertion names (plain, ablated) accuracy per type, so a failure shows the whole picture.
    assert _accuracy(plain, ("colour", "shape", "image_colour", "image_shape")) >= 0.75, seen
    assert _accuracy(plain, REGION_TYPES) >= chance + 0.25, seen
    assert chance - 0.15 <= _accuracy(ablated, REGION_TYPES) <= chance + 0.15, seen
    assert ablated["per_type"]["video_count"]["accuracy"] >= plain["per_type"]["video_count"]["accuracy"] - 0.1, seen
