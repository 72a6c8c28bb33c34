"""A judge behind any OpenAI-compatible chat-completions endpoint, through the maintained ``openai`` SDK.

Designed against three servers' documented behaviour: OpenAI's Chat Completions API (GPT-4o in logprob mode as in
Betley et al.; the GPT-5 family in text mode as in Zhao et al. 2026: no temperature, ``max_completion_tokens``
only), vLLM's OpenAI-compatible server, and llama.cpp's ``llama-server`` (which reads only ``max_tokens``). In this
repository it is tested against a local stdlib server that imitates them, not against those servers themselves.

Two scoring modes (see :mod:`piggy_lightning.evaluation.judges.scoring`): ``logprobs`` (one token, top-20 logprobs,
probability-weighted mean over integers; refused for a judge whose tokenizer splits numbers into digits, see
:mod:`~piggy_lightning.evaluation.judges.digits`) and ``text`` (parse the reply).

Requests go through ``openai.AsyncOpenAI(base_url=..., api_key=..., max_retries=..., timeout=...)``, at most
``concurrency`` at once (an ``asyncio.Semaphore``), on a private event loop in a worker thread
(:mod:`~piggy_lightning.evaluation.judges.background`), so the synchronous :meth:`OpenAIJudge.judge` also works where
an event loop is already running.

Failures: :meth:`OpenAIJudge.check` (called before any generation) sends one probe request, and the first request
of a judge that has not yet had a successful reply goes alone. HTTP 400/422 on it, and 401/403/404 at any time, raise
:class:`~piggy_lightning.evaluation.judges.base.JudgeConfigError` (a rejected field, a bad key, an unknown model or
URL), since every request would fail alike. Once a reply has succeeded, a 400/422 is taken as specific to one request
(e.g. a content filter) and recorded as a ``failed`` judgement. The SDK retries timeouts, connection errors and HTTP
408/409/429/5xx with exponential backoff, or after the server's ``Retry-After`` (capped, see
:mod:`~piggy_lightning.evaluation.judges.http`); a 200 reply without a usable choice is re-asked here, since the SDK
does not; a request that still fails becomes a ``failed`` judgement (counted, never scored) naming the endpoint, the
status and the number of attempts.

The API key is read from the environment variable *named* in the config at request time and handed only to the SDK
(which sends it in the ``Authorization`` header); error messages, raw bodies, log lines and the identity are redacted
(see :mod:`~piggy_lightning.evaluation.judges.redaction`), and credential-like ``extra_body`` fields are refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from piggy_lightning.evaluation.judges.background import stream
from piggy_lightning.evaluation.judges.base import Judge, Judgement, JudgeRequest
from piggy_lightning.evaluation.judges.digits import DigitSplitMonitor
from piggy_lightning.evaluation.judges.http import CONFIG_STATUS, RetryAfterCap, config_error, failure
from piggy_lightning.evaluation.judges.prompts import SCALES, check_single_token, render, template_for
from piggy_lightning.evaluation.judges.redaction import check_request_fields, redact
from piggy_lightning.evaluation.judges.scoring import score_from_logprobs, score_from_text

if TYPE_CHECKING:  # the SDK (pydantic, httpx) takes about 0.6 s to import: loaded at the first request, so that
    import openai  # parsing a config or --help stays instant

log = logging.getLogger(__name__)
TokenLimitField = Literal["max_completion_tokens", "max_tokens"]
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}")  # OpenAI reports e.g. gpt-5-nano-2025-08-07 for gpt-5-nano
_PROBE = JudgeRequest("What is 2 + 2?", "2 + 2 = 4.", "aligned")  # judged by check(); the verdict is discarded


class _Malformed(Exception):
    """A 2xx reply without a usable choice (the SDK returns it as it is)."""


class OpenAIJudge(Judge):
    """LLM judge over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: The judge model (Betley et al.: ``gpt-4o-2024-08-06``; Zhao et al. 2026 judge with GPT-5, their
            release with ``gpt-5-nano`` in text mode).
            The model the server reports is recorded in each judgement's ``meta["judge_model"]``; a mismatch is
            logged once, since some servers answer with whatever model they loaded, whatever the name.
        base_url: API root (the SDK's ``base_url``); requests go to ``<base_url>/chat/completions``.
        api_key_env: Name of the environment variable holding the API key (the key itself never goes in a config);
            None sends the placeholder key ``EMPTY`` (servers started without a key ignore it), never
            ``OPENAI_API_KEY``.
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
        timeout: Seconds one attempt may wait on the server (connecting, sending, each read) before it is abandoned
            (the SDK's ``timeout``).
        max_retries: Extra attempts after a retryable failure (the SDK's ``max_retries``; its backoff starts at
            0.5 s and doubles up to 8 s). A malformed 2xx reply is re-asked as often.
        max_retry_after: Longest wait honoured from a server's ``Retry-After`` (longer asks are capped), so that one
            server hint cannot stall the evaluation for hours; 0 ignores the hint and backs off.
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
        max_retries: int = 4,
        max_retry_after: float = 60.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.extra_body = dict(extra_body or {})
        check_request_fields(self.extra_body)
        if not token_limit_fields:
            raise ValueError("token_limit_fields needs at least one of max_completion_tokens, max_tokens")
        if concurrency < 1 or max_retries < 0:
            raise ValueError(f"concurrency must be >= 1 and max_retries >= 0, not {concurrency} and {max_retries}")
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
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self.stats = {"requests": 0, "retries": 0, "failed": 0}  # requests: HTTP attempts, retries included
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

    def _api_key(self) -> str:
        """The key for the SDK; without ``api_key_env`` a placeholder, as vLLM's documentation uses, since the SDK
        requires a key and would otherwise read ``OPENAI_API_KEY`` and send it to this (local) server."""
        if self.api_key_env is None:
            return "EMPTY"
        key = self._key()
        if not key:
            raise OSError(f"environment variable {self.api_key_env} (the judge's API key) is not set")
        return key

    def _where(self) -> str:
        return f"judge {self.model!r} at {self._clean(self.base_url)}"

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

    def _client(self, api_key: str) -> openai.AsyncOpenAI:
        import openai

        # Our own httpx client carries the hooks (attempt counting, the Retry-After cap); it also sidesteps
        # openai < 1.55.3 building its default client with the `proxies` argument that httpx 0.28 removed
        # (https://github.com/openai/openai-python/issues/1902).
        hooks: dict[str, list[Callable[..., Any]]] = {
            "request": [self._on_request],
            "response": [RetryAfterCap(self.max_retry_after)],
        }
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=self.max_retries, timeout=self.timeout,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
        )  # fmt: skip

    async def _on_request(self, request: Any) -> None:
        with self._lock:
            self.stats["requests"] += 1
            if request.headers.get("x-stainless-retry-count", "0") != "0":
                self.stats["retries"] += 1

    def _note_model(self, reported: Any) -> dict[str, str]:
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
                "%s: the server reports model %r; it may ignore the configured name and answer with whatever model "
                "it serves",
                self._where(),
                reported,
            )
        return {"judge_model": reported}

    def _score(self, reply: Any, metric: str) -> Judgement:
        scale = SCALES.get(metric, 100.0)
        try:
            choice = reply.choices[0]
            if self.mode == "logprobs":
                top = [(str(t.token), float(t.logprob)) for t in choice.logprobs.content[0].top_logprobs]
            else:
                content = choice.message.content or ""
                if not isinstance(content, str):
                    raise TypeError(f"message content is a {type(content).__name__}, not text")
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise _Malformed(f"malformed response ({type(e).__name__}: {e})") from None
        if self.mode == "logprobs":
            self._digits.observe(top, scale, repr(self.model))
            return score_from_logprobs(top, scale, self.min_numeric_mass)
        return score_from_text(content, scale)

    async def _judge_one(self, client: openai.AsyncOpenAI, request: JudgeRequest) -> Judgement:
        import openai

        if self.mode == "logprobs":
            check_single_token(request.metric, request.prompt_template, self._where())
        prompt = render(template_for(request.metric, request.prompt_template), request.question, request.answer)
        body = self._body(prompt)
        fields = {k: v for k, v in body.items() if k not in self.extra_body}
        error = ""
        for attempt in range(self.max_retries + 1):  # re-asks malformed replies only: the SDK retried the rest
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
            try:
                reply = await client.chat.completions.create(**fields, extra_body=self.extra_body or None)
                if not hasattr(reply, "choices"):  # a 2xx body that is not a JSON object
                    raise _Malformed(f"malformed response body ({str(reply)[:200]!r})")
                judgement = self._score(reply, request.metric)
            except openai.APIStatusError as e:
                if e.status_code in CONFIG_STATUS and (e.status_code not in (400, 422) or not self._verified):
                    raise config_error(e, self._where(), self._verified, self.api_key_env, self._clean) from None
                error = failure(e, self._where(), self._clean)  # the SDK retried 408/409/429/5xx already
                break
            except openai.APIError as e:  # timeouts and connection errors, already retried by the SDK
                error = failure(e, self._where(), self._clean)
                break
            except _Malformed as e:
                error = self._clean(f"{self._where()}: {e}")
                continue
            except ValueError as e:  # a 2xx body that does not decode as JSON
                error = self._clean(f"{self._where()}: malformed response body ({type(e).__name__}: {e})")
                continue
            self._verified = True
            judgement.raw = self._clean(judgement.raw) if judgement.raw else judgement.raw
            judgement.meta = {**judgement.meta, **self._note_model(getattr(reply, "model", None))}
            return judgement
        with self._lock:
            self.stats["failed"] += 1
        return Judgement(None, "failed", error)

    async def _judge_all(
        self, requests: Sequence[JudgeRequest], api_key: str, emit: Callable[[tuple[int, Judgement]], None]
    ) -> None:
        async with self._client(api_key) as client:
            limit = asyncio.Semaphore(self.concurrency)

            async def one(i: int) -> None:
                async with limit:
                    emit((i, await self._judge_one(client, requests[i])))

            start = 0
            if not self._verified:  # alone first: a configuration error surfaces before a burst of requests
                await one(0)
                start = 1
            tasks = [asyncio.create_task(one(i)) for i in range(start, len(requests))]
            try:
                for done in asyncio.as_completed(tasks):
                    await done  # a configuration error propagates at once
            finally:  # on an error or a cancellation, send nothing more
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def check(self) -> None:
        """Raise now if the judge cannot work: the key variable is unset (no request sent), or, until a request has
        succeeded, a probe request is answered with a configuration error (HTTP 400/401/403/404/422), so that it
        surfaces before hours of generation. An unreachable server is only logged: judging retries later."""
        self._api_key()
        if self._verified:
            return
        (verdict,) = self.judge([_PROBE])
        if verdict.status == "failed":
            log.warning("%s: probe request failed (%s); judging will retry", self._where(), verdict.raw)

    def iter_judgements(self, requests: Sequence[JudgeRequest]) -> Iterator[list[tuple[int, Judgement]]]:
        if not requests:
            return
        api_key = self._api_key()  # fails fast, before any request, when the key is missing
        yield from stream(lambda emit: self._judge_all(requests, api_key, emit))

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        out: list[Judgement | None] = [None] * len(requests)
        for group in self.iter_judgements(requests):
            for i, verdict in group:
                out[i] = verdict
        return out
