"""How the engine's events reach a request: the worker thread emits into the request's asyncio queue
(`channel`); a plain request waits for every choice's result (`collect`), a streamed one becomes
server-sent events (`stream`). Both cancel the jobs when the client goes away, so a queue slot frees at
the next token."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import PersonavecError
from .engine import Event, Job, Result
from .schemas import ApiError

Indexed = tuple[int, Event]  # (choice index, engine event)


class Chunks(Protocol):
    """The chunks of one streamed response (chat or legacy completions)."""

    @property
    def include_usage(self) -> bool: ...

    def first(self) -> list[dict[str, Any]]: ...

    def delta(self, index: int, text: str) -> dict[str, Any]: ...

    def finish(self, index: int, result: Result) -> dict[str, Any]: ...

    def usage(self, results: list[Result]) -> dict[str, Any]: ...


def channel() -> tuple[asyncio.Queue[Indexed], Callable[[int], Callable[[Event], None]]]:
    """A queue of (choice index, event) and, per index, the thread-safe `emit` the worker calls."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Indexed] = asyncio.Queue()

    def emitter(index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down)
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
        return emit
    return events, emitter


def failure(exc: Exception) -> ApiError:
    """A failed generation's answer: a user's error (a PersonavecError, e.g. steering the request's checks
    let through) is a 400 with its message, anything else a bug (500)."""
    if isinstance(exc, PersonavecError):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {type(exc).__name__}", kind="server_error")


def _cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancel.set()  # frees the slot at the next token (a no-op for finished jobs)


async def collect(request: Request, jobs: list[Job], events: asyncio.Queue[Indexed]) -> list[Result]:
    """Every job's result in choice order; polls for a client that went away (then cancels, and the
    "done" events still arrive); a failed generation is answered by `failure`."""
    results: dict[int, Result] = {}
    while len(results) < len(jobs):
        try:
            index, (kind, value) = await asyncio.wait_for(events.get(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                _cancel(jobs)
            continue
        except asyncio.CancelledError:
            _cancel(jobs)
            raise
        if kind == "error":
            _cancel(jobs)
            raise failure(value)
        if kind == "done":
            results[index] = value
    return [results[i] for i in range(len(jobs))]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def stream(jobs: list[Job], events: asyncio.Queue[Indexed], chunks: Chunks) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format: the `first` chunks (chat: the role), content chunks, per
    choice a chunk with finish_reason (personavec adds persona and steer there), then, only when the
    client asked with `stream_options.include_usage`, a closing chunk without choices carrying usage,
    then [DONE]. If the client goes away, the generator is closed and the jobs are cancelled (the queue
    slot frees at the next token)."""
    results: dict[int, Result] = {}
    try:
        for chunk in chunks.first():
            yield _sse(chunk)
        while len(results) < len(jobs):
            index, (kind, value) = await events.get()
            if kind == "delta":
                yield _sse(chunks.delta(index, value))
            elif kind == "error":
                yield _sse(failure(value).body())
                return
            else:
                results[index] = value
                yield _sse(chunks.finish(index, value))
        if chunks.include_usage:
            yield _sse(chunks.usage([results[i] for i in range(len(jobs))]))
        yield "data: [DONE]\n\n"
    finally:
        _cancel(jobs)


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
