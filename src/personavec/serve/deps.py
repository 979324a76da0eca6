"""What a route gets before its own work, in the order the server promises: the state, bearer-token
auth (401, a router dependency), then the body within the size limit (413) as valid JSON nested at most
`MAX_JSON_DEPTH` deep (400; deeper would exhaust the parser's recursion, a 500) of the endpoint's schema (400)."""

from __future__ import annotations

import hmac
import json
import re
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request

from .schemas import ApiError, RequestBase, parse_request
from .state import ServeState

MAX_JSON_DEPTH = 64  # arrays and objects inside one another; a real request nests about 5 deep
# a string (also one left open: the body is invalid then anyway) or a run of characters that are no bracket
_NOT_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[^\[\]{}"]+', re.S)
_DEPTH_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as int8: +1 opens, -1 closes


async def serve_state(request: Request) -> ServeState:
    """The state `create_app` built (async, as every dependency here: FastAPI runs plain functions in a
    thread pool, a needless hop for a lookup)."""
    state: ServeState = request.app.state.serve
    return state


State = Annotated[ServeState, Depends(serve_state)]


async def require_auth(request: Request, state: State) -> None:
    """401 unless the request carries the operator's key (`Authorization: Bearer <key>`); no key set, no check."""
    key = state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes `limit` bytes."""
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


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text`, found without recursion (so any depth is cheap to
    measure): strings dropped, then the running count of brackets opened and not closed."""
    brackets = _NOT_BRACKETS.sub("", text).encode()
    steps = np.frombuffer(brackets.translate(_DEPTH_STEPS), dtype=np.int8)
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def parse_json(body: bytes) -> Any:
    """The body decoded as `json.loads` decodes bytes (UTF-8, -16 or -32), refused (400) when it is not
    JSON or nests deeper than `MAX_JSON_DEPTH`."""
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        if json_depth(text) > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests JSON arrays and objects more than {MAX_JSON_DEPTH} deep; "
                           "flatten it")
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


async def read_request(request: Request, state: ServeState, kind: type[RequestBase]) -> Any:
    """The body parsed as `kind` (a ChatRequest or CompletionRequest)."""
    body = await read_body(request, state.settings.max_request_bytes)
    return parse_request(parse_json(body), kind)
