"""`personavec serve`: the steering-aware, monitoring OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli import DeviceOpt, DtypeOpt, LayersPathOpt, ModelOpt, _load, app, err
from .errors import PersonavecError


@app.command("serve")
def serve(
    vector: Annotated[list[Path], typer.Option(help="Persona vector file, named by its trait; repeat for several.")],
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="PERSONAVEC_API_KEY", show_envvar=True,
                                                help="Require 'Authorization: Bearer KEY' (401 otherwise).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait behind the running one; more get 429.")] = 16,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 above).")] = 1 << 20,
    max_tokens_limit: Annotated[int, typer.Option(help="Most completion tokens per request (also the default).")] = 512,
    log: Annotated[Path | None, typer.Option(help="Append one JSONL line per request (persona readings, usage).")] = None,
    log_prompts: Annotated[bool, typer.Option(help="Also log prompt and completion text (off by default).")] = False,
    served_model_name: Annotated[str | None, typer.Option(help="Name clients pass as 'model' (default: the model id).")] = None,
    allow_model_mismatch: Annotated[bool, typer.Option(help="Serve vectors made on other weights.")] = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API with per-request steering ("steer") and persona
    monitoring ("persona") in every answer. Layer L = output of decoder block L."""
    import uvicorn

    from .serve import ServeSettings, create_app, name_vectors
    from .vectors import PersonaVector

    if max_queue < 0 or max_request_bytes < 1 or max_tokens_limit < 1:
        raise PersonavecError("--max-queue must be >= 0, --max-request-bytes and --max-tokens-limit >= 1")
    vectors = name_vectors([PersonaVector.load(p) for p in vector])  # fail on bad files before loading the model
    m = _load(model, device, dtype, layers_path)
    settings = ServeSettings(api_key=api_key or None, max_queue=max_queue, max_request_bytes=max_request_bytes,
                             max_tokens_limit=max_tokens_limit, log_path=log, log_prompts=log_prompts,
                             model_name=served_model_name, allow_model_mismatch=allow_model_mismatch)
    server_app = create_app(m, vectors, settings)
    name = served_model_name or m.model_id
    err.print(f"serving {name} with vectors {', '.join(vectors)} on http://{host}:{port}/v1"
              + (" (API key required)" if api_key else ""), highlight=False)
    uvicorn.run(server_app, host=host, port=port, log_level="warning")
