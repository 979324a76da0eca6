"""Engine results in OpenAI's response shapes: logprobs objects (chat and legacy), the chunks of a
streamed response, the final bodies, and the model cards; personavec adds `persona` and `steer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .engine import Result, TokenLogprob
from .schemas import chunk_body, completion_body, text_completion_body, usage_body

if TYPE_CHECKING:
    from .state import ServeState


@dataclass
class TokenNames:
    """Token texts, each decoded once per response."""

    tokenizer: Any
    cache: dict[int, str] = field(default_factory=dict)

    def __call__(self, tok: int) -> str:
        if tok not in self.cache:
            self.cache[tok] = self.tokenizer.decode([tok])
        return self.cache[tok]


def chat_logprobs(tokenizer: Any, lps: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: per generated token its text, logprob, UTF-8 bytes and top-k."""
    names = TokenNames(tokenizer)

    def entry(tok: int, lp: float) -> dict[str, Any]:
        text = names(tok)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [entry(tok, lp or 0.0) | {"top_logprobs": [entry(t, v) for t, v in top]}
                        for tok, lp, top in lps], "refusal": None}


def legacy_logprobs(tokenizer: Any, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs (None for a first prompt token),
    top_logprobs (the k most likely alternatives and the token itself, as OpenAI returns up to k+1) and
    text_offset (character offsets into prompt + completion text, running over the token texts)."""
    names = TokenNames(tokenizer)
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tok, lp, top in lps:
        text = names(tok)
        tokens.append(text)
        values.append(lp)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            tops.append(None)
        else:
            alts = {names(t): v for t, v in top}
            alts.setdefault(text, lp)
            tops.append(alts)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


@dataclass(frozen=True)
class Reply:
    """What every body of one response repeats: its id, the model name asked for, the server's fingerprint,
    the creation time and the steering applied (echoed as `steer`)."""

    cid: str
    model: str
    fingerprint: str
    created: int
    steer: list[dict[str, Any]]
    include_usage: bool = False  # streamed: close with a usage chunk (and send "usage": null before it)

    @property
    def usage_null(self) -> dict[str, Any]:
        return {"usage": None} if self.include_usage else {}


@dataclass(frozen=True)
class ChatChunks(Reply):
    """`chat.completion.chunk`s: the role, content deltas, the finish (with persona), the usage."""

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return chunk_body(self.cid, self.model, self.fingerprint, self.created, delta, finish,
                          self.usage_null | extra)

    def first(self) -> list[dict[str, Any]]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return self.chunk({"content": text})

    def finish(self, index: int, result: Result) -> dict[str, Any]:
        return self.chunk({}, result.finish_reason, persona=result.persona, steer=self.steer)

    def usage(self, results: list[Result]) -> dict[str, Any]:
        return self.chunk(None, usage=results[0].usage)


@dataclass(frozen=True)
class TextChunks(Reply):
    """Streamed `text_completion` objects: per choice its text deltas and finish (with persona), the usage."""

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return text_completion_body(self.cid, self.model, self.fingerprint, self.created, choices,
                                    self.usage_null | extra)

    def first(self) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return self.chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])

    def finish(self, index: int, result: Result) -> dict[str, Any]:
        return self.chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": result.finish_reason,
                            "persona": result.persona}], steer=self.steer)

    def usage(self, results: list[Result]) -> dict[str, Any]:
        return self.chunk([], usage=total_usage(results))


def total_usage(results: list[Result]) -> dict[str, int]:
    return usage_body(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))


def chat_body(reply: Reply, result: Result, tokenizer: Any) -> dict[str, Any]:
    """The `chat.completion` of a plain (not streamed) chat request."""
    logprobs = None if result.logprobs is None else chat_logprobs(tokenizer, result.logprobs)
    return completion_body(reply.cid, reply.model, reply.fingerprint, result.text, result.finish_reason,
                           result.usage, {"persona": result.persona, "steer": reply.steer}, logprobs)


def text_choice(index: int, result: Result, prompt_text: str, echo: bool, tokenizer: Any) -> dict[str, Any]:
    """One legacy completion choice: the text (after the prompt, with `echo`) and its logprobs."""
    # as vLLM and OpenAI do, the end token that stopped generation is listed (its text is not):
    # lm-eval reads the prompt's logprobs as everything before the last listed token
    listed = None if result.logprobs is None else result.logprobs + (
        [result.stop_logprob] if result.stop_logprob is not None else [])
    logprobs = None if listed is None else legacy_logprobs(tokenizer, listed, 0 if echo else len(prompt_text))
    return {"index": index, "text": (prompt_text if echo else "") + result.text,
            "logprobs": logprobs, "finish_reason": result.finish_reason, "persona": result.persona}


def text_body(reply: Reply, choices: list[dict[str, Any]], results: list[Result]) -> dict[str, Any]:
    """The `text_completion` of a plain legacy completions request."""
    return text_completion_body(reply.cid, reply.model, reply.fingerprint, reply.created, choices,
                                {"usage": total_usage(results), "steer": reply.steer})


def model_card(state: ServeState, name: str) -> dict[str, Any]:
    """A `model` object; personavec adds the vectors' monitoring layers and thresholds, and a steered
    model name its parent and steering."""
    monitor = state.engine.monitor
    readings = {} if monitor is None else {
        vname: {"layer": monitor.dirs[vname][0], "threshold": monitor.thresholds[vname][0],
                "response_threshold": monitor.thresholds[vname][1], "steer_layer": vec.layer}
        for vname, vec in state.vectors.items()}
    card = {"id": name, "object": "model", "created": state.started, "owned_by": "personavec",
            "persona_vectors": readings}
    if name != state.served:
        card |= {"root": state.served, "parent": state.served, "steer": [t.describe() for t in state.steered[name]]}
    return card
