"""refvllm region-check: per-type verdicts of an evaluation against its --ablate-regions twin."""

from __future__ import annotations

import json

import pytest

from refvllm.cli import main as cli_main
from refvllm.errors import ConfigError
from refvllm.eval.claim import check_pair


def metrics(accuracies: dict[str, float], ablated: bool, data: str = "eval.json") -> dict:
    chance = {"colour": 0.25, "relation": 0.5, "video_count": 1 / 3, "yesno_hard": 0.5, "coin": 0.5}
    needs = {"video_count": False}
    per_type = {t: {"n": 30, "accuracy": a, "chance": chance.get(t, 0.25), "needs_region": needs.get(t, True)}
                for t, a in accuracies.items()}
    return {"overall": {}, "per_type": per_type, "run": {"data": data, "ablate_regions": ablated}}


def by_name(checks):
    return {c.name: c for c in checks}


def test_verdicts_per_type():
    plain = metrics({"colour": 0.9, "relation": 0.97, "video_count": 0.5, "motion": 0.89}, False)
    ablated = metrics({"colour": 0.05, "relation": 0.6, "video_count": 0.5, "motion": 0.35}, True)
    checks = by_name(check_pair(plain, ablated))
    assert checks["colour"].accuracy_ok and not checks["colour"].ablated_ok  # 20 points below chance fails too
    assert checks["relation"].ok  # exactly 10 points above chance passes
    assert checks["motion"].ablated_ok and not checks["motion"].accuracy_ok and not checks["motion"].ok
    assert not checks["video_count"].checked and checks["video_count"].ok  # needs no region: reported only


def test_types_above_max_chance_are_not_checked():
    checks = by_name(check_pair(metrics({"coin": 0.5}, False), metrics({"coin": 0.5}, True), max_chance=0.4))
    assert not checks["coin"].checked and checks["coin"].ok


def test_pairs_must_score_the_same_data_and_carry_chance():
    with pytest.raises(ConfigError, match="scored eval.json but ablated scored other.json"):
        check_pair(metrics({"colour": 1.0}, False), metrics({"colour": 0.25}, True, data="other.json"))
    plain = metrics({"colour": 1.0}, False)
    del plain["per_type"]["colour"]["chance"]
    with pytest.raises(ConfigError, match="'colour' has no 'chance'"):
        check_pair(plain, metrics({"colour": 0.25}, True))


def write(path, m):
    path.write_text(json.dumps(m))
    return str(path)


def test_cli_exit_codes_and_table(tmp_path, capsys):
    plain = write(tmp_path / "m.json", metrics({"colour": 1.0, "video_count": 1.0}, False))
    good = write(tmp_path / "a.json", metrics({"colour": 0.3, "video_count": 1.0}, True))
    bad = write(tmp_path / "b.json", metrics({"colour": 0.9, "video_count": 1.0}, True))
    assert cli_main(["region-check", plain, good]) == 0
    out = capsys.readouterr().out
    assert "colour" in out and "PASSED" in out and "not checked (needs no region)" in out
    assert cli_main(["region-check", plain, good, plain, bad]) == 1
    assert "FAIL: ablated not near chance" in capsys.readouterr().out


def test_cli_user_errors_name_the_file(tmp_path, capsys):
    plain = write(tmp_path / "m.json", metrics({"colour": 1.0}, False))
    assert cli_main(["region-check", plain, plain]) == 1  # second file is not an ablated run
    assert "m.json: expected an evaluation with --ablate-regions" in capsys.readouterr().err
    assert cli_main(["region-check", plain, str(tmp_path / "missing.json")]) == 1
    assert "missing.json: no such metrics file" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert cli_main(["region-check", str(tmp_path / "broken.json"), plain]) == 1
    assert "broken.json: not a readable METRICS.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["region-check", plain])
    assert e.value.code == 2
