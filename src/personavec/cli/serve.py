"""`personavec serve`: the steering-aware, monitoring OpenAI-compatible server."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import PersonavecError
from ._common import AllowMismatchOpt, DeviceOpt, DtypeOpt, LayersPathOpt, ModelOpt, guard, info, load

if TYPE_CHECKING:
    from ..serve.schemas import SteerSpec


def steered_models(specs: list[str], vectors: Collection[str] | None = None) -> dict[str, list[SteerSpec]]:
    """The `--steered-model` options as `ServeSettings.steered_models`: each spec read by
    `serve.parse_steered_model`; a malformed spec, a name given twice or (when `vectors` is given) a vector
    the server does not load is a one-line PersonavecError, raised before the model loads. Layer ranges and
    clashes with the served model's name are checked by `create_app`, which knows the model."""
    from ..serve import parse_steered_model

    named: dict[str, list[SteerSpec]] = {}
    for spec in specs:
        try:
            name, terms = parse_steered_model(spec)
        except ValueError as exc:
            raise PersonavecError(f"--steered-model {exc}") from None
        if name in named:
            raise PersonavecError(f"--steered-model names '{name}' twice")
        unknown = [t.vector for t in terms if vectors is not None and t.vector not in vectors]
        if unknown:
            raise PersonavecError(f"--steered-model '{name}' uses vector '{unknown[0]}', which --vector does not "
                                  f"load (loaded: {', '.join(vectors or []) or 'none'})")
        named[name] = terms
    return named


def serve(
    vector: Annotated[list[Path], typer.Option(help="Persona vector file, named by its trait; repeat for several.")],
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1..65535), checked free before the model loads.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="PERSONAVEC_API_KEY", show_envvar=True,
                                                help="Require 'Authorization: Bearer KEY' (401 otherwise); "
                                                     "an empty key is refused.")] = None,
    max_batch_size: Annotated[int, typer.Option(
        help="Requests generated together in one continuous batch, each with its own steering; 1 runs one "
             "request at a time.")] = 32,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait beyond the running batch; more get 429.")] = 16,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 above).")] = 1 << 20,
    max_tokens_limit: Annotated[int, typer.Option(help="Most completion tokens per request (also the default).")] = 512,
    log: Annotated[Path | None, typer.Option(help="Append one JSONL line per request (persona readings, usage).")] = None,
    log_prompts: Annotated[bool, typer.Option(help="Also log prompt and completion text (off by default).")] = False,
    served_model_name: Annotated[str | None, typer.Option(help="Name clients pass as 'model' (default: the model id).")] = None,
    allow_model_mismatch: AllowMismatchOpt = False,
    steered_model: Annotated[list[str] | None, typer.Option(
        metavar="NAME=VECTOR:COEF[:LAYER][:POSITIONS]",
        help="Serve an extra model NAME that steers every request sent to it (for clients such as "
             "lm-evaluation-harness that cannot send 'steer'), e.g. evil-8=evil:8:all or "
             "mix=evil:4:18:all,humorous:2. LAYER defaults to the vector's chosen layer (layer L = output "
             "of decoder block L); POSITIONS is response (default), prompt or all: use all or prompt to "
             "score prompts (echo + logprobs) under steering. Repeat for several.")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API with per-request steering ("steer") and persona
    monitoring ("persona") in every answer. Layer L = output of decoder block L."""
    import uvicorn

    from ..serve import ServeSettings, create_app, name_vectors
    from ..serve.preflight import check_listen, resolve_api_key
    from ..vectors import PersonaVector

    if max_queue < 0 or max_request_bytes < 1 or max_tokens_limit < 1 or max_batch_size < 1:
        raise PersonavecError("--max-queue must be >= 0; --max-batch-size, --max-request-bytes and "
                              "--max-tokens-limit >= 1")
    guard({"--vector": vector, "--model": model}, files={"--log": log})  # the log is appended to, never an input
    key = resolve_api_key(api_key, os.environ)
    check_listen(host, port)
    vectors = name_vectors([PersonaVector.load(p) for p in vector])  # fail on bad files before loading the model
    steered = steered_models(steered_model or [], vectors)  # and on bad specs
    m = load(model, device, dtype, layers_path)
    settings = ServeSettings(api_key=key, max_queue=max_queue, max_batch_size=max_batch_size,
                             max_request_bytes=max_request_bytes,
                             max_tokens_limit=max_tokens_limit, log_path=log, log_prompts=log_prompts,
                             model_name=served_model_name, allow_model_mismatch=allow_model_mismatch,
                             steered_models=steered)
    server_app = create_app(m, vectors, settings)
    name = served_model_name or m.model_id
    info(f"serving {name} with vectors {', '.join(vectors)} on http://{host}:{port}/v1"
              + (f" (steered models: {', '.join(steered)})" if steered else "")
              + (" (API key required)" if key else ""))
    uvicorn.run(server_app, host=host, port=port, log_level="warning")
