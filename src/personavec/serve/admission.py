"""The checks a parsed request passes before it runs, each answered in OpenAI's error shape: the model
name and steering (404/400), the prompt (400), the token budget (400), then the engine's bounded queue
(429 when full, with retry-after)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .engine import Job, SteerTerm
from .schemas import ApiError, ChatRequest, RequestBase
from .terms import resolve_steer

if TYPE_CHECKING:
    from .state import ServeState


def request_steer(state: ServeState, req: RequestBase) -> list[SteerTerm]:
    """The model name's steering (a steered model), then the request's own `steer` terms."""
    if req.model != state.served and req.model not in state.steered:
        names = ", ".join([state.served, *state.steered])
        raise ApiError(404, f"model '{req.model}' is not served here; this server has {names}",
                       code="model_not_found", param="model")
    return state.steered.get(req.model, []) + resolve_steer(state.vectors, state.model, req.steer, "steer")


def encode_chat(state: ServeState, req: ChatRequest) -> list[int]:
    """The conversation's prompt tokens under the model's chat template."""
    try:
        return state.model.encode_chat([m.as_chat() for m in req.messages])
    except Exception as exc:  # the chat template rejects this conversation (e.g. roles out of order)
        raise ApiError(400, f"the model's chat template rejects these messages: {exc}",
                       param="messages") from None


def tokenize(state: ServeState, prompts: list[str | list[int]]) -> list[list[int]]:
    """Legacy prompts as token ids: texts tokenized as vLLM does (special tokens added), id lists checked."""
    out = []
    for i, p in enumerate(prompts):
        ids = state.tokenizer(p).input_ids if isinstance(p, str) else p  # special tokens as vLLM adds them
        where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        if not ids:
            raise ApiError(400, f"{where}: the prompt has no tokens", param=where)
        if bad := [t for t in ids if not 0 <= t < state.vocab]:
            raise ApiError(400, f"{where}: token id {bad[0]} is out of the vocabulary 0..{state.vocab - 1}",
                           param=where)
        out.append(list(ids))
    return out


def budget(state: ServeState, wanted: int | None, n_prompt: int, param: str, *, least: int = 1) -> int:
    """Completion tokens for one prompt: what was asked (else the operator's limit), within the limit and
    the room the context leaves; `least` 0 lets a scoring request ask for none."""
    limit, context = state.settings.max_tokens_limit, state.context
    if wanted is not None and wanted > limit:
        raise ApiError(400, f"max_tokens {wanted} is more than this server allows ({limit}); "
                       "ask for fewer", param="max_tokens")
    room = context - n_prompt
    if room < least or (wanted is not None and wanted > room):
        raise ApiError(400, f"the prompt has {n_prompt} tokens and the model's context is {context}; shorten "
                       f"the {param} or ask for fewer tokens", param=param, code="context_length_exceeded")
    return min(limit if wanted is None else wanted, room)


def submit(state: ServeState, jobs: list[Job]) -> None:
    """Queue all of a request's jobs at once or none of them (429)."""
    engine = state.engine
    if not engine.try_submit(jobs[0] if len(jobs) == 1 else jobs):
        raise ApiError(429, f"the server is busy ({engine.max_batch_size} requests run and {engine.max_queue} "
                       "wait); retry shortly",
                       kind="rate_limit_error", code="queue_full", headers={"retry-after": "1"})


def check_scored_steering(scored: bool, terms: list[SteerTerm]) -> None:
    """Echoed prompt logprobs under steering need steering that reaches the prompt."""
    if scored and terms and all(t.positions == "response" for t in terms):
        raise ApiError(400, "steering at 'response' positions leaves the echoed prompt's logprobs unsteered "
                       "(it acts from the last prompt token on); steer 'all' or 'prompt' positions to score "
                       "text under steering", param="steer", code="unsupported_value")
