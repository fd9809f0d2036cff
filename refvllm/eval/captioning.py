"""Reference-based caption metrics for region captioning (``--format caption``): BLEU-4, ROUGE-L, CIDEr-D.

The definitions are those of the COCO caption evaluation code (pycocoevalcap), which the region-captioning
tables (e.g. HC-STVG region captioning, as Artemis and later referring video-LLMs report it) are computed with:

- **BLEU-4**: corpus level; clipped n-gram matches and candidate n-grams summed over the corpus for n = 1..4,
  their geometric mean (``+1e-15`` / ``+1e-9`` against empty counts), times the brevity penalty
  ``exp(1 - r/c)`` when the corpus's candidates are shorter than its references; r sums, per sample, the
  reference length closest to the candidate's (the shorter on a tie).
- **ROUGE-L**: per sample, the longest common subsequence against each reference; precision ``max_ref
  lcs/len(candidate)``, recall ``max_ref lcs/len(reference)``, F with beta = 1.2; the mean over samples.
- **CIDEr-D**: n-grams n = 1..4 weighted by tf-idf (document frequency over the samples' reference sets, idf
  ``log(N) - log(df)``), per n the cosine of candidate and reference vectors with the candidate's weights
  clipped at the reference's, times ``exp(-(l_c - l_r)^2 / (2 * 6^2))`` (l: the number of bigrams), averaged
  over references and n, times 10; the mean over samples.

Tokenisation differs: pycocoevalcap runs the Stanford PTB tokenizer (Java); here text is lower-cased, every
ASCII punctuation character becomes a space, and the rest is split on whitespace. For plain sentences both give
the same tokens; contractions ("don't": PTB "do n't", here "don t") and hyphenated words ("left-hand": PTB one
token, here two) differ. METEOR needs Java and WordNet and is not computed.
"""

from __future__ import annotations

import math
import string
from collections import Counter

MAX_N = 4
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def tokenize(text: str) -> list[str]:
    """Lower case, ASCII punctuation to spaces, split on whitespace (see the module docstring)."""
    return text.lower().translate(_PUNCT).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(candidates: list[list[str]], references: list[list[list[str]]]) -> float:
    """Corpus BLEU-4 of tokenised candidates against their tokenised references (module docstring)."""
    correct, guessed = [0] * MAX_N, [0] * MAX_N
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
        for n in range(1, MAX_N + 1):
            counts = _ngrams(cand, n)
            most = Counter()
            for r in refs:
                most |= _ngrams(r, n)  # the most times any one reference holds each n-gram
            correct[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            guessed[n - 1] += max(len(cand) - n + 1, 0)
    product = 1.0
    for n in range(MAX_N):
        product *= (correct[n] + 1e-15) / (guessed[n] + 1e-9)
    score = product ** (1.0 / MAX_N)
    ratio = (cand_len + 1e-15) / (ref_len + 1e-9)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # the row above, one column to the left
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: list[str], references: list[list[str]]) -> float:
    """ROUGE-L F (beta 1.2) of one candidate against its references (module docstring)."""
    if not candidate:
        return 0.0
    lcs = [_lcs(candidate, r) for r in references]
    precision = max(v / len(candidate) for v in lcs)
    recall = max(v / len(r) for v, r in zip(lcs, references, strict=True) if r) if any(references) else 0.0
    if precision == 0 or recall == 0:
        return 0.0
    b2 = ROUGE_BETA**2
    return (1 + b2) * precision * recall / (recall + b2 * precision)


def _tfidf(tokens: list[str], df: Counter, log_n: float) -> tuple[list[dict], list[float], int]:
    """Per n: tf-idf weights, their norm; and the number of bigrams (CIDEr-D's length)."""
    vectors, norms = [], []
    for n in range(1, MAX_N + 1):
        vec = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in _ngrams(tokens, n).items()}
        vectors.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vectors, norms, max(len(tokens) - 1, 0)


def cider_d(candidates: list[list[str]], references: list[list[list[str]]]) -> float:
    """Corpus CIDEr-D (x10, sigma 6) of tokenised candidates against their tokenised references."""
    df: Counter = Counter()
    for refs in references:
        df.update({g for r in refs for n in range(1, MAX_N + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(len(references))) if references else 0.0
    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        c_vec, c_norm, c_len = _tfidf(cand, df, log_n)
        total = [0.0] * MAX_N
        for r in refs:
            r_vec, r_norm, r_len = _tfidf(r, df, log_n)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(MAX_N):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in c_vec[n].items())
                if c_norm[n] and r_norm[n]:
                    dot /= c_norm[n] * r_norm[n]
                total[n] += dot * penalty
        scores.append(10.0 * sum(total) / MAX_N / len(refs))
    return sum(scores) / len(scores) if scores else 0.0


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float | int | None]:
    """``{"n", "bleu4", "rouge_l", "cider"}`` of predictions against their references (each a list of
    strings); None for every score without predictions."""
    if not predictions:
        return {"n": 0, "bleu4": None, "rouge_l": None, "cider": None}
    cands = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in rs] for rs in references]
    return {"n": len(cands), "bleu4": bleu4(cands, refs),
            "rouge_l": sum(rouge_l(c, r) for c, r in zip(cands, refs, strict=True)) / len(cands),
            "cider": cider_d(cands, refs)}
