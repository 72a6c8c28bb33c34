"""``OpenAIRephraser``: rephrasings from any OpenAI-compatible endpoint, by the paper's verbalized sampling (Fig. 13).

One request per question asks for a JSON list of ``{question, probability}``; the reply is parsed robustly (code
fences, prose around the list, an object holding one list, plain strings) and anything else raises with the raw
reply. It shares the judge's SDK plumbing (``judges/background.py``, ``judges/http.py``) and redaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from piggy_lightning.evaluation.judges.background import stream
from piggy_lightning.evaluation.judges.http import CONFIG_STATUS, RetryAfterCap, config_error, failure
from piggy_lightning.evaluation.judges.redaction import check_request_fields, redact
from piggy_lightning.evaluation.rephrase import RephraseError, Rephraser, distinct_variants
from piggy_lightning.evaluation.results import write_json_atomic

if TYPE_CHECKING:
    import openai

TokenLimitField = Literal["max_completion_tokens", "max_tokens"]

# A verbalized-sampling request after the paper's Fig. 13: n stylistically very different variants with the same
# domain, intent and meaning, as a JSON list of {question, probability}. The wording is written from that
# description, not copied from the figure; pass the figure's text as ``prompt`` to reproduce it exactly.
VERBALIZED_SAMPLING_PROMPT = """\
Rewrite the question below in {n} different ways. Every rewrite must keep the question's domain, intent and \
meaning, so that it asks for the same thing, while the rewrites differ from the question and from each other as \
much as possible in style: wording, sentence structure, tone, register and length. Sample the rewrites at random \
from the full distribution of rewrites you could write, and give each the probability you assign to it.

Return only a JSON list of {n} objects of the form {{"question": "<the rewrite>", "probability": <a number between \
0 and 1>}}, with no other text.

Question: {question}"""

_TEXT_KEYS = ("question", "text", "rephrasing", "variant", "rewrite")


def _json_values(text: str) -> list[Any]:
    """The outermost JSON arrays and objects in ``text``, in order (in a fenced block, or with prose around them);
    values nested in them are not candidates of their own."""
    decoder = json.JSONDecoder()
    out, end = [], 0
    for match in re.finditer(r"[\[{]", text):
        if match.start() < end:
            continue
        try:
            value, end = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        out.append(value)
    return out


def _questions(value: Any) -> list[str] | None:
    """The question texts of a list of ``{"question": ..., "probability": ...}`` items (or strings), or of an object
    holding one such list; None when ``value`` is not that shape."""
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        return _questions(lists[0]) if len(lists) == 1 else None
    if not isinstance(value, list) or not value:
        return None
    texts = []
    for item in value:
        if isinstance(item, dict):
            item = next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str) or not item.strip():
            return None
        texts.append(item)
    return texts


def parse_variants(reply: str) -> list[str]:
    """The rephrasings in a verbalized-sampling reply: a JSON list of ``{"question": ..., "probability": ...}``,
    possibly in a code fence or with prose around it, or an object holding that list.

    Raises:
        RephraseError: No such list in the reply (the message holds the reply).
    """
    for value in _json_values(reply or ""):
        texts = _questions(value)
        if texts is not None:
            return texts
    raise RephraseError(f"the reply holds no JSON list of {{question, probability}} objects: {reply!r}")


class OpenAIRephraser(Rephraser):
    """Rephrasings from a chat model behind any OpenAI-compatible ``/chat/completions`` endpoint, through the
    ``openai`` SDK (as ``OpenAIJudge``), with a verbalized-sampling prompt after the paper's Fig. 13 (which used
    GPT-5).

    One request per question. The SDK retries timeouts, connection errors and HTTP 408/409/429/5xx; anything still
    failing, a configuration error (HTTP 400/401/403/404/422), or a reply without enough distinct rephrasings
    raises, naming the endpoint and showing the reply.

    Args:
        model: The rephrasing model (the paper: GPT-5).
        base_url: API root; requests go to ``<base_url>/chat/completions``.
        api_key_env: Name of the environment variable holding the API key; None sends the placeholder ``EMPTY``.
        candidates: Rephrasings the prompt asks for; None asks for as many as the question set uses (its ``n``).
            More leaves room for repeats: the first ``n`` distinct ones are used.
        prompt: Request template (``str.format``: literal braces doubled) with ``{n}`` and ``{question}``
            fields; None uses :data:`VERBALIZED_SAMPLING_PROMPT`.
        temperature: Sampling temperature; None sends none (GPT-5-family models accept only their default).
        max_completion_tokens: Reply length limit; None sends none.
        token_limit_fields: The request fields that carry the limit (OpenAI's reasoning models reject
            ``max_tokens``; llama.cpp reads only it).
        concurrency: Requests in flight at once.
        timeout: Seconds one attempt may wait on the server.
        max_retries: Extra attempts after a retryable failure (the SDK's).
        max_retry_after: Longest wait honoured from a server's ``Retry-After``.
        extra_body: Extra JSON fields for every request (e.g. ``{"reasoning_effort": "low"}``); credential-like keys
            are refused.
        cache: JSON file of the rephrasings already received, keyed by the request: a rerun asks only for what is
            not in it (and so asks the same variants again); None keeps none.
    """

    def __init__(
        self,
        model: str = "gpt-5",
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        candidates: int | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        max_completion_tokens: int | None = None,
        token_limit_fields: tuple[TokenLimitField, ...] = ("max_completion_tokens",),
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 4,
        max_retry_after: float = 60.0,
        extra_body: dict[str, Any] | None = None,
        cache: str | None = None,
    ) -> None:
        self.extra_body = dict(extra_body or {})
        check_request_fields(self.extra_body)
        if concurrency < 1 or max_retries < 0 or (candidates is not None and candidates < 1):
            raise ValueError("OpenAIRephraser: concurrency and candidates must be >= 1 and max_retries >= 0")
        self.prompt = prompt or VERBALIZED_SAMPLING_PROMPT
        if "{question}" not in self.prompt:
            raise ValueError("OpenAIRephraser: the prompt template lacks a {question} field")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.candidates = candidates
        self.temperature = temperature
        self.max_completion_tokens = max_completion_tokens
        self.token_limit_fields = tuple(token_limit_fields)
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self.cache = cache

    @property
    def identity(self) -> str:
        settings = {"temperature": self.temperature, "max_completion_tokens": self.max_completion_tokens,
                    "prompt": hashlib.sha256(self.prompt.encode()).hexdigest()[:12], **self.extra_body}  # fmt: skip
        text = f"openai-compatible|{self.base_url}|{self.model}|{json.dumps(settings, sort_keys=True)}"
        return redact(text, [self._key()]) or text

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env is not None else None

    def _api_key(self) -> str:
        if self.api_key_env is None:
            return "EMPTY"
        key = self._key()
        if not key:
            raise OSError(f"environment variable {self.api_key_env} (the rephraser's API key) is not set")
        return key

    def _clean(self, text: str) -> str:
        return redact(text, [self._key()]) or ""

    def _where(self) -> str:
        return f"rephraser {self.model!r} at {self._clean(self.base_url)}"

    def body(self, question: str, n: int) -> dict[str, Any]:
        """The request body that asks for rephrasings of ``question``."""
        text = self.prompt.format(n=self.candidates or n, question=question)
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": text}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_completion_tokens is not None:
            body.update({name: self.max_completion_tokens for name in self.token_limit_fields})
        return {**body, **self.extra_body}

    def _cache_key(self, body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([self.base_url, body], sort_keys=True).encode()).hexdigest()

    def _read_cache(self) -> dict[str, Any]:
        if self.cache is None or not Path(self.cache).exists():
            return {}
        return json.loads(Path(self.cache).read_text(encoding="utf-8"))

    def rephrase(self, questions: Sequence[str], n: int) -> list[list[str]]:
        cached = self._read_cache()
        bodies = [self.body(q, n) for q in questions]
        keys = [self._cache_key(b) for b in bodies]
        todo = [i for i, k in enumerate(keys) if k not in cached]
        if todo:
            api_key = self._api_key()
            for group in stream(lambda emit: self._ask_all([bodies[i] for i in todo], api_key, emit)):
                error = None
                for j, reply in group:
                    i = todo[j]
                    try:
                        variants = self._variants(questions[i], reply, n)
                    except RephraseError as e:
                        error = error or e
                        continue
                    cached[keys[i]] = {"question": questions[i], "variants": variants, "reply": self._clean(reply)}
                if self.cache is not None:  # kept as they arrive: a failure later loses none of them
                    Path(self.cache).parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(self.cache, cached)
                if error is not None:
                    raise error
        return [list(cached[k]["variants"]) for k in keys]

    def _variants(self, question: str, reply: str, n: int) -> list[str]:
        try:
            variants = distinct_variants(question, parse_variants(reply))
        except RephraseError as e:
            raise RephraseError(f"{self._where()}, rephrasing {question!r}: {self._clean(str(e))}") from None
        if len(variants) < n:
            raise RephraseError(
                f"{self._where()} wrote {len(variants)} distinct rephrasings of {question!r} other than the "
                f"question itself, {n} asked; its reply: {self._clean(reply)!r}"
            )
        return variants

    def _client(self, api_key: str) -> openai.AsyncOpenAI:
        import openai

        hooks: dict[str, list[Callable[..., Any]]] = {"response": [RetryAfterCap(self.max_retry_after)]}
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=self.max_retries, timeout=self.timeout,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
        )  # fmt: skip

    async def _ask(self, client: openai.AsyncOpenAI, body: dict[str, Any]) -> str:
        import openai

        fields = {k: v for k, v in body.items() if k not in self.extra_body}
        try:
            reply = await client.chat.completions.create(**fields, extra_body=self.extra_body or None)
        except openai.APIStatusError as e:
            if e.status_code in CONFIG_STATUS:
                raise config_error(e, self._where(), False, self.api_key_env, self._clean) from None
            raise RuntimeError(failure(e, self._where(), self._clean)) from None
        except openai.APIError as e:  # timeouts and connection errors, retried by the SDK already
            raise RuntimeError(failure(e, self._where(), self._clean)) from None
        try:
            content = reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as e:
            shown = self._clean(str(reply)[:500])
            raise RephraseError(f"{self._where()}: malformed response ({type(e).__name__}: {shown!r})") from None
        if not isinstance(content, str):
            raise RephraseError(f"{self._where()}: the reply has no text content: {self._clean(str(reply)[:500])!r}")
        return content

    async def _ask_all(
        self, bodies: Sequence[dict[str, Any]], api_key: str, emit: Callable[[tuple[int, str]], None]
    ) -> None:
        async with self._client(api_key) as client:
            limit = asyncio.Semaphore(self.concurrency)

            async def one(i: int) -> None:
                async with limit:
                    emit((i, await self._ask(client, bodies[i])))

            tasks = [asyncio.create_task(one(i)) for i in range(len(bodies))]
            try:
                for done in asyncio.as_completed(tasks):
                    await done  # the first failure propagates at once
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
