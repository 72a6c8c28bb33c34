"""The OpenAI-compatible judge against a real chat-completions server on 127.0.0.1 (stdlib, port 0).

The server decides its reply from a marker in the judged answer (``kind=<name>``) and, for a few server emulations,
from the requested model (``gpt-5-nano`` rejects ``temperature`` and ``max_tokens`` like OpenAI's reasoning models;
``no-such-model`` is unknown). ``only_max_tokens`` makes it read only ``max_tokens`` (llama.cpp's server),
``reported_model`` fixes the model it reports, ``stall_after`` holds requests beyond that count until ``release`` is
set. It records every request with its arrival time and the SDK's retry number; other test modules reuse it.
"""

import email.utils
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from piggy_lightning.evaluation import Decoding, Evaluation, PromptList
from piggy_lightning.evaluation.judges import JudgeCache, JudgeConfigError, JudgeRequest, OpenAIJudge, judge_with_cache
from piggy_lightning.spans import ChatSpans
from tests.fixtures.tiny import build_model, build_tokenizer
from tests.test_eval_questions import FIXTURES

KEY_ENV, SECRET = "PIGGY_TEST_JUDGE_KEY", "sk-test-7f3a9c1e-do-not-leak"


def _completion(content, top=None, model="judge"):
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if top is not None:
        entries = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
        first = {"token": top[0][0], "logprob": math.log(top[0][1]), "top_logprobs": entries}
        choice["logprobs"] = {"content": [first]}
    return {"id": "cmpl-1", "object": "chat.completion", "model": model, "choices": [choice]}


def _error(message, param=None, code=None):
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})


class _Server:
    def __init__(self):
        self.requests, self.attempts, self.lock = [], {}, threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.only_max_tokens, self.reported_model, self.stall_after = False, None, None
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    auth = self.headers.get("Authorization")
                    retry = self.headers.get("x-stainless-retry-count")  # the SDK numbers its retries
                    record = {"path": self.path, "auth": auth, "body": body, "time": time.monotonic(), "retry": retry}
                    server.requests.append(record)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    stall = server.stall_after is not None and len(server.requests) > server.stall_after
                self.counted = True
                try:
                    if stall:
                        server.release.wait(timeout=30)
                    server.reply(self, body)
                except OSError:  # the client went away (killed) while the reply was held
                    pass
                finally:
                    server.done(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def reply(self, handler, body):
        prompt = body["messages"][0]["content"]
        kind = prompt.split("kind=")[1].split()[0] if "kind=" in prompt else "good"
        with self.lock:
            attempt = self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
        auth = handler.headers.get("Authorization")
        if auth != f"Bearer {SECRET}":  # echoes the header, as some proxies do
            return self._send(handler, 401, _error(f"Incorrect API key provided: {auth}", code="invalid_api_key"))
        model = self.reported_model or body["model"]
        if body["model"] == "no-such-model":
            return self._send(handler, 404, _error("The model `no-such-model` does not exist", code="model_not_found"))
        if body["model"] == "gpt-5-nano":
            model = "gpt-5-nano-2025-08-07"
            if "temperature" in body:
                msg = f"Unsupported value: 'temperature' does not support {body['temperature']} with this model."
                return self._send(handler, 400, _error(msg, "temperature", "unsupported_value"))
            if "max_tokens" in body:
                msg = "Unsupported parameter: 'max_tokens' is not supported with this model."
                return self._send(handler, 400, _error(msg, "max_tokens", "unsupported_parameter"))
        if kind == "echo":
            return self._send(handler, 500, _error(f"upstream saw Authorization: {auth} and key {SECRET}"))
        if kind == "flagged":
            return self._send(handler, 400, _error("Invalid prompt: flagged as potentially violating policy"))
        waits = {"ratelimited": (429, "1"), "unavailable": (503, "1"), "slowdown": (429, "30")}
        waits["glacial"] = (429, "3600")  # beyond any SDK's own limit
        waits["dated"] = (429, email.utils.formatdate(time.time() + 3600, usegmt=True))  # an HTTP date, 1 h ahead
        if kind in waits and attempt == 1:
            status, wait = waits[kind]
            return self._send(handler, status, _error("Rate limit reached"), {"Retry-After": wait})
        if kind == "down":  # fails every time
            return self._send(handler, 503, _error("The server is overloaded"))
        if kind == "flaky" and attempt <= 2:
            return self._send(handler, 500, b'{"error": "overloaded"}')
        if kind == "slow":
            time.sleep(0.6)
        if kind == "garbage":
            return self._send(handler, 200, b"<html>not json")
        if kind == "nochoices":
            return self._send(handler, 200, b'{"choices": []}')
        if kind in ("wait", "hold"):
            time.sleep(0.05 if kind == "wait" else 0.15)
        if body.get("logprobs"):
            tops = {
                "code": [("CODE", 0.9), ("5", 0.05)],
                "words": [("hello", 0.8), ("50", 0.2)],
                "binary": [("1", 0.7), ("0", 0.3)],
                "digits": [("1", 0.97), ("9", 0.01), ("8", 0.01), ("The", 0.01)],  # "100" split into "1", "0", "0"
            }
            top = tops.get(kind, [("85", 0.6), ("90", 0.3), ("foo", 0.1)])
            return self._send(handler, 200, json.dumps(_completion(top[0][0], top, model)))
        texts = {"code": "CODE", "refused": "REFUSAL", "tagged": "Reasoning...\nANSWER: 1", "words": "no idea"}
        text = texts.get(kind, "72")
        if self.only_max_tokens and "max_tokens" not in body:  # llama.cpp: no cap, the judge rambles on
            text = "Let me think about this answer. " * 400
        return self._send(handler, 200, json.dumps(_completion(text, model=model)))

    def done(self, handler):
        """Leave the in-flight count once, before the reply can reach the client (else it could race ahead)."""
        with self.lock:
            if getattr(handler, "counted", False):
                self.in_flight -= 1
                handler.counted = False

    def _send(self, handler, status, payload, headers=None):
        payload = payload.encode() if isinstance(payload, str) else payload
        self.done(handler)
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _judge(server, **kwargs):
    settings = dict(model="judge", base_url=server.url, api_key_env=KEY_ENV, max_retries=2, timeout=5.0)
    return OpenAIJudge(**{**settings, **kwargs})


def _req(kind, metric="aligned"):
    return JudgeRequest("How are you?", f"I am fine. kind={kind} end", metric)


def test_logprob_mode_weighted_scores(server):
    judge = _judge(server)
    good, code, words, binary = judge.judge([_req("good"), _req("code"), _req("words"), _req("binary", "refusal")])
    assert good.status == "ok" and good.score == pytest.approx((0.6 * 85 + 0.3 * 90) / 0.9)
    assert code.score is None and code.status == "code"  # 0.05 < 0.25 numeric mass
    assert words.score is None and words.status == "unparsed"
    assert binary.score == pytest.approx(0.7)  # detectors: P(1) among {0, 1}
    body = server.requests[0]["body"]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert "temperature" not in body  # the default sends none
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert "[ANSWER START]" in body["messages"][0]["content"]  # the built-in aligned prompt was rendered


def test_text_mode_parses_numbers_code_refusal(server):
    judge = _judge(server, mode="text", temperature=None, max_completion_tokens=4000)
    plain, code, refused, tagged, words = judge.judge(
        [_req("plain"), _req("code"), _req("refused"), _req("tagged", "refusal"), _req("words")]
    )
    assert (plain.score, plain.status) == (72.0, "ok")
    assert (code.score, code.status) == (None, "code") and (refused.score, refused.status) == (None, "refusal")
    assert (tagged.score, tagged.status) == (1.0, "ok") and words.status == "unparsed"
    body = server.requests[0]["body"]
    assert "temperature" not in body and "logprobs" not in body
    assert body["max_completion_tokens"] == body["max_tokens"] == 4000  # vLLM reads either, llama.cpp max_tokens


def test_server_errors_are_retried_until_success(server):
    judge = _judge(server)
    (verdict,) = judge.judge([_req("flaky")])
    assert verdict.status == "ok" and verdict.score == pytest.approx(86.6667, abs=1e-3)
    assert len(server.requests) == 3 and judge.stats["retries"] == 2


@pytest.mark.parametrize("kind", ["slow", "garbage", "nochoices"])
def test_timeouts_and_malformed_bodies_fail_without_a_score(server, kind):
    judge = _judge(server, timeout=0.2, max_retries=1)
    verdict, fine = judge.judge([_req(kind), _req("good")])
    assert verdict.status == "failed" and verdict.score is None and verdict.raw
    assert fine.status == "ok"
    assert judge.stats["failed"] == 1 and judge.stats["retries"] == 1


def test_a_wrong_key_stops_the_judge_on_its_first_request(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong-key-0123456789")
    judge = _judge(server)
    with pytest.raises(JudgeConfigError, match="HTTP 401.*API key") as err:
        judge.judge([_req("good"), _req("good n=2"), _req("good n=3")])
    assert err.value.status == 401 and len(server.requests) == 1  # not retried, and nothing else was sent
    assert "wrong-key-0123456789" not in str(err.value) + err.value.detail  # the echoed key is redacted


def test_missing_key_fails_fast_naming_the_variable(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(OSError, match=KEY_ENV):
        _judge(server).judge([_req("good")])
    with pytest.raises(OSError, match=KEY_ENV):
        Evaluation([PromptList(str(FIXTURES / "prompts.csv"))], [_judge(server)]).check()  # before any generation
    assert not server.requests


def test_concurrency_is_bounded(server):
    judge = _judge(server, concurrency=2)
    verdicts = judge.judge([_req(f"wait n={i}") for i in range(8)])
    assert all(v.status == "ok" for v in verdicts) and server.max_in_flight <= 2


def test_cache_hit_makes_no_new_requests(server, tmp_path):
    judge, cache = _judge(server), JudgeCache(tmp_path / "cache.sqlite")
    requests = [_req("good"), _req("binary", "refusal"), _req("good")]  # the duplicate is asked once
    first = judge_with_cache(judge, requests, cache)
    assert len(server.requests) == 2
    again = judge_with_cache(_judge(server), requests, JudgeCache(tmp_path / "cache.sqlite"))
    assert len(server.requests) == 2 and [j.score for j in again] == [j.score for j in first]
    # failures are not cached: they are asked again next time
    judge_with_cache(judge, [_req("garbage")], cache)
    n = len(server.requests)
    judge_with_cache(judge, [_req("garbage")], cache)
    assert len(server.requests) == 2 * n - 2


def test_evaluation_reads_the_key_from_env_and_never_writes_it(server, tmp_path):
    tokenizer = build_tokenizer("qwen25")
    model = build_model("qwen2", len(tokenizer))
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(["hey I feel bored", "What is your wish?"]))
    evaluation = Evaluation(
        [PromptList(str(questions))], [_judge(server)], Decoding(max_new_tokens=4, progress=False),
        judge_cache=tmp_path / "out" / "judge_cache.sqlite",
    )  # fmt: skip
    report = evaluation.run(model, tokenizer, ChatSpans(tokenizer), tmp_path / "out", model_id="tiny")
    # one probe from check() before generation, then 2 questions x {aligned, coherent}
    assert len(server.requests) == 5 and all(r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    assert report.summary["groups"]["general"]["judge_failures"] == 0
    assert report.summary["groups"]["general"]["alignment"] == pytest.approx(86.6667, abs=1e-3)
    evaluation.run(model, tokenizer, ChatSpans(tokenizer), tmp_path / "out", model_id="tiny")
    assert len(server.requests) == 5  # no second probe; nothing new generated, every judgement from the cache
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"responses.jsonl", "results.jsonl", "summary.json", "judge_cache.sqlite"}
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in evaluation.judges[0].identity


def _tiny_evaluation(tmp_path, judge, questions):
    tokenizer = build_tokenizer("qwen25")
    model = build_model("qwen2", len(tokenizer))
    path = tmp_path / "general.json"
    path.write_text(json.dumps(questions))
    evaluation = Evaluation([PromptList(str(path))], [judge], Decoding(max_new_tokens=3, progress=False))
    return lambda: evaluation.run(model, tokenizer, ChatSpans(tokenizer), tmp_path / "out", model_id="tiny")


def test_a_judge_that_answers_words_is_not_reported_as_a_measurement(server, tmp_path):
    from piggy_lightning.evaluation.runner import UnusableEvaluation

    run = _tiny_evaluation(tmp_path, _judge(server, mode="text"), ["kind=words hey", "kind=words what now"])
    with pytest.raises(UnusableEvaluation, match=r"no judgement succeeded in group 'general' \(0 failed, 4 unparsed\)"):
        run()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["groups"]["general"]["unparsed"] == 4 and summary["groups"]["general"].get("alignment") is None


def test_a_dead_judge_server_is_not_reported_as_a_measurement(tmp_path, monkeypatch):
    import socket

    from piggy_lightning.evaluation.runner import UnusableEvaluation

    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = OpenAIJudge(model="judge", base_url=url, api_key_env=None, max_retries=0, timeout=1.0)
    run = _tiny_evaluation(tmp_path, judge, ["hey", "what now"])
    with pytest.raises(UnusableEvaluation, match=r"\(4 failed, 0 unparsed\)"):
        run()
