"""A real OpenAI-compatible HTTP server for tests, backed by a real model's next-token logprobs.

FastAPI served by uvicorn on 127.0.0.1 (a free port) in a background thread. `/v1/chat/completions`
renders the request's messages with the model's chat template and answers with the top-k logprobs of
the first answer token, in the JSON shape the official `openai` client parses. Knobs: fail the first N
requests with a status code (to exercise retries), require a bearer token, leave out logprobs, count
requests (to check caching)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from personavec.models import Model
from personavec.serve.background import serve_in_thread


class FakeOpenAI:
    """State and knobs of one fake server; `url` is the base URL to give the client (ends in /v1)."""

    def __init__(self, model: Model, *, fail_first: int = 0, fail_status: int = 429,
                 token: str | None = None, omit_logprobs: bool = False) -> None:
        self.model = model
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.token = token
        self.omit_logprobs = omit_logprobs  # behave like a server without logprobs support
        self.requests = 0  # every POST to /v1/chat/completions, failed ones included
        self.served: dict[str, list[tuple[str, float]]] = {}  # last user message -> top-k list answered
        self.port = 0
        self._lock = threading.Lock()  # one forward at a time: requests arrive on several threads
        self.app = self._build_app()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def top_logprobs(self, messages: list[dict[str, str]], k: int) -> tuple[int, list[tuple[str, float]]]:
        """(prompt length, [(token text, logprob)] of the k likeliest first answer tokens)."""
        ids = self.model.encode_chat(messages)
        with self._lock, torch.no_grad():
            logits = self.model.hf(input_ids=torch.tensor([ids], device=self.model.device)).logits[0, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            values, indices = logp.topk(k)
        tok = self.model.tokenizer
        return len(ids), [(tok.decode([int(i)]), float(v)) for v, i in zip(values, indices, strict=True)]

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        def error(status: int, message: str, kind: str) -> JSONResponse:
            # retry-after-ms keeps the client's backoff short in tests (the client honours it)
            return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                                status_code=status, headers={"retry-after-ms": "10"})

        @app.post("/v1/chat/completions")
        def chat_completions(request: Request, body: dict[str, Any]) -> Any:
            with self._lock:
                self.requests += 1
                n = self.requests
            if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
                return error(401, "Incorrect API key provided", "invalid_request_error")
            if n <= self.fail_first:
                kind = "rate_limit_exceeded" if self.fail_status == 429 else "server_error"
                return error(self.fail_status, f"injected failure {n}", kind)
            k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
            n_prompt, top = self.top_logprobs(body["messages"], max(k, 1))
            first = top[0][0]
            self.served[body["messages"][-1]["content"]] = top[:k]

            def entry(text: str, lp: float) -> dict[str, Any]:
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

            logprobs = None
            if body.get("logprobs") and not self.omit_logprobs:
                logprobs = {"content": [{**entry(*top[0]), "top_logprobs": [entry(t, lp) for t, lp in top[:k]]}],
                            "refusal": None}
            return {
                "id": f"chatcmpl-fake-{n}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"), "system_fingerprint": "fake",
                "choices": [{"index": 0, "finish_reason": "length", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": first, "refusal": None}}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": 1, "total_tokens": n_prompt + 1},
            }

        return app


@contextmanager
def serve(fake: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """Run `fake` on a free loopback port for the duration of the block."""
    with serve_in_thread(fake.app, lifespan="off", stop_timeout=10) as root:
        fake.port = int(root.rsplit(":", 1)[1])
        yield fake


def closed_port_url() -> str:
    """A loopback base URL nothing listens on (connection refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
