"""The endpoints: `/health` (open), and behind bearer auth `/v1/models`, `/v1/chat/completions` (plain and
streamed) and the legacy `/v1/completions` (raw prompts; `echo` + `logprobs` score a prompt). Each handler
reads the shared `ServeState`, runs the admission checks, queues its jobs and answers from their events."""

from __future__ import annotations

import secrets
import time
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request

from .admission import budget, check_scored_steering, encode_chat, request_steer, submit, tokenize
from .deps import State, read_request, require_auth
from .engine import Job, SteerTerm
from .events import channel, collect, sse_response, stream
from .log import log_fields
from .responses import ChatChunks, Reply, TextChunks, chat_body, model_card, text_body, text_choice
from .schemas import ApiError, ChatRequest, CompletionRequest, RequestBase, completion_id
from .state import ServeState

R = TypeVar("R", bound=Reply)

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_auth)])


@router.get("/health")
async def health(state: State) -> dict[str, Any]:
    engine = state.engine
    return {"status": "ok", "model": state.served, "in_flight": engine.in_flight, "max_queue": engine.max_queue,
            "max_batch_size": engine.max_batch_size}


@v1.get("/models")
async def list_models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state, name) for name in (state.served, *state.steered)]}


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> dict[str, Any]:
    if model_id != state.served and model_id not in state.steered:
        raise ApiError(404, f"model '{model_id}' is not served here; this server has '{state.served}'",
                       code="model_not_found", param="model")
    return model_card(state, model_id)


def _seed(req: RequestBase) -> int:
    return req.seed if req.seed is not None else secrets.randbits(63)


def _reply(kind: type[R], state: ServeState, cid: str, req: RequestBase, terms: list[SteerTerm]) -> R:
    return kind(cid, req.model, state.fingerprint, int(time.time()), [t.describe() for t in terms],
                req.include_usage)


@v1.post("/chat/completions")
async def chat_completions(request: Request, state: State) -> Any:
    req: ChatRequest = await read_request(request, state, ChatRequest)
    terms = request_steer(state, req)
    prompt = encode_chat(state, req)
    max_tokens = budget(state, req.requested_tokens(), len(prompt), "messages")
    cid = completion_id()
    events, emitter = channel()
    job = Job(prompt=prompt, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=_seed(req),
              stops=req.stops, ignore_eos=req.ignore_eos, steer=terms, logprobs=req.top_k_logprobs, emit=emitter(0),
              log_fields=log_fields(cid, req, messages=[m.as_chat() for m in req.messages]))
    submit(state, [job])
    reply = _reply(ChatChunks, state, cid, req, terms)
    if req.stream:
        return sse_response(stream([job], events, reply))
    (result,) = await collect(request, [job], events)
    return chat_body(reply, result, state.tokenizer)


@v1.post("/completions")
async def completions(request: Request, state: State) -> Any:
    req: CompletionRequest = await read_request(request, state, CompletionRequest)
    terms = request_steer(state, req)
    check_scored_steering(req.echo and req.logprobs is not None, terms)
    texts = req.prompt_list()
    prompts = tokenize(state, texts)
    max_tokens = [budget(state, req.max_tokens, len(p), "prompt", least=0 if req.max_tokens == 0 else 1)
                  for p in prompts]
    cid = completion_id("cmpl")
    events, emitter = channel()
    seed = _seed(req)
    prompt_texts = [t if isinstance(t, str) else state.tokenizer.decode(t) for t in texts]
    jobs = [Job(prompt=p, max_tokens=m, temperature=req.temperature, top_p=req.top_p, seed=seed, stops=req.stops,
                ignore_eos=req.ignore_eos, steer=terms, logprobs=req.logprobs, echo=req.echo, emit=emitter(i),
                log_fields=log_fields(cid, req, index=i, prompt=t))
            for i, (p, m, t) in enumerate(zip(prompts, max_tokens, prompt_texts, strict=True))]
    submit(state, jobs)
    reply = _reply(TextChunks, state, cid, req, terms)
    if req.stream:
        return sse_response(stream(jobs, events, reply))
    results = await collect(request, jobs, events)
    choices = [text_choice(i, r, t, req.echo, state.tokenizer)
               for i, (r, t) in enumerate(zip(results, prompt_texts, strict=True))]
    return text_body(reply, choices, results)
