"""Request and response shapes of the OpenAI chat-completions API, plus personavec's extra fields.

Requests are validated here (pydantic) so every malformed one becomes a 400 with OpenAI's error body
before it reaches the model. Unknown OpenAI parameters that change nothing here (user, metadata, store,
presence_penalty, ...) are accepted and ignored, as OpenAI-compatible servers do; the ones whose meaning
we cannot honour (n > 1, logprobs, tools) are refused rather than silently dropped."""

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


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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


class SteerSpec(BaseModel):
    """One steering term: add coef × vector[layer] (layer L = output of decoder block L)."""

    model_config = ConfigDict(extra="forbid")  # a typo such as "coeff" must fail, not steer with nothing
    vector: str
    coef: FiniteFloat
    layer: int | None = None
    positions: Literal["response", "prompt", "all"] = "response"  # steering.STEER_POSITIONS



class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: FiniteFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None
    tools: list[Any] | None = None
    # personavec extensions (the openai client sends them through extra_body)
    steer: list[SteerSpec] = Field(default_factory=list)
    ignore_eos: bool = False  # vLLM's name: generate exactly max_tokens tokens (benchmarks, tests)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        if self.n != 1:
            raise ValueError("n must be 1: this server returns one choice per request")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(data: Any) -> ChatRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the offending parameter."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first["loc"]]
        param = ".".join(loc) or None
        msg = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}" if param else msg, param=param) from None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, model: str, fingerprint: str, text: str, finish: str, usage: dict[str, int],
                    extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage, **extra}


def chunk_body(cid: str, model: str, fingerprint: str, created: int, delta: dict[str, Any] | None,
               finish: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; with delta None it is the closing chunk with no choices (usage, persona)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices, **(extra or {})}
