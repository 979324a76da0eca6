"""The generators a spec string names (see the package docstring): functions from chat messages to the
reply text over the official `openai` client, the Anthropic Messages API, or a local model."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..clients import openai_endpoint, post_with_retries, status_message
from ..errors import PersonavecError
from .loop import Generator
from .prompts import Message

if TYPE_CHECKING:
    from ..models import Model

ANTHROPIC_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"


def openai_generator(model: str, base_url: str | None = None, api_key: str | None = None, *,
                     temperature: float = 0.7, max_tokens: int = 8000, max_retries: int = 3,
                     timeout: float = 300) -> Generator:
    """Chat completions through the official `openai` client (its retries ride out 429s and restarts)."""
    import openai

    base_url, key = openai_endpoint(base_url, api_key)
    if key is None:
        raise PersonavecError("no API key for the generator: set OPENAI_API_KEY or pass --api-key, or name a "
                              "local OpenAI-compatible server with --generator openai:MODEL@URL")
    client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=max_retries, timeout=timeout)
    where = base_url or "api.openai.com"

    def call(messages: list[Message]) -> str:
        try:
            resp = client.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                  temperature=temperature, max_tokens=max_tokens)
        except openai.APIStatusError as exc:
            raise PersonavecError(_status_message(where, model, exc.status_code, str(getattr(exc, "message", exc)),
                                                  max_retries)) from None
        except openai.APIConnectionError:
            raise PersonavecError(f"generator at {where} is unreachable after {max_retries} retries: check the "
                                  "URL in --generator openai:MODEL@URL and that the server runs") from None
        except openai.OpenAIError as exc:
            raise PersonavecError(f"generator at {where} gave an unusable answer ({type(exc).__name__}); check "
                                  "that the URL is an OpenAI-compatible /v1 endpoint") from None
        choice = resp.choices[0] if resp.choices else None
        return (choice.message.content or "") if choice is not None else ""

    return call


def anthropic_generator(model: str, base_url: str | None = None, api_key: str | None = None, *,
                        temperature: float = 0.7, max_tokens: int = 8000, max_retries: int = 3,
                        timeout: float = 300) -> Generator:
    """The Anthropic Messages API over httpx: system prompt as a top-level field, retries with backoff on
    429/5xx and connection errors (honouring retry-after)."""
    base = (base_url or os.environ.get("ANTHROPIC_BASE_URL") or ANTHROPIC_URL).rstrip("/")
    base = base.removesuffix("/v1")
    key = api_key or os.environ.get("ANTHROPIC_API_KEY")
    if key is None:
        raise PersonavecError("no API key for the generator: set ANTHROPIC_API_KEY or pass --api-key")
    headers = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}

    def call(messages: list[Message]) -> str:
        body = _anthropic_body(model, messages, temperature, max_tokens)
        resp = post_with_retries(f"{base}/v1/messages", body, headers, timeout=timeout, max_retries=max_retries,
                                 who="generator", where=base)
        if resp.status_code != 200:
            raise PersonavecError(_status_message(base, model, resp.status_code, _anthropic_detail(resp),
                                                  max_retries))
        try:
            blocks = resp.json()["content"]
            return "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PersonavecError(f"generator at {base} did not answer like the Messages API; check the "
                                  "URL in --generator anthropic:MODEL@URL") from None

    return call


def _anthropic_body(model: str, messages: list[Message], temperature: float, max_tokens: int) -> dict[str, Any]:
    """The Messages API takes system prompts as one top-level field, not as turns."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                            "messages": [m for m in messages if m["role"] != "system"]}
    if system:
        body["system"] = system
    return body


def _anthropic_detail(resp: Any) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:160]


def _status_message(where: str, model: str, code: Any, detail: str, retries: int) -> str:
    return status_message("generator", where, code, detail, model=model, retries=retries,
                          key_hint="set the API key or pass --api-key")


def local_generator(model: Model, *, max_new_tokens: int = 3000) -> Generator:
    """A local chat model, greedy (small models rarely follow the format: expect retries)."""
    from ..generation import generate

    def call(messages: list[Message]) -> str:
        return generate(model, [messages], max_new_tokens=max_new_tokens, temperature=0.0)[0]

    return call


def make_generator(spec: str, *, api_key: str | None = None, temperature: float = 0.7, max_tokens: int = 8000,
                   load: Callable[[str | None], Model] | None = None) -> Generator:
    """Build the generator a spec names (see the package docstring). `load` loads a local model (the CLI
    passes its spinner-wrapped loader)."""
    kind, _, rest = spec.partition(":")
    name, _, url = rest.partition("@")
    if kind == "openai" and name:
        return openai_generator(name, url or None, api_key, temperature=temperature, max_tokens=max_tokens)
    if kind == "anthropic" and name:
        return anthropic_generator(name, url or None, api_key, temperature=temperature, max_tokens=max_tokens)
    if kind == "local":
        if load is None:
            from ..models import load_model

            return local_generator(load_model(rest or None), max_new_tokens=max_tokens)
        return local_generator(load(rest or None), max_new_tokens=max_tokens)
    raise PersonavecError(f"unknown generator '{spec}'; use openai:MODEL[@URL], anthropic:MODEL[@URL] or "
                          "local[:MODEL]")
