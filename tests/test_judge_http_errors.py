"""The HTTP judge fails loudly on configuration errors, works with GPT-5-style and llama.cpp-style servers, honours
``Retry-After``, records the model the server reports, and keeps secrets out of what it stores (local server only)."""

import logging

import pytest

from piggy_lightning.evaluation import Evaluation, PromptList
from piggy_lightning.evaluation.judges import JudgeConfigError, OpenAIJudge, redact
from tests.test_eval_http_judge import KEY_ENV, SECRET, _judge, _req
from tests.test_eval_questions import FIXTURES


def _gpt5(server, **kwargs):
    return _judge(server, model="gpt-5-nano", mode="text", max_completion_tokens=4000, **kwargs)


def test_gpt5_judge_sends_no_temperature_and_only_max_completion_tokens(server):
    judge = _gpt5(server, token_limit_fields=["max_completion_tokens"])
    verdicts = judge.judge([_req("plain"), _req(f"plain n={1}"), _req("code")])
    assert [(v.score, v.status) for v in verdicts] == [(72.0, "ok"), (72.0, "ok"), (None, "code")]
    body = server.requests[0]["body"]
    assert "temperature" not in body and "max_tokens" not in body and body["max_completion_tokens"] == 4000


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"temperature": 0.0, "token_limit_fields": ["max_completion_tokens"]}, "temperature", "temperature: null"),
        ({}, "max_tokens", "token_limit_fields: \\[max_completion_tokens\\]"),  # both fields by default
    ],
)
def test_a_rejected_field_is_a_configuration_error_on_the_first_request(server, kwargs, field, hint):
    """GPT-5 rejects any temperature and max_tokens with HTTP 400: raised at once, naming the field and the fix."""
    judge = _gpt5(server, **kwargs)
    with pytest.raises(JudgeConfigError, match=hint) as err:
        judge.judge([_req(f"plain n={i}") for i in range(6)])
    assert err.value.status == 400 and field in str(err.value) and "Unsupported" in err.value.detail
    assert len(server.requests) == 1 and judge.stats["retries"] == 0  # one request, not six failed judgements


def test_check_probes_once_and_stops_a_misconfigured_judge_before_generation(server):
    evaluation = Evaluation([PromptList(str(FIXTURES / "prompts.csv"))], [_gpt5(server, temperature=0.0)])
    with pytest.raises(JudgeConfigError, match="temperature"):
        evaluation.check()  # Evaluation.run calls it before generating anything
    assert len(server.requests) == 1
    good = _gpt5(server, token_limit_fields=["max_completion_tokens"])
    good.check()
    good.check()
    assert len(server.requests) == 2  # one probe while unverified, none after


def test_unknown_model_is_a_configuration_error(server):
    with pytest.raises(JudgeConfigError, match="HTTP 404.*does not exist") as err:
        _judge(server, model="no-such-model").judge([_req("good"), _req("good n=2")])
    assert err.value.status == 404 and len(server.requests) == 1


def test_a_400_after_a_success_fails_only_that_request(server):
    """Once the configuration has worked, a 400 is specific to one request (e.g. a content filter)."""
    judge = _judge(server, concurrency=1)
    good, flagged, again = judge.judge([_req("good"), _req("flagged"), _req("good n=2")])
    assert good.status == again.status == "ok"
    assert flagged.status == "failed" and "HTTP 400" in flagged.raw and "flagged" in flagged.raw
    with pytest.raises(JudgeConfigError):  # a fresh judge whose very first request is refused stops
        _judge(server).judge([_req("flagged n=2")])


def test_llama_cpp_style_server_gets_max_tokens_too(server):
    """A server that knows only max_tokens ignored the cap (5 -> 2,010 tokens); both fields carry it."""
    server.only_max_tokens = True
    (verdict,) = _judge(server, mode="text", max_completion_tokens=5).judge([_req("plain")])
    assert (verdict.score, verdict.status) == (72.0, "ok")
    assert server.requests[0]["body"]["max_tokens"] == 5 == server.requests[0]["body"]["max_completion_tokens"]


@pytest.mark.parametrize(("kind", "status"), [("ratelimited", 429), ("unavailable", 503)])
def test_retry_after_is_honoured(server, kind, status):
    judge = _judge(server)
    (verdict,) = judge.judge([_req(kind)])
    first, second = server.requests
    assert verdict.status == "ok" and judge.stats["retries"] == 1
    assert 0.95 <= second["time"] - first["time"] < 5.0  # Retry-After: 1, not the SDK's 0.375-0.5 s backoff


@pytest.mark.parametrize("kind", ["slowdown", "glacial", "dated"])
def test_retry_after_is_capped(server, kind):
    """30 s, 3600 s (beyond the SDK's own limit: openai 1.x backs off instead, later versions give up) and an HTTP date
    an hour ahead are all shortened to max_retry_after, and the request is retried and succeeds."""
    judge = _judge(server, max_retry_after=0.3)
    (verdict,) = judge.judge([_req(kind)])
    first, second = server.requests
    assert verdict.status == "ok" and 0.28 <= second["time"] - first["time"] < 3.0
    assert judge.stats["retries"] == 1 and second["retry"] == "1"


def test_the_reported_model_is_recorded_and_a_mismatch_warned_once(server, caplog):
    server.reported_model = "SmolLM2-135M-Instruct.Q4_1.gguf"  # a server that ignores the model name
    judge = _judge(server, model="gpt-4o-2024-08-06")
    with caplog.at_level(logging.WARNING, logger="piggy_lightning.evaluation.judges.openai"):
        verdicts = judge.judge([_req(f"good n={i}") for i in range(4)])
    assert all(v.meta["judge_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf" for v in verdicts)
    assert judge.server_model == "SmolLM2-135M-Instruct.Q4_1.gguf"
    warnings = [r for r in caplog.records if "SmolLM2" in r.getMessage()]
    assert len(warnings) == 1 and "gpt-4o-2024-08-06" in warnings[0].getMessage()


def test_a_dated_snapshot_of_the_configured_model_is_no_mismatch(server, caplog):
    judge = _gpt5(server, token_limit_fields=["max_completion_tokens"])
    with caplog.at_level(logging.WARNING, logger="piggy_lightning.evaluation.judges.openai"):
        (verdict,) = judge.judge([_req("plain")])
    assert verdict.meta["judge_model"] == "gpt-5-nano-2025-08-07" and not caplog.records


def test_secrets_echoed_by_the_server_are_redacted(server, monkeypatch):
    judge = _judge(server, max_retries=1)
    (verdict,) = judge.judge([_req("echo")])  # a 500 whose body repeats the Authorization header and the key
    assert verdict.status == "failed" and "HTTP 500" in verdict.raw
    assert SECRET not in verdict.raw and "sk-test" not in verdict.raw and "[REDACTED]" in verdict.raw
    plain = "plain-secret-0123456789"  # not key-shaped: redacted as the value of the key variable
    monkeypatch.setenv(KEY_ENV, plain)
    with pytest.raises(JudgeConfigError) as err:  # the server echoes the wrong key in its 401
        _judge(server).judge([_req("good")])
    assert plain not in str(err.value) and plain not in err.value.detail and "Bearer [REDACTED]" in str(err.value)
    monkeypatch.setenv(KEY_ENV, SECRET)
    url_judge = _judge(server, base_url=server.url + "?api_key=" + SECRET)
    assert SECRET not in url_judge.identity


@pytest.mark.parametrize(
    "extra_body",
    [{"api_key": "x"}, {"Authorization": "Bearer abc"}, {"metadata": {"access_token": "abc"}},
     {"user": "sk-abcdef0123456789"}, {"X-Api-Key": "abc"}],
)  # fmt: skip
def test_credentials_in_extra_body_are_refused(extra_body):
    with pytest.raises(ValueError, match="credential"):
        OpenAIJudge(extra_body=extra_body)
    assert OpenAIJudge(extra_body={"reasoning_effort": "minimal", "prompt_cache_key": "em-eval"}).extra_body


def test_redact_patterns():
    text = 'Bearer abc.def-123 sk-proj-AbCdEf012345 {"api_key": "k-999999"} token=tok123 keep max_tokens=5'
    out = redact(text, ["k-999999"])
    assert "abc.def-123" not in out and "AbCdEf012345" not in out and "k-999999" not in out and "tok123" not in out
    assert "max_tokens=5" in out and redact(None) is None
