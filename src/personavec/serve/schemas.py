"""Request and response shapes of the OpenAI chat-completions and (legacy) completions APIs, plus
personavec's extra fields.

Requests are validated here (pydantic) so every malformed one becomes a 400 with OpenAI's error body
before it reaches the model. As OpenAI's own API does, an argument this server does not know is refused
("Unrecognized request argument supplied: …"), and a known one whose meaning it cannot honour (n > 1,
tools, response_format other than text, logit_bias, penalties, …) is refused with the value named, never
silently dropped. Arguments that change nothing about the answer (user, metadata, store, service_tier,
parallel_tool_calls, …) are accepted."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_LOGPROBS = 20  # the most alternatives per position (OpenAI: 5 legacy / 20 chat; vLLM: 20)
MAX_SEED = 2**64 - 1  # torch's generators take unsigned 64-bit seeds (a negative one aliases seed + 2**64)
MAX_STEER_TERMS = 64  # a request's own `steer` terms: each adds a hook to every forward of the batch


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _unsupported(message: str, param: str | None = None) -> PydanticCustomError:
    """A value this server cannot honour: 400 with code "unsupported_value" (`param` for model-level checks)."""
    return PydanticCustomError("unsupported_value", message, {"param": param} if param else None)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_chat(self) -> dict[str, str]:
        """The {role, content} dict the chat template renders; "developer" is OpenAI's new name for system."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


Position = Literal["response", "prompt", "all"]  # steering.STEER_POSITIONS


class SteerSpec(BaseModel):
    """One steering term: add coef × vector[layer] (layer L = output of decoder block L)."""

    model_config = ConfigDict(extra="forbid")  # a typo such as "coeff" must fail, not steer with nothing
    vector: str
    coef: FiniteFloat
    layer: int | None = None
    positions: Position = "response"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class RequestBase(BaseModel):
    """What both endpoints take: sampling, stops, streaming, and personavec's `steer` and `ignore_eos`."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: FiniteFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, description="Sampling seed, 0..2**64-1 (torch's unsigned 64-bit "
                             "seeds; a negative seed would alias seed + 2**64). Default: a random one.")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # accepted, change nothing here
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # personavec extensions (the openai client sends them through extra_body)
    steer: list[SteerSpec] = Field(default_factory=list, description=f"Steering terms, at most {MAX_STEER_TERMS}.")
    ignore_eos: bool = False  # vLLM's name: generate exactly max_tokens tokens (benchmarks, tests)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_range(cls, v: Any) -> Any:
        """Checked before the integer is parsed, so a huge number gets this message, not a parser's."""
        if isinstance(v, int | float) and not isinstance(v, bool) and not 0 <= v <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED} (torch's generators take unsigned "
                             "64-bit seeds)")
        return v

    @field_validator("steer", mode="before")
    @classmethod
    def _few_terms(cls, v: Any) -> Any:
        """Counted before the terms are validated, so a huge list costs nothing."""
        if isinstance(v, list) and len(v) > MAX_STEER_TERMS:
            raise ValueError(f"steer takes at most {MAX_STEER_TERMS} terms per request, got {len(v)}; send fewer")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int:
        if v not in (None, 1):
            raise _unsupported("n must be 1: this server returns one choice per prompt")
        return 1

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> None:
        if v:
            raise _unsupported("logit_bias is not supported by this server")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> None:
        if v:
            raise _unsupported("presence and frequency penalties are not supported by this server; send 0 or "
                               "leave them out")

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> RequestBase:
        if self.stream_options is not None and not self.stream:
            raise _unsupported("stream_options is only allowed when stream is true", "stream_options")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise _unsupported(f"response_format type '{v}' is not supported by this server; only 'text' is")
        return v


class ChatRequest(RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> None:
        if v:
            raise _unsupported("tools and functions are not supported by this server")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> None:
        if v not in (None, "none"):
            raise _unsupported("tool calls are not supported by this server")

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, v: list[str] | None) -> None:
        if v and v != ["text"]:
            raise _unsupported("this server answers in text only: modalities must be ['text']")

    @field_validator("audio", "prediction", "reasoning_effort", "web_search_options")
    @classmethod
    def _not_here(cls, v: Any) -> None:
        if v is not None:
            raise _unsupported("not supported by this server")

    @model_validator(mode="after")
    def _logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _unsupported("top_logprobs needs logprobs: true", "top_logprobs")
        if self.logprobs and self.stream:
            raise _unsupported("logprobs are not supported with stream: true here", "logprobs")
        return self

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_k_logprobs(self) -> int | None:
        """How many alternatives per generated token to return (None: no logprobs at all)."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenPrompt = list[int]


class CompletionRequest(RequestBase):
    """`/v1/completions` as OpenAI's legacy API and vLLM take it: a raw prompt (no chat template) given as
    text, a list of texts, token ids, or a list of token-id lists (one choice per prompt)."""

    prompt: str | list[str] | TokenPrompt | list[TokenPrompt]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default; 0 only with echo (score the prompt)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        """One of the four shapes, nothing empty, token ids non-negative integers (the vocabulary bound is
        checked against the model)."""
        def token_list(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                             "token-id lists, and not empty")
        if not (all(isinstance(p, str) for p in v) or token_list(v) or all(token_list(p) for p in v)):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                             "token-id lists (not a mixture)")
        if any(isinstance(p, str | list) and not p for p in v):
            raise ValueError("prompt must not contain an empty prompt")
        if any(t < 0 for p in v for t in (p if isinstance(p, list) else [p] if isinstance(p, int) else [])):
            raise ValueError("token ids must not be negative")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int:
        if v not in (None, 1):
            raise _unsupported("best_of must be 1: this server returns one choice per prompt")
        return 1

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> None:
        if v:
            raise _unsupported("suffix (insertion) is not supported by this server")

    @model_validator(mode="after")
    def _combinations(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise _unsupported("max_tokens 0 needs echo: true (it scores the prompt)", "max_tokens")
        if self.stream and (self.echo or self.logprobs is not None):
            raise _unsupported("echo and logprobs are not supported with stream: true here; send them without "
                               "stream", "stream")
        return self

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts as a list: texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)  # type: ignore[arg-type]


def parse_request(data: Any, kind: type[RequestBase] = ChatRequest) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the offending parameter."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first["loc"]]
        param = ".".join(loc) or None
        msg = first["msg"].removeprefix("Value error, ")
        code = None
        if first["type"] == "unsupported_value":
            code = "unsupported_value"
            param = (first.get("ctx") or {}).get("param", param)
        elif first["type"] == "extra_forbidden":
            code = "unsupported_parameter"
            if len(loc) == 1:  # OpenAI's own wording for an argument it does not know
                raise ApiError(400, f"Unrecognized request argument supplied: {loc[0]}", param=param,
                               code=code) from None
        if param and not msg.startswith(f"{param} "):
            msg = f"{param}: {msg}"
        raise ApiError(400, msg, param=param, code=code) from None


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, model: str, fingerprint: str, text: str, finish: str, usage: dict[str, int],
                    extra: dict[str, Any], logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage, **extra}


def chunk_body(cid: str, model: str, fingerprint: str, created: int, delta: dict[str, Any] | None,
               finish: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; with delta None it is the closing usage chunk with no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices, **(extra or {})}


def text_completion_body(cid: str, model: str, fingerprint: str, created: int, choices: list[dict[str, Any]],
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `text_completion` object (also each streamed chunk of one, as OpenAI streams them)."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices, **(extra or {})}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- steered model names -----------------------------------------------------------------------------------
def parse_steered_model(spec: str) -> tuple[str, list[SteerSpec]]:
    """`NAME=VECTOR:COEF[:LAYER][:POSITIONS][,VECTOR:COEF…]` → (NAME, steering terms): a model name that
    steers every request sent to it, for clients that cannot add `steer` to a request (lm-evaluation-
    harness sends fixed bodies). E.g. `evil-8=evil:8:all` or `mix=evil:4:18:all,humorous:2`."""
    name, sep, terms = spec.partition("=")
    if not sep or not name.strip() or not terms.strip():
        raise ValueError(f"'{spec}' is not NAME=VECTOR:COEF[:LAYER][:POSITIONS][,…]")
    out = []
    for term in terms.split(","):
        parts = term.strip().split(":")
        if len(parts) < 2 or len(parts) > 4:
            raise ValueError(f"'{term}' is not VECTOR:COEF[:LAYER][:POSITIONS]")
        fields: dict[str, Any] = {"vector": parts[0], "coef": parts[1]}
        for extra in parts[2:]:
            key = "layer" if extra.lstrip("-").isdigit() else "positions"
            if key in fields:
                raise ValueError(f"'{term}' names its {key} twice")
            fields[key] = extra
        try:
            out.append(SteerSpec.model_validate(fields))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"'{term}': {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return name.strip(), out
