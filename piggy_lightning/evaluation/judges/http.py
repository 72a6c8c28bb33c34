"""What the OpenAI-compatible judge adds around the ``openai`` SDK's HTTP layer: which statuses mean "fix the config",
what to change for a rejected field, the server's own error text, and a cap on the delays servers ask for.

The SDK retries timeouts, connection errors and HTTP 408/409/429/5xx itself (``max_retries``, exponential backoff
from 0.5 s up to 8 s, or the server's ``retry-after-ms``/``Retry-After``). One part stays here:
:class:`RetryAfterCap`, an ``httpx`` response hook that shortens a longer ``Retry-After`` to ``max_retry_after`` before
the SDK reads it. The SDK's own limit is fixed and differs by version (openai 1.x honours at most 60 s and backs off
instead, later versions honour up to 120 s and *give up* beyond), so without the hook one server hint could either
stall the evaluation or turn every request into a ``failed`` judgement.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from piggy_lightning.evaluation.judges.base import JudgeConfigError

if TYPE_CHECKING:
    import openai

# Statuses a configuration causes: a rejected request body, a bad or missing key, a forbidden or unknown model/URL.
CONFIG_STATUS = frozenset({400, 401, 403, 404, 422})

# What to change when a server rejects a request field (OpenAI's ``error.param``).
FIELD_HINTS = {
    "max_tokens": "this model rejects max_tokens (OpenAI reasoning models): set token_limit_fields: "
    "[max_completion_tokens]",
    "max_completion_tokens": "this server does not know max_completion_tokens: set token_limit_fields: [max_tokens]",
    "temperature": "this model accepts only its default temperature (GPT-5 family): set temperature: null",
    "logprobs": "this model returns no logprobs: use mode: text",
    "top_logprobs": "this model returns no logprobs: use mode: text",
}


def retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) / scale
            except ValueError:
                continue
            return max(0.0, seconds) if not math.isnan(seconds) else None
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class RetryAfterCap:
    """An ``httpx`` response hook that lowers any server-asked delay above ``limit`` seconds to ``limit``.

    It writes ``retry-after-ms``, which every SDK version reads before ``Retry-After``. A ``limit`` of 0 makes the SDK
    ignore the hint and use its exponential backoff.

    Args:
        limit: The longest delay honoured, in seconds.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit

    async def __call__(self, response: Any) -> None:
        asked = retry_after(response.headers)
        if asked is not None and asked > self.limit:
            response.headers["retry-after-ms"] = str(int(self.limit * 1000))


def server_error(error: openai.APIStatusError) -> tuple[str, str | None]:
    """The server's own error message and the request field it blamed (OpenAI's ``error.param``), if any."""
    body = error.body
    if isinstance(body, dict):
        param = body.get("param")
        return str(body.get("message") or body), str(param) if param else None
    if body:
        return str(body), None
    try:
        return error.response.text[:4000] or error.message, None
    except Exception:  # noqa: BLE001 - a body that cannot be read still leaves the SDK's message
        return error.message, None


def attempts(error: openai.APIError) -> int:
    """How many attempts the SDK made before ``error`` (it numbers retries in ``x-stainless-retry-count``)."""
    request = getattr(error, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", "0")) + 1 if request is not None else 1
    except ValueError:
        return 1


def config_error(
    error: openai.APIStatusError, where: str, verified: bool, key_env: str | None, clean: Callable[[str], str]
) -> JudgeConfigError:
    """The :class:`JudgeConfigError` for a status in :data:`CONFIG_STATUS`, with the field to change or what to check.

    Args:
        error: The SDK's error.
        where: Names the judge and its endpoint.
        verified: Whether a request of this judge had succeeded before.
        key_env: The API key's environment variable (named for a 401).
        clean: Redaction, applied to everything kept.
    """
    status = error.status_code
    message, param = server_error(error)
    message = clean(message)[:500]
    hint = FIELD_HINTS.get(param or "", "")
    if not hint and status == 401:
        hint = f"check the API key in the environment variable {key_env}"
    elif not hint and status in (403, 404):
        hint = "check model and base_url (and the key's access to that model)"
    when = "after earlier successes" if verified else "on its first request"
    text = (
        f"{where}: HTTP {status} {when}: {message}"
        + (f" [field: {param}]" if param else "")
        + (f"; {hint}" if hint else "")
    )
    return JudgeConfigError(clean(text), status, message)


def failure(error: openai.APIError, where: str, clean: Callable[[str], str]) -> str:
    """What a ``failed`` judgement records: the endpoint, the status (or the error kind), the attempts and the
    server's words, redacted by ``clean``."""
    n = attempts(error)
    tried = f"after {n} attempt{'s' if n > 1 else ''}"
    if hasattr(error, "status_code"):  # an openai.APIStatusError
        return clean(f"{where}: HTTP {error.status_code} {tried}: {server_error(error)[0]}")[:800]
    cause = error.__cause__
    cause = f" ({type(cause).__name__}{f': {cause}' if str(cause) else ''})" if cause is not None else ""
    return clean(f"{where}: {type(error).__name__} {tried}: {error}{cause}")[:800]
