"""An LLM judge for descriptions (VideoRefer-Bench-D style) through any OpenAI-compatible endpoint.

Standard library only (urllib): ``POST {endpoint}/chat/completions`` with ``model``, ``temperature`` and
``messages``; the reply's ``choices[0].message.content`` must give four scores from 0 to 5 (JSON object or
``Name: score`` lines). Transient failures (connection errors, timeouts, HTTP 408/409/429/5xx, a reply without
the four scores) are retried at most ``max_retries`` times with exponential back-off; an authentication or
not-found error stops at once with a :class:`~refvllm.errors.ConfigError`, since every later request would fail
the same way.

Off by default: :func:`judge_from_config` returns None when ``eval.judge_endpoint`` is empty, and
:data:`NO_JUDGE_MESSAGE` tells the user how to turn it on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from refvllm.config import EvalConfig
from refvllm.errors import ConfigError, RefvllmError

DIMENSIONS = ("subject_correspondence", "appearance", "temporal", "hallucination")
DIMENSION_LABELS = {
    "subject_correspondence": "Subject Correspondence",
    "appearance": "Appearance Description",
    "temporal": "Temporal Description",
    "hallucination": "Hallucination Detection",
}
NO_JUDGE_MESSAGE = (
    "judge: off (no eval.judge_endpoint). Descriptions were generated but not scored; to score them, pass "
    "eval.judge_endpoint=URL eval.judge_model=NAME (an OpenAI-compatible server; the API key is read from the "
    "environment variable named by eval.judge_api_key_env)"
)
SYSTEM_PROMPT = """You are an expert judge of video object descriptions. You get a correct description of one \
object in a video and a predicted description of the same object. Score the prediction from 0 to 5 (integers; \
5 is best) on four dimensions:
1. Subject Correspondence: does the prediction describe the same subject (category, identity) as the correct one?
2. Appearance Description: how accurately does it describe the object's appearance (colour, shape, clothing, size)?
3. Temporal Description: how accurately does it describe the object's actions and motion over time?
4. Hallucination Detection: 5 means no invented details; lower for each detail not supported by the correct one.
Answer with one JSON object and nothing else:
{"subject_correspondence": S, "appearance": A, "temporal": T, "hallucination": H}"""

# Bump when SYSTEM_PROMPT or the user message changes: the metrics record it beside the judge model, so that
# figures made with different prompts are never averaged or compared unawares.
PROMPT_VERSION = "refvllm-bench-d-v1"

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeReplyError(RefvllmError):
    """The judge answered, but not with four scores in 0..5."""


@dataclass
class JudgeResult:
    """Four scores (0..5) of one prediction, and the judge's raw reply (kept for auditing)."""

    scores: dict[str, float]
    raw: str


def _label_key(name: str) -> str | None:
    """Map a dimension name as a judge may write it ("Appearance Description", "appearance") to its key."""
    norm = re.sub(r"[^a-z]+", "_", name.lower()).strip("_")
    for key, label in DIMENSION_LABELS.items():
        if norm in (key, re.sub(r"[^a-z]+", "_", label.lower())) or norm.startswith(key):
            return key
    return None


def _check_scores(found: dict[str, Any], raw: str) -> dict[str, float]:
    missing = [d for d in DIMENSIONS if d not in found]
    if missing:
        raise JudgeReplyError(f"judge reply lacks {', '.join(missing)}: {raw[:200]!r}")
    scores = {}
    for key in DIMENSIONS:
        value = found[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 5:
            raise JudgeReplyError(f"judge score {key}={value!r} is not a number in 0..5: {raw[:200]!r}")
        scores[key] = float(value)
    return scores


def parse_scores(content: str) -> dict[str, float]:
    """The four 0..5 scores in a judge reply: a JSON object (possibly inside text or a code fence) or lines like
    ``Subject Correspondence: 4``. Raises JudgeReplyError when any score is missing or out of range."""
    found: dict[str, Any] = {}
    m = re.search(r"\{.*?\}", content, flags=re.S)
    if m:
        try:
            data = json.loads(m.group(0))
        except json.JSONDecodeError:
            data = {}
        if isinstance(data, dict):
            found = {k: v for name, v in data.items() if (k := _label_key(str(name)))}
    if len(found) < len(DIMENSIONS):
        for name, value in re.findall(r"([A-Za-z][A-Za-z _-]*?)\s*[:=]\s*(-?\d+(?:\.\d+)?)", content):
            key = _label_key(name)
            if key and key not in found:
                found[key] = float(value)
    return _check_scores(found, content)


class JudgeClient:
    """Scores (reference, prediction) pairs on the four dimensions through an OpenAI-compatible endpoint.

    ``endpoint`` is the API's base URL (e.g. ``http://127.0.0.1:8000/v1``); requests go to
    ``{endpoint}/chat/completions``. ``sleep`` is injectable so tests need not wait for back-off.
    """

    def __init__(self, endpoint: str, model: str, temperature: float = 0.0, api_key: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0, sleep=time.sleep):
        if not endpoint:
            raise ConfigError(NO_JUDGE_MESSAGE)
        if not model:
            raise ConfigError("config key 'eval.judge_model' must name the judge model when eval.judge_endpoint is set")
        if max_retries < 0 or timeout_s <= 0:
            raise ConfigError("config keys 'eval.judge_max_retries' must be >= 0 and 'eval.judge_timeout_s' > 0")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.api_key = model, temperature, api_key
        self.timeout_s, self.max_retries, self.backoff_s, self._sleep = timeout_s, max_retries, backoff_s, sleep

    @property
    def settings(self) -> dict[str, Any]:
        """What to record next to the scores: endpoint, model, temperature, the prompt's version and digest."""
        digest = hashlib.sha1(json.dumps(self.messages("{reference}", "{prediction}")).encode()).hexdigest()[:12]
        return {"endpoint": self.url, "model": self.model, "temperature": self.temperature,
                "prompt_version": PROMPT_VERSION, "prompt_sha1": digest, "max_retries": self.max_retries}

    def messages(self, reference: str, prediction: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"##Correct description: {reference}\n##Predicted description: {prediction}"},
        ]

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def _attempt(self, body: dict[str, Any]) -> JudgeResult:
        """One request; raises JudgeReplyError / OSError for what may be retried, ConfigError for what may not."""
        try:
            reply = self._post(body)
        except urllib.error.HTTPError as e:
            if e.code in _RETRY_STATUS:
                raise OSError(f"HTTP {e.code} from {self.url}") from None
            raise ConfigError(f"judge endpoint {self.url} answered HTTP {e.code} ({e.reason}); check "
                              "eval.judge_endpoint, eval.judge_model and the API key") from None
        except json.JSONDecodeError as e:
            raise JudgeReplyError(f"judge reply is not JSON: {e}") from None
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeReplyError(f"judge reply has no choices[0].message.content: {str(reply)[:200]}") from None
        return JudgeResult(parse_scores(str(content)), str(content))

    def score(self, reference: str, prediction: str) -> JudgeResult:
        """Scores of one prediction. Raises JudgeReplyError after ``1 + max_retries`` failed attempts."""
        body = {"model": self.model, "temperature": self.temperature, "messages": self.messages(reference, prediction)}
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._attempt(body)
            except (OSError, JudgeReplyError) as e:  # URLError, timeouts and connection resets are OSErrors
                last = str(e)
            if attempt < self.max_retries:
                self._sleep(self.backoff_s * 2**attempt)
        raise JudgeReplyError(f"judge failed after {self.max_retries + 1} attempts: {last}")


def judge_from_config(cfg: EvalConfig, sleep=time.sleep) -> JudgeClient | None:
    """A client for ``cfg.judge_*``, or None when no endpoint is configured (the judge is off by default)."""
    if not cfg.judge_endpoint:
        return None
    api_key = os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None
    return JudgeClient(cfg.judge_endpoint, cfg.judge_model, cfg.judge_temperature, api_key,
                       timeout_s=cfg.judge_timeout_s, max_retries=cfg.judge_max_retries, sleep=sleep)


def judge_predictions(client: JudgeClient, records: list[dict[str, Any]], progress=None,
                      num_entries: int | None = None) -> dict[str, Any]:
    """Score each record's ``prediction`` against its ``reference`` in place (``judge`` key: scores or error).

    Returns the summary recorded in the metrics: the judge's settings, ``n_scored``, ``n_failed`` (judgements
    still failed or unparsable after the retries), ``coverage`` (scored / ``num_entries``, every entry of the
    file, default the records given: a description that could not be generated counts against it too), the
    mean of each dimension over the scored records and ``average`` (the mean of the four means, as the
    benchmark reports), and ``average_failed_as_zero`` (the same with every unscored entry counted 0: the
    lower bound when coverage is short).
    """
    totals = {d: 0.0 for d in DIMENSIONS}
    scored = failed = 0
    for record in records:
        try:
            result = client.score(record["reference"], record["prediction"])
        except JudgeReplyError as e:
            record["judge"] = {"error": str(e)}
            failed += 1
        else:
            record["judge"] = result.scores
            for d in DIMENSIONS:
                totals[d] += result.scores[d]
            scored += 1
        if progress is not None:
            progress.update(1)
    total = len(records) if num_entries is None else num_entries
    means = {d: (totals[d] / scored if scored else None) for d in DIMENSIONS}
    average = sum(means.values()) / len(DIMENSIONS) if scored else None
    as_zero = sum(totals.values()) / len(DIMENSIONS) / total if total else None
    return client.settings | {"n_scored": scored, "n_failed": failed, "n_entries": total,
                              "coverage": scored / total if total else None, "scores": means, "average": average,
                              "average_failed_as_zero": as_zero}
