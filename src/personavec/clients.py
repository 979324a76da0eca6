"""What the HTTP clients (the OpenAI-compatible judge, the trait generators) share: where an
OpenAI-compatible endpoint is and which key it takes, and the one-line message a refused request becomes."""

from __future__ import annotations

import os
from typing import Any


def openai_endpoint(base_url: str | None, api_key: str | None) -> tuple[str | None, str | None]:
    """(base URL, API key) of an OpenAI-compatible endpoint: the arguments, else $OPENAI_BASE_URL and
    $OPENAI_API_KEY; a named server without a key gets "EMPTY" (local servers take any key), api.openai.com
    (base URL None) gets None when no key is set."""
    url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    key = api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if url else None)
    return url, key


def status_message(who: str, where: str, code: Any, detail: Any, *, model: str, retries: int, key_hint: str,
                   root_hint: str = "that the URL is the API root", busy_hint: str = "try again later") -> str:
    """The one-line message of an HTTP status that ended a request for good (after the client's retries).

    `who` ("judge", "generator") and `where` (the server) start it; the hints say what to do about a
    rejected key, a 404 (where the API root is) and a rate limit."""
    detail = " ".join(str(detail).split())[:160]
    if code in (401, 403):
        return f"{who} at {where} rejected the API key (HTTP {code}): {key_hint}"
    if code == 404:
        return f"{who} at {where} answered HTTP 404 for model '{model}': check the model name and {root_hint}"
    if code == 429:
        return f"{who} at {where} is still rate-limited after {retries} retries: {busy_hint}"
    if isinstance(code, int) and code >= 500:
        return f"{who} at {where} failed with HTTP {code} after {retries} retries: check the server ({detail})"
    return f"{who} at {where} refused the request (HTTP {code}: {detail}); check the model name and URL"
