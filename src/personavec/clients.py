"""What the HTTP clients (the OpenAI-compatible judge, the trait generators) share: where an
OpenAI-compatible endpoint is and which key it takes, a POST that rides out rate limits and restarts (for
APIs without an official client here), and the one-line message a refused request becomes."""

from __future__ import annotations

import os
import time
from typing import Any

from .errors import PersonavecError


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


def post_with_retries(url: str, body: dict[str, Any], headers: dict[str, str], *, timeout: float,
                      max_retries: int, who: str, where: str) -> Any:
    """POST `body` as JSON over httpx and return the response, whatever its status. Connection errors are
    retried with exponential backoff, 429 and 5xx after the server's retry-after, up to `max_retries`
    times; a server still unreachable then is a PersonavecError naming `who` ("generator") and `where`."""
    import httpx

    for attempt in range(max_retries + 1):
        try:
            resp = httpx.post(url, json=body, headers=headers, timeout=timeout)
        except httpx.TransportError:
            if attempt == max_retries:
                raise PersonavecError(f"{who} at {where} is unreachable after {max_retries} retries: "
                                      "check the URL and the network") from None
            time.sleep(min(2.0 ** attempt, 30))
            continue
        if (resp.status_code == 429 or resp.status_code >= 500) and attempt < max_retries:
            time.sleep(retry_after(resp.headers, attempt))
            continue
        return resp
    raise AssertionError("unreachable")


def retry_after(headers: Any, attempt: int) -> float:
    """Seconds to wait before retry `attempt`: the server's retry-after(-ms), capped at a minute, else
    exponential backoff capped at 30 s."""
    for key, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return min(float(headers[key]) * scale, 60.0)
        except (KeyError, TypeError, ValueError):
            continue
    return min(2.0 ** attempt, 30.0)
