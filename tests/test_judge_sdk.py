"""The judge's ``openai`` SDK path against the local server: ``base_url``, ``max_retries`` (the SDK's, counted by the
server), ``timeout``, the concurrency bound, a synchronous call inside a running event loop, an early stop that
cancels what is pending, and a keyless judge that never sends ``OPENAI_API_KEY``."""

import asyncio
import threading
import time

import pytest

from piggy_lightning.evaluation.judges import JudgeConfigError
from tests.test_eval_http_judge import SECRET, _judge, _req


def _loop_threads():
    return [t for t in threading.enumerate() if t.name == "judge-event-loop"]


def test_base_url_is_honoured(server):
    """Any OpenAI-compatible root works (a proxy path here); a trailing slash makes no double slash."""
    base = server.url.replace("/v1", "/proxy/v1") + "/"
    (verdict,) = _judge(server, base_url=base).judge([_req("good")])
    assert verdict.status == "ok"
    assert [r["path"] for r in server.requests] == ["/proxy/v1/chat/completions"]
    assert server.requests[0]["auth"] == f"Bearer {SECRET}"


def test_max_retries_two_failures_then_success(server):
    """The server fails twice, then answers: with max_retries=2 the SDK makes 3 requests and the judgement is ok."""
    judge = _judge(server, max_retries=2)
    (verdict,) = judge.judge([_req("flaky")])
    assert verdict.status == "ok" and verdict.score == pytest.approx(86.6667, abs=1e-3)
    assert [r["retry"] for r in server.requests] == ["0", "1", "2"]  # the SDK's own retries, not new judge requests
    assert judge.stats == {"requests": 3, "retries": 2, "failed": 0}


def test_max_retries_exhausted_names_endpoint_status_and_attempts(server):
    judge = _judge(server, max_retries=1)
    (flaky,) = judge.judge([_req("flaky")])  # needs 2 retries, gets 1
    assert flaky.status == "failed" and "HTTP 500 after 2 attempts" in flaky.raw
    judge = _judge(server, max_retries=2)
    (down,) = judge.judge([_req("down")])  # fails every time
    assert down.status == "failed" and down.score is None
    assert f"'judge' at {server.url}" in down.raw and "HTTP 503 after 3 attempts" in down.raw
    assert "overloaded" in down.raw and judge.stats["failed"] == 1
    assert len(server.requests) == 2 + 3


def test_timeout_is_honoured(server):
    """The server takes 0.6 s: a 0.2 s timeout abandons the attempt, a 3 s one waits for the answer."""
    judge = _judge(server, timeout=0.2, max_retries=0)
    (verdict,) = judge.judge([_req("slow")])
    assert time.monotonic() - server.requests[0]["time"] < 0.55  # from the request's arrival, not the SDK's import
    assert verdict.status == "failed" and "APITimeoutError after 1 attempt" in verdict.raw
    (verdict,) = _judge(server, timeout=3.0, max_retries=0).judge([_req("slow n=2")])
    assert verdict.status == "ok"


@pytest.mark.parametrize("concurrency", [2, 4])
def test_the_server_sees_at_most_concurrency_requests_in_flight(server, concurrency):
    judge = _judge(server, concurrency=concurrency)
    verdicts = judge.judge([_req(f"hold n={i}") for i in range(12)])  # each held 0.15 s
    assert all(v.status == "ok" for v in verdicts) and len(server.requests) == 12
    assert server.max_in_flight == concurrency  # bounded, and the bound is reached


def test_sync_judge_inside_a_running_event_loop(server):
    """Lightning callbacks call the judge synchronously; a caller's running loop must not get in the way."""

    async def caller():
        asyncio.get_running_loop()
        return _judge(server).judge([_req("good"), _req("binary", "refusal")])

    good, binary = asyncio.run(caller())
    assert good.status == binary.status == "ok" and binary.score == pytest.approx(0.7)
    assert not _loop_threads()


def test_stopping_the_stream_early_cancels_the_pending_requests(server):
    server.stall_after = 1  # the first request is answered, every later one held (up to 30 s)
    judge = _judge(server, concurrency=2)
    stream = judge.iter_judgements([_req(f"good n={i}") for i in range(6)])
    assert [i for i, _ in next(stream)] == [0]
    assert _wait(lambda: len(server.requests) == 3)  # the two slots are taken, both held
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 5.0 and not _loop_threads()  # cancelled, not waited out
    time.sleep(0.3)
    assert len(server.requests) == 3  # nothing more was sent


def test_a_keyless_judge_never_sends_openai_api_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-account-key-must-stay-home")
    with pytest.raises(JudgeConfigError, match="HTTP 401"):  # this server wants a key
        _judge(server, api_key_env=None).judge([_req("good")])
    assert [r["auth"] for r in server.requests] == ["Bearer EMPTY"]


def _wait(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.02)
    return condition()
