"""The FastAPI app: OpenAI's `/v1/chat/completions` (plain and streamed), the legacy `/v1/completions`
(raw prompts; `echo` + `logprobs` score a prompt, as lm-evaluation-harness's `local-completions` model
asks) and `/v1/models`, plus per-request steering (`"steer"`), steered model names (a name that steers
every request sent to it, for clients that send fixed bodies) and persona monitoring (`"persona"`).

Every request passes, in order: bearer-token auth (401), the body size limit (413), JSON and schema
validation (400, or 404 for an unknown model), the steering and token-budget checks (400), then
admission into the engine's bounded queue (429 when full). Errors use OpenAI's body shape, so the
official client raises its usual exception classes. Limits against hostile bodies, each a 400: JSON
nested at most 64 deep (`deps.MAX_JSON_DEPTH`, measured without recursion before parsing), `seed` in
0..2**64-1 (torch's seeds, `schemas.MAX_SEED`), at most 64 `steer` terms (`schemas.MAX_STEER_TERMS`), and
each term's coef × vector fitting the model's dtype (`steering.steering_terms`). A user's error raised
during generation (a PersonavecError) is a 400 too; anything else there is a 500.

Layout: `state` (what handlers share), `deps` (state, auth, body), `admission` (checks before the
queue), `events` (engine events to a response), `responses` (OpenAI shapes), `routes` (the handlers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..vectors import name_by_trait
from .routes import router, v1
from .schemas import ApiError
from .settings import ServeSettings
from .state import ServeState

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector

__all__ = ["ServeSettings", "create_app", "name_vectors"]

name_vectors = name_by_trait  # the server's name for it (serve/__init__ and the CLI import it)


def create_app(model: Model, vectors: Mapping[str, PersonaVector] | Sequence[PersonaVector],
               settings: ServeSettings | None = None) -> FastAPI:
    """An app serving `model` with `vectors` (a {name: vector} mapping, or a list named by trait)."""
    state = ServeState.build(model, vectors, settings or ServeSettings())
    app = FastAPI(title="personavec", version=__version__, lifespan=_lifespan,
                  exception_handlers={ApiError: _api_error, StarletteHTTPException: _http_error,
                                      RequestValidationError: _validation_error})
    app.state.serve = state
    app.state.engine = state.engine
    app.include_router(router)
    app.include_router(v1)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine's worker runs while the app does; on shutdown, waiting requests are cancelled and
    running ones finish."""
    engine = app.state.engine
    engine.start()
    try:
        yield
    finally:
        await asyncio.to_thread(engine.stop)


async def _api_error(_r: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
    return await _api_error(_r, ApiError(exc.status_code, str(exc.detail)))


async def _validation_error(_r: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(_r, ApiError(400, str(exc.errors()[0].get("msg", "invalid request"))))
