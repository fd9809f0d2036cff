"""Scoring of generated answers: option-letter extraction, exact match, token F1, per-type aggregation.

Pure Python, no torch. Each evaluated sample is scored on its own by :func:`score_answer` into a
:class:`Score`; :func:`aggregate` then groups scores by question type.

How a sample is scored depends on its reference answer:

- ``choice``: multiple choice (the sample has ``options``): the predicted option letter is extracted with
  :func:`extract_choice` and compared with the reference letter. ``correct`` is set.
- ``short``: a reference of at most :data:`SHORT_ANSWER_WORDS` words (e.g. "red", "moving left"): ``correct`` is
  the normalised exact match.
- ``free``: anything longer: no ``correct``; exact match and token F1 only.

Every sample also gets ``exact_match`` and ``f1`` (SQuAD-style normalisation: lower case, no punctuation, no
articles). Accuracy of a type is the mean of ``correct`` over its ``choice``/``short`` samples.

Two rules read a multiple-choice answer (:data:`CHOICE_RULES`): ``refvllm`` (:func:`extract_choice`, lenient
about wording, strict about naming exactly one option) and ``videorefer`` (:func:`videorefer_choice`, the
published VideoRefer-Bench-Q scorer's rule, for figures that sit in its tables). The evaluation picks the
headline rule per format (bench-q: videorefer) and reports the other beside it (``accuracy_refvllm``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

SHORT_ANSWER_WORDS = 3  # references with at most this many words are scored by exact match as accuracy
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Za-z])\)\s*|^\s*([A-Z])[.:]\s+")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, articles removed, whitespace collapsed (SQuAD-style)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (bag of words). Two empties -> 1.0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def split_option(option: str) -> tuple[str | None, str]:
    """``"(B) a red car"`` -> ``("B", "a red car")``; ``"B. text"`` -> ``("B", "text")``; else ``(None, text)``."""
    m = _OPTION_PREFIX.match(option)
    if not m:
        return None, option.strip()
    return (m.group(1) or m.group(2)).upper(), option[m.end():].strip()


def option_letters(options: list[str]) -> list[str]:
    """The letter of each option: its own ``(X)`` prefix when present, else A, B, C... by position."""
    return [split_option(o)[0] or chr(ord("A") + i) for i, o in enumerate(options)]


_LEAD = r"(?i:\b(?:answer|option|choice)\b)\s*(?:is\s*)?:?\s*"
_CHOICE_RULES = [
    re.compile(r"\(([A-Za-z])\)"),  # (B) anywhere
    re.compile(_LEAD + r"\(?([A-Z])\b(?!['\u2019])"),  # Answer: B / the answer is B because...
    # a lower-case letter only when nothing follows it: "the answer is a dog" names no option
    re.compile(_LEAD + r"\(?([a-z])\)?\s*[.,;!]?\s*$"),
    re.compile(r"^([A-Z])[.):,]?\s*$"),  # B  B.  B)
    re.compile(r"^([A-Z])[.):,]\s"),  # B. text  B) text
    re.compile(r"^([a-z])[.):]?\s*$"),  # b  b.  alone
]


def _valid(letter: str, letters: list[str] | None) -> bool:
    return letters is None or letter in letters


def _match_option_text(text: str, options: list[str], letters: list[str]) -> str | None:
    """The letter whose option text equals ``text`` (normalised), or the only option text contained in it."""
    norm = normalize_answer(text)
    if not norm:
        return None
    texts = [normalize_answer(split_option(o)[1]) for o in options]
    for letter, opt in zip(letters, texts, strict=True):
        if opt and norm == opt:
            return letter
    contained = [
        letter for letter, opt in zip(letters, texts, strict=True) if opt and re.search(rf"\b{re.escape(opt)}\b", norm)
    ]
    return contained[0] if len(contained) == 1 else None


def extract_choice(prediction: str, options: list[str] | None = None) -> str | None:
    """The option letter (upper case) a free-text prediction chooses, or None when it names none clearly.

    Accepts "(B)", "(b) text", "B", "B.", "B)", "B: text", "Answer: B", "the answer is b", "Option B", and, when
    ``options`` are given, the full text of one option ("red car" for "(B) red car", articles ignored) or a
    prediction that contains exactly one option's text. With ``options`` only their letters count.
    """
    text = prediction.strip()
    letters = option_letters(options) if options else None
    for rule in _CHOICE_RULES:
        m = rule.search(text)
        if m and _valid(m.group(1).upper(), letters):
            return m.group(1).upper()
    if options:
        m = re.match(r"^([A-Z])\s+(.+)$", text, flags=re.S)  # "B red car"
        if m and m.group(1) in letters and _match_option_text(m.group(2), options, letters) == m.group(1):
            return m.group(1)
        return _match_option_text(text, options, letters)
    return None


_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_LETTER_PAREN = re.compile(r"([A-Z])\)")


def videorefer_choice(prediction: str) -> str | None:
    """The letter the published VideoRefer-Bench-Q scorer reads from a prediction: ``(X)`` anywhere (capital
    X), else ``X)`` anywhere, else the first character of the prediction with every ``.`` removed, whatever it
    is ("The answer is B." reads "T", "An animal runs" reads "A"). Upper-cased here (the scorer compares case
    insensitively); None for a prediction that is empty after removing dots (where the scorer would crash)."""
    for rule in (_PAREN_LETTER, _LETTER_PAREN):
        m = rule.search(prediction)
        if m:
            return m.group(1)
    text = prediction.replace(".", "")
    return text[0].upper() if text else None


def videorefer_reference(answer: str) -> str:
    """The scorer's reading of a reference ``Answer``: the letter of its ``(X)``, else the whole string."""
    m = _PAREN_LETTER.search(answer)
    return m.group(1) if m else answer.upper()


CHOICE_RULES = {
    "refvllm": "refvllm's extractor (refvllm.eval.metrics.extract_choice): (X) anywhere, 'Answer/Option X', a "
               "lone or leading letter, or the text of exactly one option; else no answer (wrong)",
    "videorefer": "the published VideoRefer-Bench-Q scorer: (X) anywhere, else X) anywhere, else the first "
                  "character of the prediction with dots removed",
}


@dataclass
class Score:
    """One sample's score. ``correct`` is None for free-form answers (no accuracy). For multiple choice,
    ``correct`` follows the headline rule and ``correct_refvllm`` / ``correct_videorefer`` each rule."""

    kind: str  # choice | short | free
    exact_match: float
    f1: float
    correct: bool | None
    extracted: str | None = None  # the chosen letter (choice, headline rule) or None
    correct_refvllm: bool | None = None
    correct_videorefer: bool | None = None
    extracted_videorefer: str | None = None


def answer_kind(reference: str, options: list[str] | None) -> str:
    """choice (options given) | short (at most SHORT_ANSWER_WORDS words) | free."""
    if options:
        return "choice"
    return "short" if len(normalize_answer(reference).split()) <= SHORT_ANSWER_WORDS else "free"


def score_answer(prediction: str, reference: str, options: list[str] | None = None,
                 choice_rule: str = "refvllm") -> Score:
    """Score one prediction against its reference (see the module docstring for the three kinds); a
    multiple-choice answer by both rules, ``choice_rule`` deciding ``correct``."""
    if choice_rule not in CHOICE_RULES:
        raise ValueError(f"unknown choice rule {choice_rule!r}; choose one of {', '.join(CHOICE_RULES)}")
    kind = answer_kind(reference, options)
    em, f1 = exact_match(prediction, reference), token_f1(prediction, reference)
    if kind == "choice":
        gold = extract_choice(reference, options)
        chosen = extract_choice(prediction, options)
        ours = chosen is not None and chosen == gold
        theirs_letter = videorefer_choice(prediction)
        theirs = theirs_letter is not None and theirs_letter == videorefer_reference(reference)
        correct, letter = (theirs, theirs_letter) if choice_rule == "videorefer" else (ours, chosen)
        return Score(kind, em, f1, correct, letter, ours, theirs, theirs_letter)
    if kind == "short":
        return Score(kind, em, f1, em == 1.0)
    return Score(kind, em, f1, None)


@dataclass
class Scored:
    """A scored sample for aggregation: its question type and the synthetic set's per-sample facts."""

    type: str
    score: Score
    chance: float | None = None  # chance accuracy of this question (e.g. 1 / number of options)
    needs_region: bool | None = None  # whether the answer depends on a region


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _consistent(values: list[Any]) -> Any:
    """The common value when all agree (None values ignored), else None."""
    known = {v for v in values if v is not None}
    return known.pop() if len(known) == 1 else None


def _group_metrics(items: list[Scored]) -> dict[str, Any]:
    graded = [s.score.correct for s in items if s.score.correct is not None]
    chances = [s.chance for s in items if s.chance is not None]
    by_rule = {f"accuracy_{rule}": _mean([float(c) for s in items
                                          if (c := getattr(s.score, f"correct_{rule}")) is not None])
               for rule in CHOICE_RULES}
    return {
        "n": len(items),
        "accuracy": _mean([float(c) for c in graded]),
        **by_rule,
        "n_graded": len(graded),
        "exact_match": _mean([s.score.exact_match for s in items]),
        "f1": _mean([s.score.f1 for s in items]),
        "chance": _mean(chances),
        "needs_region": _consistent([s.needs_region for s in items]),
    }


def aggregate(items: list[Scored], bad_per_type: dict[str, int] | None = None) -> dict[str, Any]:
    """``{"overall": {...}, "per_type": {type: {...}}}`` from scored samples.

    Per type and overall: ``n`` (scored samples), ``accuracy`` (mean of ``correct`` over the ``n_graded``
    choice/short samples; None when there are none), ``exact_match``, ``f1``, ``chance`` (mean of the samples'
    chance levels, None when unknown), ``needs_region`` (the samples' common value, None when unknown or mixed)
    and ``num_bad`` (samples of this type that could not be evaluated), and ``accuracy_refvllm`` /
    ``accuracy_videorefer``: the multiple-choice samples' accuracy by each rule (None without such samples).
    ``overall.accuracy`` is the micro average over all graded samples (as VideoRefer-Bench-Q's published
    average); ``overall.macro_accuracy`` the mean of the per-type accuracies.
    """
    bad_per_type = bad_per_type or {}
    by_type: dict[str, list[Scored]] = {}
    for item in items:
        by_type.setdefault(item.type, []).append(item)
    per_type = {}
    for name in sorted(set(by_type) | set(bad_per_type)):
        per_type[name] = _group_metrics(by_type.get(name, [])) | {"num_bad": bad_per_type.get(name, 0)}
    overall = _group_metrics(items) | {"num_bad": sum(bad_per_type.values())}
    overall["macro_accuracy"] = _mean([m["accuracy"] for m in per_type.values() if m["accuracy"] is not None])
    overall.pop("needs_region")
    return {"overall": overall, "per_type": per_type}
