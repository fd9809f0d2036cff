"""Option-letter extraction, exact match / token F1, per-type aggregation, the results table."""

import json

import pytest

from refvllm.eval.metrics import (
    Scored,
    aggregate,
    answer_kind,
    exact_match,
    extract_choice,
    normalize_answer,
    score_answer,
    split_option,
    token_f1,
)
from refvllm.eval.report import predictions_path, results_table, write_metrics, write_predictions

OPTIONS = ["(A) a blue car", "(B) a red car", "(C) the dog", "(D) none of them"]


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("(B)", "B"),
        ("(b) a red car", "B"),
        ("B", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B: a red car", "B"),
        ("Answer: B", "B"),
        ("answer:(C)", "C"),
        ("the answer is b", "B"),
        ("The answer is D because nothing matches.", "D"),
        ("Option A", "A"),
        ("b", "B"),
        ("  c.  ", "C"),
        ("red car", "B"),  # full option text, articles ignored
        ("A red car", "B"),  # "A" here is an article, and the text names option B
        ("B red car", "B"),
        ("It is the dog.", "C"),  # exactly one option's text inside
        ("the answer is a dog", "C"),  # lower-case "a" followed by a word is an article, not option A
    ],
)
def test_extract_choice_accepts_common_forms(prediction, letter):
    assert extract_choice(prediction, OPTIONS) == letter


@pytest.mark.parametrize("prediction", ["", "I do not know", "E", "(F)", "a car", "blue car or red car"])
def test_extract_choice_returns_none_when_no_option_is_named(prediction):
    assert extract_choice(prediction, OPTIONS) is None


def test_extract_choice_without_options_reads_letters_only():
    assert extract_choice("(c)") == "C"
    assert extract_choice("the answer is E") == "E"
    assert extract_choice("red car") is None


def test_split_option():
    assert split_option("(B) a red car") == ("B", "a red car")
    assert split_option("C. a dog") == ("C", "a dog")
    assert split_option("plain text") == (None, "plain text")


def test_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Red, car!") == "red car"
    assert exact_match("Red.", "red") == 1.0
    assert exact_match("red car", "red") == 0.0
    assert token_f1("a red car moving left", "the red car") == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 1))
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_score_kinds():
    assert answer_kind("(A) x", OPTIONS) == "choice"
    assert answer_kind("moving left", None) == "short"
    assert answer_kind("a person in a red coat walks to the left", None) == "free"
    s = score_answer("Answer: (B)", "(B) a red car", OPTIONS)
    assert s.kind == "choice" and s.correct is True and s.extracted == "B"
    assert score_answer("A", "(B) a red car", OPTIONS).correct is False
    assert score_answer("Red.", "red").correct is True
    assert score_answer("green", "red").correct is False
    free = score_answer("a man walks left slowly", "a man in a coat walks to the left")
    assert free.correct is None and 0 < free.f1 < 1


def _scored(qtype, prediction, reference, chance=None, needs_region=None, options=None):
    return Scored(qtype, score_answer(prediction, reference, options), chance, needs_region)


def test_aggregate_per_type_and_overall():
    items = [
        _scored("color", "red", "red", 0.25, True),
        _scored("color", "blue", "red", 0.25, True),
        _scored("color", "red", "red", 0.25, True),
        _scored("motion", "left", "left", 0.5, True),
        _scored("scene", "a dog runs on the grass", "a dog runs across the grass field", None, False),
    ]
    metrics = aggregate(items, bad_per_type={"motion": 2})
    color, motion, scene = (metrics["per_type"][t] for t in ("color", "motion", "scene"))
    assert color["accuracy"] == pytest.approx(2 / 3) and color["n"] == 3 and color["chance"] == 0.25
    assert color["needs_region"] is True and color["num_bad"] == 0
    assert motion["accuracy"] == 1.0 and motion["num_bad"] == 2 and motion["chance"] == 0.5
    assert scene["accuracy"] is None and scene["n_graded"] == 0 and scene["needs_region"] is False
    assert 0 < scene["f1"] < 1
    overall = metrics["overall"]
    assert overall["n"] == 5 and overall["n_graded"] == 4 and overall["num_bad"] == 2
    assert overall["accuracy"] == pytest.approx(3 / 4)  # micro average over graded samples
    assert overall["macro_accuracy"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_aggregate_mixed_needs_region_is_none_and_bad_only_type_is_listed():
    items = [_scored("t", "x", "x", needs_region=True), _scored("t", "x", "y", needs_region=False)]
    metrics = aggregate(items, bad_per_type={"other": 1})
    assert metrics["per_type"]["t"]["needs_region"] is None
    assert metrics["per_type"]["other"] == {
        "n": 0, "accuracy": None, "n_graded": 0, "exact_match": None, "f1": None, "chance": None,
        "needs_region": None, "num_bad": 1,
    }


def test_results_table_and_files(tmp_path):
    metrics = aggregate([_scored("color", "red", "red", 0.25, True), _scored("motion", "up", "left", 0.5, True)])
    table = results_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["type", "n", "bad", "acc%", "chance%", "region", "EM%", "F1%"]
    assert lines[2].split()[:6] == ["color", "1", "0", "100.0", "25.0", "yes"]
    assert lines[3].split()[:6] == ["motion", "1", "0", "0.0", "50.0", "yes"]
    assert lines[4].split()[:4] == ["OVERALL", "2", "0", "50.0"]
    out = tmp_path / "eval" / "metrics.json"
    assert predictions_path(out) == tmp_path / "eval" / "metrics.predictions.jsonl"
    write_metrics(out, metrics)
    assert json.loads(out.read_text())["overall"]["accuracy"] == 0.5
    write_predictions(predictions_path(out), [{"id": "a", "prediction": "é"}, {"id": "b"}])
    rows = [json.loads(line) for line in predictions_path(out).read_text(encoding="utf-8").splitlines()]
    assert rows == [{"id": "a", "prediction": "é"}, {"id": "b"}]
