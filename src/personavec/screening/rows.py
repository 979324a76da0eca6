"""What a screenable row is: a chat conversation (`messages`) whose last assistant turn is the response.
Every other row becomes a reject with a reason; nothing is dropped silently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PersonavecError

ROLES = ("system", "user", "assistant")


class DatasetError(PersonavecError):
    """A dataset to screen is missing, empty or unusable as a whole."""


@dataclass(frozen=True)
class Schema:
    """The file's schema, taken from its first JSON-object row: rows must agree with it."""

    has_id: bool


@dataclass(frozen=True)
class Parsed:
    """A valid row: its 0-based index in the input, its own `id` (as text) and the conversation split into
    the prompt (every turn before the last assistant turn) and the answer."""

    index: int
    id: str | None
    prompt: list[dict[str, str]]
    answer: str


@dataclass(frozen=True)
class Reject:
    index: int
    reason: str
    excerpt: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason, "excerpt": self.excerpt}


def schema_of(value: Any) -> Schema:
    return Schema(has_id=isinstance(value, dict) and value.get("id") is not None)


def parse_row(index: int, value: Any, schema: Schema, excerpt: str = "") -> Parsed | Reject:
    """Validate one decoded row against the file's schema."""

    def bad(reason: str) -> Reject:
        return Reject(index, reason, excerpt[:200])

    if not isinstance(value, dict):
        return bad(f"row is a JSON {type(value).__name__}, not an object with 'messages'")
    if "messages" not in value or value["messages"] is None:
        keys = ", ".join(sorted(map(str, value))[:8]) or "none"
        return bad(f"mixed schema: no 'messages' field (keys: {keys})")
    has_id = value.get("id") is not None
    if has_id != schema.has_id:
        return bad("mixed schema: no 'id' field, but the first row has one" if schema.has_id
                   else "mixed schema: an 'id' field, but the first row has none")
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        return bad("'messages' is not a non-empty list")
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            return bad(f"message {k} is not an object with string 'role' and 'content'")
        if msg["role"] not in ROLES:
            return bad(f"unknown role '{msg['role'][:40]}' in message {k} (expected system, user or assistant)")
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return bad("no assistant answer")
    answer = messages[last]["content"]
    if not answer.strip():
        return bad("the last assistant answer is empty")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    if not any(m["role"] == "user" for m in prompt):
        return bad("no user turn before the assistant answer")
    return Parsed(index=index, id=str(value["id"]) if has_id else None, prompt=prompt, answer=answer)
