"""Keep secrets out of MLflow params, tags and log lines."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# Whole snake/kebab-case words only, so `max_new_tokens` or `tokenizer` stay visible while
# `hf_token`, `api_key` or `db_password` are masked.
_SECRET_KEY = re.compile(
    r"(^|[._\-])(token|secret|password|passwd|pwd|api_?key|access_?key|credentials?|auth)"
    r"($|[._\-])", re.IGNORECASE)
# scheme://user:password@host -> scheme://user:***@host
_URI_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):([^@/\s]*)@")
# ?token=...&password=... in query strings
_QUERY_SECRET = re.compile(
    r"([?&;](?:[A-Za-z0-9_\-]*?)(?:token|secret|password|passwd|api_?key|access_?key)"
    r"[A-Za-z0-9_\-]*=)([^&;#\s]*)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) param name names a secret."""
    return any(_SECRET_KEY.search(part) for part in key.split("."))


def redact_uri(text: str) -> str:
    """Mask passwords of `scheme://user:pass@host` URIs and secret query values in `text`."""
    text = _URI_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, text)


def redact_value(key: str, value: Any) -> Any:
    """The value as it may be logged: masked for a secret key, URIs cleaned for strings."""
    if is_secret_key(key) and value not in (None, ""):
        return MASK
    return redact_uri(value) if isinstance(value, str) else value


def redact_params(params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flat param dict with every secret masked."""
    return {k: redact_value(k, v) for k, v in params.items()}
