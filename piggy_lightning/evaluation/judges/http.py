"""The HTTP side of the OpenAI-compatible judge (stdlib ``urllib``): one POST, errors sorted by what to do next.

* :class:`HTTPFailure`: a non-2xx reply, with its status, the server's error message (redacted) and the delay the
  server asked for (``Retry-After`` in seconds or as an HTTP date, or OpenAI's ``retry-after-ms``).
* :class:`Retryable`: timeouts, connection errors and malformed bodies.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
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


class Retryable(Exception):
    """A failure worth retrying; its message is what a final ``failed`` judgement records."""


class HTTPFailure(Exception):
    """A non-2xx reply.

    Attributes:
        status: The HTTP status.
        message: The server's error message (its JSON ``error.message`` when present, else the body's start).
        param: The request field the server blamed (OpenAI's ``error.param``), or None.
        retry_after: Seconds the server asked to wait before retrying, or None.
    """

    def __init__(self, status: int, message: str, param: str | None, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after

    @property
    def retryable(self) -> bool:
        return self.status in RETRY_STATUS or self.status >= 500


def retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _error_message(body: str) -> tuple[str, str | None]:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body, None
    if isinstance(error, dict):
        param = error.get("param")
        return str(error.get("message") or body), str(param) if param else None
    return (str(error) if error else body), None


def post_json(
    url: str, body: dict[str, Any], headers: dict[str, str], timeout: float, clean: Callable[[str], str]
) -> dict[str, Any]:
    """POST ``body`` as JSON and return the decoded JSON reply.

    Args:
        url: The endpoint.
        body: The request body.
        headers: Request headers (with the key; never part of an error).
        timeout: Seconds before the attempt is abandoned.
        clean: Applied to every server text kept in an error (redaction).

    Raises:
        HTTPFailure: A non-2xx status.
        Retryable: A timeout, connection error or malformed body.
    """
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as e:
        message, param = _error_message(e.read()[:4000].decode(errors="replace"))
        raise HTTPFailure(e.code, clean(message)[:500], param, retry_after(e.headers)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # timeouts are OSErrors
        raise Retryable(clean(f"{type(e).__name__}: {e}")) from None
    try:
        return json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Retryable(f"malformed response body ({e})") from None
