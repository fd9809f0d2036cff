"""Do the answers come from the regions? An evaluation checked against its ``--ablate-regions`` twin.

Contract:
    refvllm region-check PLAIN.json ABLATED.json [PLAIN.json ABLATED.json ...]
                         [--min-accuracy 0.9] [--max-gap 0.1] [--max-chance 0.5]

    checks = check_pair(plain_metrics, ablated_metrics, min_accuracy=0.9, max_gap=0.1, max_chance=0.5)

For every question type that the metrics mark ``needs_region`` and whose ``chance`` is at most ``max_chance``
(the synthetic set's generator writes both; see docs/synthetic-data.md):
    - the plain run's accuracy must be >= ``min_accuracy``;
    - the ablated run's accuracy must be within ``max_gap`` of ``chance`` (above or below: a model that answers
      off-type without its regions scores below chance, which is not "falling to chance" either).
Types that need no region (counting) are printed for reference and never fail. One table per pair, then a
verdict; exit 0 when every check holds, 1 when one fails (and for unusable files, named in the message).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refvllm.errors import ConfigError


@dataclass(frozen=True)
class TypeCheck:
    """One question type of one (plain, ablated) pair. Accuracies and chance are fractions in [0, 1]."""

    name: str
    n: int
    chance: float
    needs_region: bool
    accuracy: float
    ablated: float
    checked: bool  # needs_region and chance <= max_chance
    accuracy_ok: bool
    ablated_ok: bool

    @property
    def ok(self) -> bool:
        return not self.checked or (self.accuracy_ok and self.ablated_ok)


def load_metrics(path: str | Path, ablated: bool) -> dict[str, Any]:
    """METRICS.json written by ``refvllm eval``; its ``run.ablate_regions`` must be ``ablated``."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such metrics file (run `refvllm eval` first)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable METRICS.json ({e})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("per_type"), dict):
        raise ConfigError(f"{path}: not a METRICS.json of `refvllm eval` (no 'per_type')")
    run = metrics.get("run", {})
    if bool(run.get("ablate_regions")) != ablated:
        want = "with" if ablated else "without"
        raise ConfigError(f"{path}: expected an evaluation {want} --ablate-regions (run.ablate_regions is "
                          f"{run.get('ablate_regions')})")
    return metrics


def check_pair(plain: dict[str, Any], ablated: dict[str, Any], min_accuracy: float = 0.9, max_gap: float = 0.1,
               max_chance: float = 0.5, names: tuple[str, str] = ("plain", "ablated")) -> list[TypeCheck]:
    """One :class:`TypeCheck` per question type of ``plain`` (sorted by name). Raises ConfigError when the two
    runs did not score the same data or a type lacks ``chance``/``needs_region`` (not a synthetic-set run)."""
    p_run, a_run = plain.get("run", {}), ablated.get("run", {})
    if p_run.get("data") != a_run.get("data"):
        raise ConfigError(f"{names[0]} scored {p_run.get('data')} but {names[1]} scored {a_run.get('data')}")
    checks = []
    for name in sorted(plain["per_type"]):
        p, a = plain["per_type"][name], ablated["per_type"].get(name)
        if a is None:
            raise ConfigError(f"{names[1]}: question type {name!r} of {names[0]} is missing")
        if p.get("chance") is None or p.get("needs_region") is None:
            raise ConfigError(f"{names[0]}: question type {name!r} has no 'chance'/'needs_region' (only the "
                              "synthetic set's types carry them)")
        chance, acc, abl = float(p["chance"]), float(p["accuracy"]), float(a["accuracy"])
        checked = bool(p["needs_region"]) and chance <= max_chance
        # A little slack for float noise: 0.9 must pass at exactly 27/30.
        checks.append(TypeCheck(name, int(p["n"]), chance, bool(p["needs_region"]), acc, abl, checked,
                                acc >= min_accuracy - 1e-9, abs(abl - chance) <= max_gap + 1e-9))
    return checks


def format_checks(checks: list[TypeCheck], title: str) -> str:
    """The table of one pair: type, n, chance, accuracy, ablated accuracy, and a verdict per checked type."""
    lines = [title, f"{'type':<14}{'n':>5}{'chance%':>9}{'acc%':>8}{'ablated%':>10}  verdict"]
    for c in checks:
        if not c.checked:
            verdict = "not checked (needs no region)" if not c.needs_region else "not checked (chance > max)"
        else:
            faults = ([] if c.accuracy_ok else ["accuracy too low"]) + ([] if c.ablated_ok else
                                                                         ["ablated not near chance"])
            verdict = "ok" if not faults else "FAIL: " + ", ".join(faults)
        lines.append(f"{c.name:<14}{c.n:>5}{100 * c.chance:>9.1f}{100 * c.accuracy:>8.1f}{100 * c.ablated:>10.1f}"
                     f"  {verdict}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="refvllm region-check", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="PLAIN.json ABLATED.json",
                   help="pairs of METRICS.json: an evaluation, then the same with --ablate-regions")
    p.add_argument("--min-accuracy", type=float, default=0.9, help="least accuracy of a region type (0.9)")
    p.add_argument("--max-gap", type=float, default=0.1, help="most distance of ablated accuracy from chance (0.1)")
    p.add_argument("--max-chance", type=float, default=0.5, help="check only types with chance <= this (0.5)")
    args = p.parse_args(argv)
    if len(args.files) % 2:
        p.error("give metrics files in pairs: PLAIN.json ABLATED.json")
    failed = 0
    for plain_path, ablated_path in zip(args.files[::2], args.files[1::2], strict=True):
        plain, ablated = load_metrics(plain_path, False), load_metrics(ablated_path, True)
        checks = check_pair(plain, ablated, args.min_accuracy, args.max_gap, args.max_chance,
                            (plain_path, ablated_path))
        print(format_checks(checks, f"{plain_path} vs {ablated_path}") + "\n")
        failed += sum(not c.ok for c in checks)
    rule = (f"region types >= {100 * args.min_accuracy:.0f}% accuracy, within {100 * args.max_gap:.0f} points of "
            "chance with regions zeroed")
    print(f"region-check: {'PASSED' if not failed else f'FAILED ({failed} checks)'}: {rule}")
    return 0 if not failed else 1
