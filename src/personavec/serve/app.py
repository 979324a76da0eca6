"""The FastAPI app: OpenAI's `/v1/chat/completions` (plain and streamed) and `/v1/models`, plus
per-request steering (`"steer"`) and persona monitoring (`"persona"`) in every answer.

Every request passes, in order: bearer-token auth (401), the body size limit (413), JSON and schema
validation (400, or 404 for an unknown model), the steering and token-budget checks (400), then
admission into the engine's bounded queue (429 when full). Errors use OpenAI's body shape, so the
official client raises its usual exception classes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import VectorError
from .engine import Engine, Event, Job, Result, SteerTerm
from .log import RequestLog
from .schemas import ApiError, ChatRequest, chunk_body, completion_body, completion_id, parse_request

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector


@dataclass(frozen=True)
class ServeSettings:
    """Operator settings. `max_queue`: requests that may wait behind the running one (more get 429).
    `max_tokens_limit`: the most completion tokens one request may ask for (also the default)."""

    api_key: str | None = None
    max_queue: int = 16
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 512
    log_path: Path | None = None
    log_prompts: bool = False
    model_name: str | None = None  # the name clients pass as `model` (default: the model's id)
    allow_model_mismatch: bool = False


def name_vectors(vectors: Sequence[PersonaVector]) -> dict[str, PersonaVector]:
    """Name each vector by its trait; two vectors of one trait would be ambiguous in a request."""
    named: dict[str, PersonaVector] = {}
    for vec in vectors:
        if vec.trait in named:
            raise VectorError(f"two vectors are named '{vec.trait}'; serve one vector per trait")
        named[vec.trait] = vec
    return named


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(model: Model, vectors: Mapping[str, PersonaVector] | Sequence[PersonaVector],
               settings: ServeSettings | None = None) -> FastAPI:
    """An app serving `model` with `vectors` (a {name: vector} mapping, or a list named by trait)."""
    cfg = settings or ServeSettings()
    named = dict(vectors) if isinstance(vectors, Mapping) else name_vectors(vectors)
    for vec in named.values():
        vec.check_model(model, cfg.allow_model_mismatch)
    engine = Engine(model, named, max_queue=cfg.max_queue, request_log=RequestLog(cfg.log_path, cfg.log_prompts))
    served = cfg.model_name or model.model_id
    fingerprint = f"personavec-{__version__}-{model.fingerprint}"
    text_config = model.hf.config.get_text_config() if hasattr(model.hf.config, "get_text_config") else model.hf.config
    context = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 30)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="personavec", version=__version__, lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await _api_error(_r, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(_r, ApiError(400, str(exc.errors()[0].get("msg", "invalid request"))))

    def check_auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = cfg.max_request_bytes
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_big
        return bytes(body)

    def resolve_steer(req: ChatRequest) -> list[SteerTerm]:
        terms = []
        for i, s in enumerate(req.steer):
            vec = named.get(s.vector)
            if vec is None:
                raise ApiError(400, f"unknown vector '{s.vector}'; this server has: {', '.join(named) or 'none'}",
                               param=f"steer.{i}.vector", code="unknown_vector")
            layer = s.layer if s.layer is not None else vec.layer
            if not 1 <= layer <= model.n_layers:
                raise ApiError(400, f"layer {layer} is out of range 1..{model.n_layers} (layer L = output of "
                               "decoder block L)", param=f"steer.{i}.layer")
            terms.append(SteerTerm(s.vector, layer, float(s.coef), s.positions, vec.at(layer)))
        return terms

    def encode(req: ChatRequest) -> list[int]:
        try:
            return model.encode_chat([m.as_chat() for m in req.messages])
        except Exception as exc:  # the chat template rejects this conversation (e.g. roles out of order)
            raise ApiError(400, f"the model's chat template rejects these messages: {exc}",
                           param="messages") from None

    def budget(req: ChatRequest, n_prompt: int) -> int:
        wanted = req.requested_tokens()
        if wanted is not None and wanted > cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {wanted} is more than this server allows ({cfg.max_tokens_limit}); "
                           "ask for fewer", param="max_tokens")
        room = context - n_prompt
        if room < 1 or (wanted is not None and wanted > room):
            raise ApiError(400, f"the prompt has {n_prompt} tokens and the model's context is {context}; shorten "
                           "the messages or ask for fewer tokens", param="messages", code="context_length_exceeded")
        return min(wanted or cfg.max_tokens_limit, room)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served, "in_flight": engine.in_flight, "max_queue": engine.max_queue}

    def model_card() -> dict[str, Any]:
        readings = {} if engine.monitor is None else {
            name: {"layer": engine.monitor.dirs[name][0], "threshold": engine.monitor.thresholds[name][0],
                   "response_threshold": engine.monitor.thresholds[name][1], "steer_layer": vec.layer}
            for name, vec in named.items()}
        return {"id": served, "object": "model", "created": started, "owned_by": "personavec",
                "persona_vectors": readings}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        if model_id != served:
            raise ApiError(404, f"model '{model_id}' is not served here; this server has '{served}'",
                           code="model_not_found", param="model")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_auth(request)
        body = await read_body(request)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        req = parse_request(data)
        if req.model != served:
            raise ApiError(404, f"model '{req.model}' is not served here; this server has '{served}'",
                           code="model_not_found", param="model")
        terms = resolve_steer(req)
        prompt = encode(req)
        max_tokens = budget(req, len(prompt))
        cid = completion_id()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down)
                loop.call_soon_threadsafe(events.put_nowait, event)

        fields: dict[str, Any] = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "id": cid,
                                  "model": served, "stream": req.stream,
                                  "messages": [m.as_chat() for m in req.messages]}
        job = Job(prompt=prompt, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                  seed=req.seed if req.seed is not None else secrets.randbits(63), stops=req.stops,
                  ignore_eos=req.ignore_eos, steer=terms, emit=emit, log_fields=fields)
        if not engine.try_submit(job):
            raise ApiError(429, f"the server is busy ({engine.max_queue} requests already wait); retry shortly",
                           kind="rate_limit_error", code="queue_full", headers={"retry-after": "1"})
        steer_echo = [t.describe() for t in terms]
        if req.stream:
            return StreamingResponse(_stream(job, events, cid, served, fingerprint, steer_echo),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        pieces: list[str] = []
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()  # frees the slot at the next token; the "done" event still arrives
                continue
            except asyncio.CancelledError:
                job.cancel.set()
                raise
            if kind == "delta":
                pieces.append(value)
            elif kind == "error":
                raise ApiError(500, f"generation failed: {type(value).__name__}", kind="server_error")
            else:
                result: Result = value
                return completion_body(cid, served, fingerprint, result.text, result.finish_reason, result.usage,
                                       {"persona": result.persona, "steer": steer_echo})

    return app


async def _stream(job: Job, events: asyncio.Queue[Event], cid: str, served: str, fingerprint: str,
                  steer_echo: list[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format: a role chunk, content chunks, a chunk with finish_reason,
    then a closing chunk without choices carrying usage and persona, then [DONE]. If the client goes
    away, the generator is closed and the job is cancelled (its queue slot frees at the next token)."""
    created = int(time.time())
    finished = False
    try:
        yield _sse(chunk_body(cid, served, fingerprint, created, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield _sse(chunk_body(cid, served, fingerprint, created, {"content": value}))
            elif kind == "error":
                finished = True
                yield _sse(ApiError(500, f"generation failed: {type(value).__name__}", kind="server_error").body())
                return
            else:
                finished = True
                yield _sse(chunk_body(cid, served, fingerprint, created, {}, finish=value.finish_reason))
                yield _sse(chunk_body(cid, served, fingerprint, created, None,
                                      extra={"usage": value.usage, "persona": value.persona, "steer": steer_echo}))
                yield "data: [DONE]\n\n"
                return
    finally:
        if not finished:
            job.cancel.set()
