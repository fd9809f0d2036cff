"""The judge client against a stub OpenAI-compatible server on 127.0.0.1 (started here, one per test)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from refvllm.config import load_config
from refvllm.errors import ConfigError
from refvllm.eval.judge import (
    DIMENSIONS,
    NO_JUDGE_MESSAGE,
    PROMPT_VERSION,
    JudgeClient,
    JudgeReplyError,
    judge_from_config,
    judge_predictions,
    parse_scores,
)

GOOD = '{"subject_correspondence": 4, "appearance": 3, "temporal": 2.5, "hallucination": 5}'


class StubServer:
    """Answers POST /v1/chat/completions with the queued (status, content) replies, recording every request."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                status, content = stub.replies.pop(0) if stub.replies else (500, "")
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _client(endpoint, sleeps=None, **kw):
    return JudgeClient(endpoint, "judge-x", temperature=0.2, api_key="k123", timeout_s=5,
                       sleep=(sleeps.append if sleeps is not None else lambda s: None), **kw)


def test_scores_request_shape_and_auth():
    with StubServer([(200, GOOD)]) as stub:
        result = _client(stub.endpoint).score("a red car drives left", "a red car")
    assert result.scores == {"subject_correspondence": 4.0, "appearance": 3.0, "temporal": 2.5, "hallucination": 5.0}
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k123"
    body = req["body"]
    assert body["model"] == "judge-x" and body["temperature"] == 0.2
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "a red car drives left" in body["messages"][1]["content"]


def test_retries_transient_errors_then_succeeds():
    sleeps = []
    with StubServer([(503, ""), (200, "no scores here"), (200, GOOD)]) as stub:
        result = _client(stub.endpoint, sleeps, max_retries=3, backoff_s=0.5).score("ref", "pred")
    assert result.scores["temporal"] == 2.5
    assert len(stub.requests) == 3 and sleeps == [0.5, 1.0]


def test_gives_up_after_bounded_retries():
    with StubServer([(200, "nothing")] * 10) as stub, pytest.raises(JudgeReplyError, match="after 3 attempts"):
        _client(stub.endpoint, max_retries=2).score("ref", "pred")
    assert len(stub.requests) == 3


def test_auth_error_is_a_config_error_without_retry():
    with StubServer([(401, GOOD)] * 3) as stub, pytest.raises(ConfigError, match="HTTP 401"):
        _client(stub.endpoint).score("ref", "pred")
    assert len(stub.requests) == 1


def test_unreachable_endpoint_fails_after_retries():
    with StubServer([]) as stub:
        endpoint = stub.endpoint
    with pytest.raises(JudgeReplyError, match="after 2 attempts"):
        _client(endpoint, max_retries=1).score("ref", "pred")


@pytest.mark.parametrize(
    "content",
    [
        "```json\n" + GOOD + "\n```",
        "Subject Correspondence: 4\nAppearance Description: 3\nTemporal Description: 2.5\nHallucination Detection: 5",
        '{"Subject Correspondence": 4, "Appearance Description": 3, "Temporal Description": 2.5, '
        '"Hallucination Detection": 5}',
    ],
)
def test_parse_scores_forms(content):
    assert parse_scores(content) == {"subject_correspondence": 4, "appearance": 3, "temporal": 2.5,
                                     "hallucination": 5}


@pytest.mark.parametrize("content", [
    '{"subject_correspondence": 4, "appearance": 3, "temporal": 2}',
    '{"subject_correspondence": 7, "appearance": 3, "temporal": 2, "hallucination": 1}',
    "I cannot judge this.",
])
def test_parse_scores_rejects_incomplete_or_out_of_range(content):
    with pytest.raises(JudgeReplyError):
        parse_scores(content)


def test_no_endpoint_means_no_judge_and_a_clear_message():
    cfg = load_config(None)
    assert judge_from_config(cfg.eval) is None
    assert "eval.judge_endpoint" in NO_JUDGE_MESSAGE
    with pytest.raises(ConfigError, match="eval.judge_endpoint"):
        JudgeClient("", "m")
    with pytest.raises(ConfigError, match="eval.judge_model"):
        judge_from_config(load_config(None, ["eval.judge_endpoint=http://127.0.0.1:9/v1"]).eval)


def test_judge_predictions_summary_records_settings_and_failures(monkeypatch):
    monkeypatch.setenv("MY_KEY", "secret")
    with StubServer([(200, GOOD), (200, "garbage"), (200, "garbage")]) as stub:
        cfg = load_config(None, [f"eval.judge_endpoint={stub.endpoint}", "eval.judge_model=judge-x",
                                 "eval.judge_temperature=0.0", "eval.judge_api_key_env=MY_KEY",
                                 "eval.judge_max_retries=1"])
        client = judge_from_config(cfg.eval, sleep=lambda s: None)
        records = [{"reference": "r1", "prediction": "p1"}, {"reference": "r2", "prediction": "p2"}]
        summary = judge_predictions(client, records, num_entries=4)  # 2 more entries had no description
    assert stub.requests[0]["auth"] == "Bearer secret"
    assert len(stub.requests) == 3  # the unparsable reply was retried (max_retries=1), then counted as failed
    assert summary["model"] == "judge-x" and summary["temperature"] == 0.0
    assert summary["prompt_version"] == PROMPT_VERSION and len(summary["prompt_sha1"]) == 12
    assert summary["n_scored"] == 1 and summary["n_failed"] == 1 and summary["n_entries"] == 4
    assert summary["coverage"] == 0.25  # never a silently smaller denominator: the coverage says what was scored
    assert summary["scores"]["appearance"] == 3.0
    assert summary["average"] == pytest.approx((4 + 3 + 2.5 + 5) / 4)
    assert summary["average_failed_as_zero"] == pytest.approx((4 + 3 + 2.5 + 5) / 4 / 4)
    assert set(records[0]["judge"]) == set(DIMENSIONS) and "error" in records[1]["judge"]
