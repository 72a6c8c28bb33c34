"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...), stdlib HTTP only.

Two scoring modes (see :mod:`piggy_lightning.evaluation.judges.scoring`): ``logprobs`` (Betley et al.: one token,
top-20 logprobs, probability-weighted mean over integers) and ``text`` (the paper with GPT-5: parse the reply).
Requests run in a bounded thread pool with a timeout and exponential backoff on timeouts, connection errors,
HTTP 408/409/429/5xx and malformed bodies; a request that still fails becomes a ``failed`` judgement (counted,
never scored). The API key is read from the environment variable *named* in the config at request time; it is
sent only in the ``Authorization`` header and never stored, logged or written.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from piggy_lightning.evaluation.judges.base import Judge, Judgement, JudgeRequest
from piggy_lightning.evaluation.judges.prompts import SCALES, render, template_for
from piggy_lightning.evaluation.judges.scoring import score_from_logprobs, score_from_text

_RETRY_STATUS = {408, 409, 429}


class _Retryable(Exception):
    """A failure worth retrying; its message is what a final ``failed`` judgement records."""


class OpenAIJudge(Judge):
    """LLM judge over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: The judge model (Betley et al.: ``gpt-4o-2024-08-06``; the paper: GPT-5, text mode).
        base_url: API root; requests go to ``<base_url>/chat/completions``.
        api_key_env: Name of the environment variable holding the API key (the key itself never goes in a config);
            None sends no key (local servers).
        mode: ``logprobs`` scores one token from its top logprobs; ``text`` parses a number from the reply.
        temperature: Sampling temperature sent with each request; None omits it (GPT-5 models accept only their
            default).
        max_completion_tokens: Reply length limit in text mode (the released code uses 4000 for GPT-5); None omits it.
            Logprob mode always asks for one token.
        top_logprobs: Alternatives requested for the single token in logprob mode.
        min_numeric_mass: Least probability on integer tokens for a logprob-mode answer to be scored.
        concurrency: Requests in flight at once.
        timeout: Seconds before one request attempt is abandoned.
        retries: Extra attempts after a retryable failure.
        backoff: Base delay in seconds; attempt ``k`` waits about ``backoff * 2**k`` (with jitter).
        extra_body: Extra JSON fields for every request (e.g. ``{"reasoning_effort": "minimal"}``).
    """

    def __init__(
        self,
        model: str = "gpt-4o-2024-08-06",
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        mode: Literal["logprobs", "text"] = "logprobs",
        temperature: float | None = 0.0,
        max_completion_tokens: int | None = None,
        top_logprobs: int = 20,
        min_numeric_mass: float = 0.25,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.mode = mode
        self.temperature = temperature
        self.max_completion_tokens = max_completion_tokens
        self.top_logprobs = top_logprobs
        self.min_numeric_mass = min_numeric_mass
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.extra_body = dict(extra_body or {})
        self.stats = {"requests": 0, "retries": 0, "failed": 0}
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        settings = {"temperature": self.temperature, "top_logprobs": self.top_logprobs, **self.extra_body}
        if self.mode == "logprobs":
            settings["min_numeric_mass"] = self.min_numeric_mass
        else:
            settings["max_completion_tokens"] = self.max_completion_tokens
        return f"openai-compatible|{self.base_url}|{self.model}|{self.mode}|{json.dumps(settings, sort_keys=True)}"

    # -- requests ----------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise OSError(f"environment variable {self.api_key_env} (the judge's API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.mode == "logprobs":
            body.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs, seed=0)
        elif self.max_completion_tokens is not None:
            body["max_completion_tokens"] = self.max_completion_tokens
        body.update(self.extra_body)
        return body

    def _post(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with self._lock:
            self.stats["requests"] += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code in _RETRY_STATUS or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {detail}") from None
            raise ValueError(f"HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # timeouts are OSErrors
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        try:
            return json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Retryable(f"malformed response body ({e})") from None

    def _score(self, reply: dict[str, Any], metric: str) -> Judgement:
        scale = SCALES.get(metric, 100.0)
        try:
            choice = reply["choices"][0]
            if self.mode == "logprobs":
                top = choice["logprobs"]["content"][0]["top_logprobs"]
                return score_from_logprobs(
                    [(t["token"], float(t["logprob"])) for t in top], scale, self.min_numeric_mass
                )
            return score_from_text(choice["message"]["content"] or "", scale)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise _Retryable(f"malformed response ({type(e).__name__}: {e})") from None

    def _judge_one(self, request: JudgeRequest, headers: dict[str, str]) -> Judgement:
        prompt = render(template_for(request.metric, request.prompt_template), request.question, request.answer)
        body = self._body(prompt)
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                return self._score(self._post(body, headers), request.metric)
            except _Retryable as e:
                error = str(e)
            except ValueError as e:  # a client error: retrying cannot help
                error = str(e)
                break
        with self._lock:
            self.stats["failed"] += 1
        return Judgement(None, "failed", error)

    def check(self) -> None:
        self._headers()

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        if not requests:
            return []
        headers = self._headers()  # fails fast, before any request, when the key is missing
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda r: self._judge_one(r, headers), requests))
