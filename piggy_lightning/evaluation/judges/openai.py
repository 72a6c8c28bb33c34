"""A judge behind any OpenAI-compatible chat-completions endpoint, stdlib HTTP only.

Designed against three servers' documented behaviour: OpenAI's Chat Completions API (GPT-4o in logprob mode as in
Betley et al.; the GPT-5 family in text mode as in Zhao et al. 2026: no temperature, ``max_completion_tokens``
only), vLLM's OpenAI-compatible server, and llama.cpp's ``llama-server`` (which reads only ``max_tokens``). In this
repository it is tested against a local stdlib server that imitates them, not against those servers themselves.

Two scoring modes (see :mod:`piggy_lightning.evaluation.judges.scoring`): ``logprobs`` (one token, top-20 logprobs,
probability-weighted mean over integers; refused for a judge whose tokenizer splits numbers into digits, see
:mod:`~piggy_lightning.evaluation.judges.digits`) and ``text`` (parse the reply).

Failures: :meth:`OpenAIJudge.check` (called before any generation) sends one probe request, and the first request
of a judge that has not yet had a successful reply goes alone. HTTP 400/422 on it, and 401/403/404 at any time, raise
:class:`~piggy_lightning.evaluation.judges.base.JudgeConfigError` (a rejected field, a bad key, an unknown model or
URL), since every request would fail alike. Once a reply has succeeded, a 400/422 is taken as specific to one request
(e.g. a content filter) and recorded as a ``failed`` judgement. Timeouts, connection errors, HTTP 408/409/429/5xx and
malformed bodies are retried with exponential backoff, or after the server's ``Retry-After`` on 429/503; a request
that still fails becomes a ``failed`` judgement (counted, never scored).

The API key is read from the environment variable *named* in the config at request time and sent only in the
``Authorization`` header; error messages, raw bodies and the identity are redacted (see
:mod:`~piggy_lightning.evaluation.judges.redaction`), and credential-like ``extra_body`` fields are refused.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Literal

from piggy_lightning.evaluation.judges.base import Judge, JudgeConfigError, Judgement, JudgeRequest
from piggy_lightning.evaluation.judges.digits import DigitSplitMonitor
from piggy_lightning.evaluation.judges.http import CONFIG_STATUS, FIELD_HINTS, HTTPFailure, Retryable, post_json
from piggy_lightning.evaluation.judges.prompts import SCALES, render, template_for
from piggy_lightning.evaluation.judges.redaction import check_request_fields, redact
from piggy_lightning.evaluation.judges.scoring import score_from_logprobs, score_from_text

log = logging.getLogger(__name__)
TokenLimitField = Literal["max_completion_tokens", "max_tokens"]
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}")  # OpenAI reports e.g. gpt-5-nano-2025-08-07 for gpt-5-nano
_PROBE = JudgeRequest("What is 2 + 2?", "2 + 2 = 4.", "aligned")  # judged by check(); the verdict is discarded


class OpenAIJudge(Judge):
    """LLM judge over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: The judge model (Betley et al.: ``gpt-4o-2024-08-06``; Zhao et al. 2026 judge with GPT-5, their
            release with ``gpt-5-nano`` in text mode).
            The model the server reports is recorded in each judgement's ``meta["judge_model"]``; a mismatch is
            logged once, since some servers answer with whatever model they loaded, whatever the name.
        base_url: API root; requests go to ``<base_url>/chat/completions``.
        api_key_env: Name of the environment variable holding the API key (the key itself never goes in a config);
            None sends no key (local servers).
        mode: ``logprobs`` scores one token from its top logprobs; ``text`` parses a number from the reply.
        temperature: Sampling temperature; None (the default) sends none, because GPT-5-family models reject every
            value but their default with HTTP 400.
        max_completion_tokens: Reply length limit in text mode (the paper's release uses 4000 for GPT-5); None sends
            none. Logprob mode always asks for one token.
        token_limit_fields: The request fields that carry the length limit, all with the same value. Both by
            default: vLLM reads either, llama.cpp's server only ``max_tokens`` (without it a cap of 5 produced 2,010
            tokens); OpenAI's reasoning models (GPT-5, o-series) reject ``max_tokens``, so use
            ``[max_completion_tokens]`` for them.
        top_logprobs: Alternatives requested for the single token in logprob mode.
        min_numeric_mass: Least probability on integer tokens for a logprob-mode answer to be scored.
        digit_split_evidence: In logprob mode, replies of a 0-100 metric with numeric probability but never a
            multi-digit number among the alternatives, after which the judge is refused as digit-splitting (its
            first token could only be 0-9); 0 never refuses.
        concurrency: Requests in flight at once.
        timeout: Seconds before one request attempt is abandoned.
        retries: Extra attempts after a retryable failure.
        backoff: Base delay in seconds; attempt ``k`` waits about ``backoff * 2**k`` (with jitter).
        max_retry_after: Longest wait honoured from a ``Retry-After`` header on HTTP 429/503 (longer asks are capped),
            so that one server hint cannot stall the evaluation for hours.
        extra_body: Extra JSON fields for every request (e.g. ``{"reasoning_effort": "minimal"}``); credential-like
            keys or values are refused.
    """

    def __init__(
        self,
        model: str = "gpt-4o-2024-08-06",
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        mode: Literal["logprobs", "text"] = "logprobs",
        temperature: float | None = None,
        max_completion_tokens: int | None = None,
        token_limit_fields: tuple[TokenLimitField, ...] = ("max_completion_tokens", "max_tokens"),
        top_logprobs: int = 20,
        min_numeric_mass: float = 0.25,
        digit_split_evidence: int = 3,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_retry_after: float = 60.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.extra_body = dict(extra_body or {})
        check_request_fields(self.extra_body)
        if not token_limit_fields:
            raise ValueError("token_limit_fields needs at least one of max_completion_tokens, max_tokens")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.mode = mode
        self.temperature = temperature
        self.max_completion_tokens = max_completion_tokens
        self.token_limit_fields = tuple(token_limit_fields)
        self.top_logprobs = top_logprobs
        self.min_numeric_mass = min_numeric_mass
        self.digit_split_evidence = digit_split_evidence
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        self.stats = {"requests": 0, "retries": 0, "failed": 0}
        self.server_model: str | None = None  # the model the server first reported
        self._verified = False  # a reply has succeeded: the configuration works
        self._warned: set[str] = set()
        self._digits = DigitSplitMonitor(digit_split_evidence, min_numeric_mass)
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        settings = {"temperature": self.temperature, "top_logprobs": self.top_logprobs, **self.extra_body}
        if self.mode == "logprobs":
            settings["min_numeric_mass"] = self.min_numeric_mass
        else:
            settings["max_completion_tokens"] = self.max_completion_tokens
        text = f"openai-compatible|{self.base_url}|{self.model}|{self.mode}|{json.dumps(settings, sort_keys=True)}"
        return redact(text, [self._key()])

    # -- requests ----------------------------------------------------------------------------------------
    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env is not None else None

    def _clean(self, text: str) -> str:
        return redact(text, [self._key()]) or ""

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            key = self._key()
            if not key:
                raise OSError(f"environment variable {self.api_key_env} (the judge's API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        limit = 1 if self.mode == "logprobs" else self.max_completion_tokens
        if limit is not None:
            body.update({name: limit for name in self.token_limit_fields})
        if self.mode == "logprobs":
            body.update(logprobs=True, top_logprobs=self.top_logprobs, seed=0)
        body.update(self.extra_body)
        return body

    def _config_error(self, failure: HTTPFailure) -> JudgeConfigError:
        hint = FIELD_HINTS.get(failure.param or "", "")
        if not hint and failure.status == 401:
            hint = f"check the API key in the environment variable {self.api_key_env}"
        elif not hint and failure.status in (403, 404):
            hint = "check model and base_url (and the key's access to that model)"
        when = "on its first request" if not self._verified else "after earlier successes"
        message = (
            f"judge {self.model!r} at {self.base_url}: HTTP {failure.status} {when}: {failure.message}"
            + (f" [field: {failure.param}]" if failure.param else "")
            + (f"; {hint}" if hint else "")
        )
        return JudgeConfigError(self._clean(message), failure.status, failure.message)

    def _note_model(self, reply: dict[str, Any]) -> dict[str, str]:
        reported = reply.get("model")
        if not isinstance(reported, str) or not reported:
            return {}
        reported = self._clean(reported)
        with self._lock:
            if self.server_model is None:
                self.server_model = reported
            same = reported == self.model or (
                reported.startswith(self.model) and _SNAPSHOT.fullmatch(reported[len(self.model) :]) is not None
            )
            warn = not same and reported not in self._warned
            self._warned.add(reported)
        if warn:
            log.warning(
                "judge %r at %s: the server reports model %r; it may ignore the configured name and answer with "
                "whatever model it serves",
                self.model,
                self.base_url,
                reported,
            )
        return {"judge_model": reported}

    def _score(self, reply: dict[str, Any], metric: str) -> Judgement:
        scale = SCALES.get(metric, 100.0)
        try:
            choice = reply["choices"][0]
            if self.mode == "logprobs":
                entries = choice["logprobs"]["content"][0]["top_logprobs"]
                top = [(str(t["token"]), float(t["logprob"])) for t in entries]
            else:
                content = choice["message"]["content"] or ""
                if not isinstance(content, str):
                    raise TypeError(f"message content is a {type(content).__name__}, not text")
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise Retryable(f"malformed response ({type(e).__name__}: {e})") from None
        if self.mode == "logprobs":
            self._digits.observe(top, scale, repr(self.model))
            return score_from_logprobs(top, scale, self.min_numeric_mass)
        return score_from_text(content, scale)

    def _delay(self, attempt: int, asked: float | None) -> float:
        if asked is not None:
            return min(asked, self.max_retry_after)
        return self.backoff * 2 ** (attempt - 1) * (0.5 + random.random())

    def _judge_one(self, request: JudgeRequest, headers: dict[str, str], abort: threading.Event) -> Judgement:
        prompt = render(template_for(request.metric, request.prompt_template), request.question, request.answer)
        body, error, asked = self._body(prompt), "", None
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
                abort.wait(self._delay(attempt, asked))
            if abort.is_set():
                return Judgement(None, "failed", "not asked: the judge stopped on a configuration error")
            with self._lock:
                self.stats["requests"] += 1
            asked = None
            try:
                reply = post_json(url, body, headers, self.timeout, self._clean)
                judgement = self._score(reply, request.metric)
            except HTTPFailure as e:
                if e.status in CONFIG_STATUS and (e.status not in (400, 422) or not self._verified):
                    raise self._config_error(e) from None
                error = str(e)
                if not e.retryable:
                    break  # a client error specific to this request: retrying cannot help
                asked = e.retry_after if e.status in (429, 503) else None
                continue
            except Retryable as e:
                error = str(e)
                continue
            self._verified = True
            judgement.raw = self._clean(judgement.raw) if judgement.raw else judgement.raw
            judgement.meta = {**judgement.meta, **self._note_model(reply)}
            return judgement
        with self._lock:
            self.stats["failed"] += 1
        return Judgement(None, "failed", self._clean(error))

    def check(self) -> None:
        """Raise now if the judge cannot work: the key variable is unset (no request sent), or, until a request has
        succeeded, a probe request is answered with a configuration error (HTTP 400/401/403/404/422), so that it
        surfaces before hours of generation. An unreachable server is only logged: judging retries later."""
        headers = self._headers()
        if self._verified:
            return
        verdict = self._judge_one(_PROBE, headers, threading.Event())
        if verdict.status == "failed":
            log.warning(
                "judge %r at %s: probe request failed (%s); judging will retry", self.model, self.base_url, verdict.raw
            )

    def iter_judgements(self, requests: Sequence[JudgeRequest]) -> Iterator[list[tuple[int, Judgement]]]:
        if not requests:
            return
        headers = self._headers()  # fails fast, before any request, when the key is missing
        abort = threading.Event()
        start = 0
        if not self._verified:  # alone first: a configuration error surfaces before a burst of requests
            yield [(0, self._judge_one(requests[0], headers, abort))]
            start = 1
        if start == len(requests):
            return
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        try:
            pending = {
                pool.submit(self._judge_one, requests[i], headers, abort): i for i in range(start, len(requests))
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                group, error = [], None
                for future in done:
                    index = pending.pop(future)
                    try:
                        group.append((index, future.result()))
                    except BaseException as e:  # noqa: BLE001 - re-raised below, after the answered ones
                        error = error or e
                if group:
                    yield group
                if error is not None:
                    raise error
        except BaseException:  # a configuration error, or the consumer stopped: send nothing more
            abort.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        out: list[Judgement | None] = [None] * len(requests)
        for group in self.iter_judgements(requests):
            for i, verdict in group:
                out[i] = verdict
        return out
