"""Keeping credentials out of what a judge stores: redaction of error messages, raw bodies and identities, and a
guard against API keys placed in a request body.

What counts as a secret: ``Bearer <token>``, anything shaped like an OpenAI/Anthropic-style key (``sk-...``),
``api_key=...``/``"token": "..."``-style assignments, and the exact value of the judge's key variable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
_BEARER = re.compile(r"\bBearer\s+(?!\[REDACTED\])[^\s\"',;}\]]+", re.IGNORECASE)
_SK = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")
_ASSIGNED = re.compile(
    r"""(?ix)
    (\b(?:x[_-]?)?(?:api[_-]?key|apikey|access[_-]?token|auth[_-]?token|token|secret|client[_-]?secret|password
    |authorization)\b["']?\s*[:=]\s*["']?)
    (?!\[REDACTED\]|Bearer\s)([^\s"'&,;}\]]+)
    """
)
# Body keys that carry credentials (compared lower-cased, with '-' read as '_').
_CREDENTIAL_KEYS = {
    "api_key", "apikey", "x_api_key", "openai_api_key", "authorization", "auth", "bearer", "token", "access_token",
    "auth_token", "refresh_token", "id_token", "secret", "client_secret", "password", "credentials",
}  # fmt: skip
_CREDENTIAL_SUFFIXES = ("_api_key", "_secret", "_password", "_access_token", "_auth_token")


def redact(text: str | None, secrets: Iterable[str | None] = ()) -> str | None:
    """``text`` with bearer tokens, key-like strings, credential assignments and each of ``secrets`` replaced.

    Args:
        text: What may be stored or shown (an error message, a response body, an identity); None passes through.
        secrets: Exact values to remove wherever they appear (e.g. the API key itself); values under 8 characters
            are ignored so that short common strings are not mangled.
    """
    if not text:
        return text
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, REDACTED)
    text = _BEARER.sub(f"Bearer {REDACTED}", text)
    text = _SK.sub(f"sk-{REDACTED}", text)
    return _ASSIGNED.sub(lambda m: m.group(1) + REDACTED, text)


def _looks_like_credential(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return name in _CREDENTIAL_KEYS or name.endswith(_CREDENTIAL_SUFFIXES)


def check_request_fields(fields: dict[str, Any], where: str = "extra_body") -> None:
    """Refuse credential-like keys or values anywhere in ``fields`` (they would be sent, stored in identities and
    cache keys, and written to results).

    Raises:
        ValueError: Naming the offending key; the key belongs only in the environment variable of ``api_key_env``.
    """
    for key, value in fields.items():
        path = f"{where}.{key}"
        if _looks_like_credential(str(key)):
            raise ValueError(
                f"{path} looks like a credential; never put an API key in a config: export it in an environment "
                "variable and name that variable in api_key_env"
            )
        if isinstance(value, str) and redact(value) != value:
            raise ValueError(f"{path} holds a value that looks like a credential (a bearer token or API key)")
        if isinstance(value, dict):
            check_request_fields(value, path)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    check_request_fields(item, f"{path}[{i}]")
