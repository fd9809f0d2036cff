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
        "n": 0, "accuracy": None, "accuracy_refvllm": None, "accuracy_videorefer": None, "n_graded": 0,
        "exact_match": None, "f1": None, "chance": None, "needs_region": None, "num_bad": 1,
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


# ------------------------------------------------------------------ Bench-Q: the published rule beside refvllm's

BENCH_Q_OPTIONS = ["(A) A cat sits", "(B) The dog runs", "(C) A bird flies", "(D) The man walks away"]

# (prediction, letter by the published VideoRefer-Bench-Q scorer, letter by refvllm's extractor)
BENCH_Q_ANSWERS = [
    ("(B) The dog runs.", "B", "B"),
    ("B", "B", "B"),
    ("B.", "B", "B"),
    ("B) the dog", "B", "B"),
    ("b", "B", "B"),
    ("I think (C) is right", "C", "C"),
    ("D. The man walks away", "D", "D"),
    ("(A) or (B)", "A", "A"),  # both take the first (X)
    ("A cat sits", "A", "A"),  # the published rule by its first letter, refvllm by the option's text
    ("The answer is B.", "T", "B"),  # the published rule reads the first character
    ("An animal runs", "A", None),  # ... which counts an article as option A
    ("The dog runs", "T", "B"),  # refvllm matches the option text
    ("Option B", "O", "B"),
    ("Answer: C", "A", "C"),
    ("(b)", "(", "B"),  # the published (X) wants a capital
    ("B because the dog moves", "B", None),  # refvllm wants a clear choice
    ("Based on the video, B", "B", None),  # the published rule is right by accident ("B" of "Based")
    ("...B", "B", None),  # dots removed first
    ("", None, None),
    ("C", "C", "C"),
]


@pytest.mark.parametrize("prediction, published, ours", BENCH_Q_ANSWERS)
def test_both_choice_rules_on_typical_answers(prediction, published, ours):
    from refvllm.eval.metrics import videorefer_choice

    assert videorefer_choice(prediction) == published
    assert extract_choice(prediction, BENCH_Q_OPTIONS) == ours
    score = score_answer(prediction, "(B) The dog runs", BENCH_Q_OPTIONS, choice_rule="videorefer")
    assert score.correct is (published == "B") and score.correct_videorefer is score.correct
    assert score.correct_refvllm is (ours == "B") and score.extracted == published
    assert score_answer(prediction, "(B) The dog runs", BENCH_Q_OPTIONS).correct is (ours == "B")  # default rule


def test_the_two_rules_disagree_on_a_third_of_typical_answers_and_both_figures_are_reported():
    disagree = [p for p, published, ours in BENCH_Q_ANSWERS if (published == "B") != (ours == "B")]
    assert len(disagree) == 7  # of 20: a figure by one rule cannot sit in a table made by the other
    items = [Scored("attribute", score_answer(p, "(B) The dog runs", BENCH_Q_OPTIONS, "videorefer"), 0.25, True)
             for p, _, _ in BENCH_Q_ANSWERS]
    overall = aggregate(items)["overall"]
    published_right = sum(published == "B" for _, published, _ in BENCH_Q_ANSWERS)
    ours_right = sum(ours == "B" for _, _, ours in BENCH_Q_ANSWERS)
    assert overall["accuracy"] == overall["accuracy_videorefer"] == pytest.approx(published_right / 20)
    assert overall["accuracy_refvllm"] == pytest.approx(ours_right / 20)
    assert (published_right, ours_right) == (8, 9)


def test_the_published_rule_reads_the_reference_like_the_scorer():
    from refvllm.eval.metrics import videorefer_reference

    assert videorefer_reference("(C) A bird flies") == "C"
    assert videorefer_reference("c") == "C"  # no (X): the whole answer, compared case-insensitively
