"""What a route gets before its own work, in the order the server promises: the state, bearer-token
auth (401, a router dependency), then the body within the size limit (413) as valid JSON (400) of the
endpoint's schema (400)."""

from __future__ import annotations

import hmac
import json
from typing import Annotated, Any

from fastapi import Depends, Request

from .schemas import ApiError, RequestBase, parse_request
from .state import ServeState


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


async def read_request(request: Request, state: ServeState, kind: type[RequestBase]) -> Any:
    """The body parsed as `kind` (a ChatRequest or CompletionRequest)."""
    body = await read_body(request, state.settings.max_request_bytes)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    return parse_request(data, kind)
