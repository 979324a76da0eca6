"""A real chat-API server for tests of the trait generator: scripted replies over real HTTP on loopback.

FastAPI + uvicorn (started with `openai_fake.serve`) answering both protocols a generator speaks:
`POST /v1/chat/completions` in the OpenAI shape the official client parses, and `POST /v1/messages` in the
Anthropic Messages shape (x-api-key and anthropic-version headers required). Each request takes the next
scripted reply (the last one repeats); every request body is kept so tests can check what was sent back.
A test double only because the real thing (a paid frontier model) cannot run here."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from personavec.serve.background import serve_in_thread


class ScriptedChat:
    """`replies`: texts answered in order. `fail_first`: answer the first N requests with HTTP 429."""

    def __init__(self, replies: list[str], *, api_key: str = "test-key", fail_first: int = 0) -> None:
        self.replies = list(replies)
        self.api_key = api_key
        self.fail_first = fail_first
        self.bodies: list[dict[str, Any]] = []  # answered requests (not the injected failures)
        self.requests = 0
        self.port = 0
        self._lock = threading.Lock()
        self.app = self._build_app()

    @property
    def url(self) -> str:
        """OpenAI-style base URL (ends in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        """Anthropic-style base URL (the client appends /v1/messages)."""
        return f"http://127.0.0.1:{self.port}"

    def _next(self, body: dict[str, Any]) -> tuple[int, str | None]:
        with self._lock:
            self.requests += 1
            if self.requests <= self.fail_first:
                return self.requests, None
            self.bodies.append(body)
            i = min(len(self.bodies), len(self.replies)) - 1
            return self.requests, self.replies[i]

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        def chat(request: Request, body: dict[str, Any]) -> Any:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                               "param": None, "code": None}}, status_code=401)
            n, text = self._next(body)
            if text is None:
                return JSONResponse({"error": {"message": "slow down", "type": "rate_limit_exceeded", "param": None,
                                               "code": None}}, status_code=429, headers={"retry-after-ms": "10"})
            return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "fake"), "system_fingerprint": "fake",
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant", "content": text, "refusal": None}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        @app.post("/v1/messages")
        def messages(request: Request, body: dict[str, Any]) -> Any:
            def error(status: int, kind: str, message: str) -> JSONResponse:
                return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                                    status_code=status, headers={"retry-after": "0"})

            if request.headers.get("x-api-key") != self.api_key:
                return error(401, "authentication_error", "invalid x-api-key")
            if not request.headers.get("anthropic-version"):
                return error(400, "invalid_request_error", "anthropic-version header is required")
            if "max_tokens" not in body or any(m.get("role") == "system" for m in body.get("messages", [])):
                return error(400, "invalid_request_error", "max_tokens required; system goes top-level")
            n, text = self._next(body)
            if text is None:
                return error(429, "rate_limit_error", "slow down")
            return {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": body["model"],
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 1}}

        return app


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve any ASGI app (lifespan on, so startup hooks run) on a free loopback port; yields its /v1 URL."""
    with serve_in_thread(app) as root:
        yield f"{root}/v1"
