"""The FastAPI app: OpenAI's `/v1/chat/completions` (plain and streamed), the legacy `/v1/completions`
(raw prompts; `echo` + `logprobs` score a prompt, as lm-evaluation-harness's `local-completions` model
asks) and `/v1/models`, plus per-request steering (`"steer"`), steered model names (a name that steers
every request sent to it, for clients that send fixed bodies) and persona monitoring (`"persona"`).

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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import VectorError
from ..models import text_config
from ..vectors import name_by_trait
from .engine import Engine, Event, Job, Result, SteerTerm, TokenLogprob
from .log import RequestLog
from .schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    RequestBase,
    SteerSpec,
    chunk_body,
    completion_body,
    completion_id,
    parse_request,
    text_completion_body,
    usage_body,
)

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector


@dataclass(frozen=True)
class ServeSettings:
    """Operator settings. `max_batch_size`: requests generated together in one continuous batch (each with its
    own steering). `max_queue`: requests that may wait beyond those (more get 429).
    `max_tokens_limit`: the most completion tokens one request may ask for (also the default).
    `steered_models`: extra model names, each steering every request sent to it with its terms (before
    the request's own `steer`), e.g. {"evil-8": [{"vector": "evil", "coef": 8, "positions": "all"}]};
    `schemas.parse_steered_model` reads the `NAME=VECTOR:COEF[:LAYER][:POSITIONS]` form."""

    api_key: str | None = None
    max_queue: int = 16
    max_batch_size: int = 32
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 512
    log_path: Path | None = None
    log_prompts: bool = False
    model_name: str | None = None  # the name clients pass as `model` (default: the model's id)
    allow_model_mismatch: bool = False
    steered_models: Mapping[str, Sequence[SteerSpec | Mapping[str, Any]]] = field(default_factory=dict)


name_vectors = name_by_trait  # the server's name for it (serve/__init__ and the CLI import it)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


Indexed = tuple[int, Event]  # (choice index, engine event)


def create_app(model: Model, vectors: Mapping[str, PersonaVector] | Sequence[PersonaVector],
               settings: ServeSettings | None = None) -> FastAPI:
    """An app serving `model` with `vectors` (a {name: vector} mapping, or a list named by trait)."""
    cfg = settings or ServeSettings()
    named = name_by_trait(vectors)
    for vec in named.values():
        vec.check_model(model, cfg.allow_model_mismatch)
    engine = Engine(model, named, max_queue=cfg.max_queue, request_log=RequestLog(cfg.log_path, cfg.log_prompts),
                    max_batch_size=cfg.max_batch_size)
    served = cfg.model_name or model.model_id
    fingerprint = f"personavec-{__version__}-{model.fingerprint}"
    context = int(getattr(text_config(model.hf.config), "max_position_embeddings", 0) or 1 << 30)
    vocab = int(model.hf.get_input_embeddings().num_embeddings)
    tokenizer = model.tokenizer
    started = int(time.time())

    def resolve_steer(specs: Sequence[SteerSpec], where: str) -> list[SteerTerm]:
        terms = []
        for i, s in enumerate(specs):
            vec = named.get(s.vector)
            if vec is None:
                raise ApiError(400, f"unknown vector '{s.vector}'; this server has: {', '.join(named) or 'none'}",
                               param=f"{where}.{i}.vector", code="unknown_vector")
            layer = s.layer if s.layer is not None else vec.layer
            if not 1 <= layer <= model.n_layers:
                raise ApiError(400, f"layer {layer} is out of range 1..{model.n_layers} (layer L = output of "
                               "decoder block L)", param=f"{where}.{i}.layer")
            terms.append(SteerTerm(s.vector, layer, float(s.coef), s.positions, vec.at(layer)))
        return terms

    steered: dict[str, list[SteerTerm]] = {}
    for name, specs in cfg.steered_models.items():
        if name == served or not name:
            raise VectorError(f"steered model name '{name}' must differ from the served model's name")
        try:
            steered[name] = resolve_steer([SteerSpec.model_validate(s) for s in specs], name)
        except ApiError as exc:
            raise VectorError(f"steered model '{name}': {exc.message}") from None
        except ValueError as exc:
            raise VectorError(f"steered model '{name}': {exc}") from None

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

    async def read_request(request: Request, kind: type[RequestBase]) -> Any:
        check_auth(request)
        body = await read_body(request)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        return parse_request(data, kind)

    def request_steer(req: RequestBase) -> list[SteerTerm]:
        """The model name's steering (a steered model), then the request's own `steer` terms."""
        if req.model != served and req.model not in steered:
            names = ", ".join([served, *steered])
            raise ApiError(404, f"model '{req.model}' is not served here; this server has {names}",
                           code="model_not_found", param="model")
        return steered.get(req.model, []) + resolve_steer(req.steer, "steer")

    def encode(req: ChatRequest) -> list[int]:
        try:
            return model.encode_chat([m.as_chat() for m in req.messages])
        except Exception as exc:  # the chat template rejects this conversation (e.g. roles out of order)
            raise ApiError(400, f"the model's chat template rejects these messages: {exc}",
                           param="messages") from None

    def budget(wanted: int | None, n_prompt: int, param: str, *, least: int = 1) -> int:
        if wanted is not None and wanted > cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {wanted} is more than this server allows ({cfg.max_tokens_limit}); "
                           "ask for fewer", param="max_tokens")
        room = context - n_prompt
        if room < least or (wanted is not None and wanted > room):
            raise ApiError(400, f"the prompt has {n_prompt} tokens and the model's context is {context}; shorten "
                           f"the {param} or ask for fewer tokens", param=param, code="context_length_exceeded")
        return min(cfg.max_tokens_limit if wanted is None else wanted, room)

    def submit(jobs: list[Job]) -> None:
        if not engine.try_submit(jobs[0] if len(jobs) == 1 else jobs):
            raise ApiError(429, f"the server is busy ({engine.max_batch_size} requests run and {engine.max_queue} "
                           "wait); retry shortly",
                           kind="rate_limit_error", code="queue_full", headers={"retry-after": "1"})

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

    def log_fields(cid: str, req: RequestBase, **more: Any) -> dict[str, Any]:
        return {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "id": cid,
                "model": req.model, "stream": req.stream, **more}

    def token_text(cache: dict[int, str], tok: int) -> str:
        if tok not in cache:
            cache[tok] = tokenizer.decode([tok])
        return cache[tok]

    def chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's chat `logprobs` object: per generated token its text, logprob, UTF-8 bytes and top-k."""
        names: dict[int, str] = {}

        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = token_text(names, tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}
        return {"content": [entry(tok, lp or 0.0) | {"top_logprobs": [entry(t, v) for t, v in top]}
                            for tok, lp, top in lps], "refusal": None}

    def legacy_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        """The legacy completions `logprobs` object: tokens, token_logprobs (None for a first prompt token),
        top_logprobs (the k most likely alternatives and the token itself, as OpenAI returns up to k+1) and
        text_offset (character offsets into prompt + completion text, running over the token texts)."""
        names: dict[int, str] = {}
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for tok, lp, top in lps:
            text = token_text(names, tok)
            tokens.append(text)
            values.append(lp)
            offsets.append(offset)
            offset += len(text)
            if lp is None:
                tops.append(None)
            else:
                alts = {token_text(names, t): v for t, v in top}
                alts.setdefault(text, lp)
                tops.append(alts)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    async def collect(request: Request, jobs: list[Job], events: asyncio.Queue[Indexed]) -> list[Result]:
        results: dict[int, Result] = {}
        while len(results) < len(jobs):
            try:
                index, (kind, value) = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    for job in jobs:
                        job.cancel.set()  # frees the slot at the next token; the "done" events still arrive
                continue
            except asyncio.CancelledError:
                for job in jobs:
                    job.cancel.set()
                raise
            if kind == "error":
                for job in jobs:
                    job.cancel.set()
                raise ApiError(500, f"generation failed: {type(value).__name__}", kind="server_error")
            if kind == "done":
                results[index] = value
        return [results[i] for i in range(len(jobs))]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served, "in_flight": engine.in_flight, "max_queue": engine.max_queue,
                "max_batch_size": engine.max_batch_size}

    def model_card(name: str = served) -> dict[str, Any]:
        readings = {} if engine.monitor is None else {
            vname: {"layer": engine.monitor.dirs[vname][0], "threshold": engine.monitor.thresholds[vname][0],
                    "response_threshold": engine.monitor.thresholds[vname][1], "steer_layer": vec.layer}
            for vname, vec in named.items()}
        card = {"id": name, "object": "model", "created": started, "owned_by": "personavec",
                "persona_vectors": readings}
        if name != served:
            card |= {"root": served, "parent": served, "steer": [t.describe() for t in steered[name]]}
        return card

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [model_card(), *(model_card(name) for name in steered)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        if model_id != served and model_id not in steered:
            raise ApiError(404, f"model '{model_id}' is not served here; this server has '{served}'",
                           code="model_not_found", param="model")
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req: ChatRequest = await read_request(request, ChatRequest)
        terms = request_steer(req)
        prompt = encode(req)
        max_tokens = budget(req.requested_tokens(), len(prompt), "messages")
        cid = completion_id()
        events, emitter = channel()
        fields = log_fields(cid, req, messages=[m.as_chat() for m in req.messages])
        job = Job(prompt=prompt, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                  seed=req.seed if req.seed is not None else secrets.randbits(63), stops=req.stops,
                  ignore_eos=req.ignore_eos, steer=terms, logprobs=req.top_k_logprobs, emit=emitter(0),
                  log_fields=fields)
        submit([job])
        steer_echo = [t.describe() for t in terms]
        if req.stream:
            created = int(time.time())
            usage_null = {"usage": None} if req.include_usage else {}

            def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
                return chunk_body(cid, req.model, fingerprint, created, delta, finish, usage_null | extra)

            def finish(_i: int, result: Result) -> dict[str, Any]:
                return chunk({}, result.finish_reason, persona=result.persona, steer=steer_echo)

            def usage(results: list[Result]) -> dict[str, Any]:
                return chunk(None, usage=results[0].usage)

            first = chunk({"role": "assistant", "content": ""})
            return StreamingResponse(
                _stream([job], events, first=[first], delta=lambda _i, text: chunk({"content": text}), finish=finish,
                        usage=usage if req.include_usage else None),
                media_type="text/event-stream", headers={"cache-control": "no-cache"})
        (result,) = await collect(request, [job], events)
        logprobs = None if result.logprobs is None else chat_logprobs(result.logprobs)
        return completion_body(cid, req.model, fingerprint, result.text, result.finish_reason, result.usage,
                               {"persona": result.persona, "steer": steer_echo}, logprobs)

    def tokenize(prompts: list[str | list[int]]) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            ids = tokenizer(p).input_ids if isinstance(p, str) else p  # special tokens as vLLM adds them
            where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            if not ids:
                raise ApiError(400, f"{where}: the prompt has no tokens", param=where)
            if bad := [t for t in ids if not 0 <= t < vocab]:
                raise ApiError(400, f"{where}: token id {bad[0]} is out of the vocabulary 0..{vocab - 1}",
                               param=where)
            out.append(list(ids))
        return out

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = await read_request(request, CompletionRequest)
        terms = request_steer(req)
        scored = req.echo and req.logprobs is not None
        if scored and terms and all(t.positions == "response" for t in terms):
            raise ApiError(400, "steering at 'response' positions leaves the echoed prompt's logprobs unsteered "
                           "(it acts from the last prompt token on); steer 'all' or 'prompt' positions to score "
                           "text under steering", param="steer", code="unsupported_value")
        texts = req.prompt_list()
        prompts = tokenize(texts)
        max_tokens = [budget(req.max_tokens, len(p), "prompt", least=0 if req.max_tokens == 0 else 1)
                      for p in prompts]
        cid = completion_id("cmpl")
        events, emitter = channel()
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        jobs = [Job(prompt=p, max_tokens=m, temperature=req.temperature, top_p=req.top_p, seed=seed, stops=req.stops,
                    ignore_eos=req.ignore_eos, steer=terms, logprobs=req.logprobs, echo=req.echo, emit=emitter(i),
                    log_fields=log_fields(cid, req, index=i, prompt=t if isinstance(t, str) else tokenizer.decode(t)))
                for i, (p, m, t) in enumerate(zip(prompts, max_tokens, texts, strict=True))]
        submit(jobs)
        steer_echo = [t.describe() for t in terms]
        created = int(time.time())
        if req.stream:
            usage_null = {"usage": None} if req.include_usage else {}

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
                return text_completion_body(cid, req.model, fingerprint, created, choices, usage_null | extra)

            def delta(i: int, text: str) -> dict[str, Any]:
                return chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])

            def finish(i: int, result: Result) -> dict[str, Any]:
                return chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": result.finish_reason,
                               "persona": result.persona}], steer=steer_echo)

            def usage(results: list[Result]) -> dict[str, Any]:
                return chunk([], usage=usage_body(sum(r.prompt_tokens for r in results),
                                                  sum(r.completion_tokens for r in results)))

            return StreamingResponse(_stream(jobs, events, first=[], delta=delta, finish=finish,
                                             usage=usage if req.include_usage else None),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        results = await collect(request, jobs, events)
        choices = []
        for i, (result, text, ids) in enumerate(zip(results, texts, prompts, strict=True)):
            prompt_text = text if isinstance(text, str) else tokenizer.decode(ids)
            # as vLLM and OpenAI do, the end token that stopped generation is listed (its text is not):
            # lm-eval reads the prompt's logprobs as everything before the last listed token
            listed = None if result.logprobs is None else result.logprobs + (
                [result.stop_logprob] if result.stop_logprob is not None else [])
            logprobs = None if listed is None else legacy_logprobs(listed, 0 if req.echo else len(prompt_text))
            choices.append({"index": i, "text": (prompt_text if req.echo else "") + result.text,
                            "logprobs": logprobs, "finish_reason": result.finish_reason, "persona": result.persona})
        total = usage_body(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
        return text_completion_body(cid, req.model, fingerprint, created, choices, {"usage": total,
                                                                                    "steer": steer_echo})

    return app


async def _stream(jobs: list[Job], events: asyncio.Queue[Indexed], *, first: list[dict[str, Any]],
                  delta: Callable[[int, str], dict[str, Any]], finish: Callable[[int, Result], dict[str, Any]],
                  usage: Callable[[list[Result]], dict[str, Any]] | None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format: the `first` chunks (chat: the role), content chunks, per
    choice a chunk with finish_reason (personavec adds persona and steer there), then, only when the
    client asked with `stream_options.include_usage`, a closing chunk without choices carrying usage,
    then [DONE]. If the client goes away, the generator is closed and the jobs are cancelled (the queue
    slot frees at the next token)."""
    results: dict[int, Result] = {}
    try:
        for chunk in first:
            yield _sse(chunk)
        while len(results) < len(jobs):
            index, (kind, value) = await events.get()
            if kind == "delta":
                yield _sse(delta(index, value))
            elif kind == "error":
                yield _sse(ApiError(500, f"generation failed: {type(value).__name__}", kind="server_error").body())
                return
            else:
                results[index] = value
                yield _sse(finish(index, value))
        if usage is not None:
            yield _sse(usage([results[i] for i in range(len(jobs))]))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel.set()  # a no-op for finished jobs
