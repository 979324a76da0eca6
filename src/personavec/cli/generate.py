"""`personavec generate`: answers, unsteered or at several steering coefficients (the loop lives in
`personavec.generate_grid`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import PersonavecError
from ._common import (
    AllowMismatchOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    GpuMemoryOpt,
    JsonOpt,
    LayersPathOpt,
    ModelOpt,
    TensorParallelOpt,
    check_engine_options,
    emit_json,
    load,
    out,
    parse_layer,
    progress_bars,
)


def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="User messages to answer.")] = None,
    file: Annotated[Path | None, typer.Option(help="A text file with one prompt per line.")] = None,
    vector: Annotated[Path | None, typer.Option(help="Persona vector file to steer with.")] = None,
    layer: Annotated[str | None, typer.Option(help="Layer L (1..n; L = output of block L), 'a,b' or 'all'. "
                                              "Default: the vector's chosen layer.")] = None,
    coef: Annotated[list[float] | None, typer.Option(help="Steering coefficient; repeat to compare several.")] = None,
    positions: Annotated[str, typer.Option(help="all | prompt | response")] = "response",
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    model: ModelOpt = None,
    max_new_tokens: int = 96, temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    seed: int = 0,
    allow_model_mismatch: AllowMismatchOpt = False,
    engine: EngineOpt = "hf", tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer prompts, optionally steered by a persona vector at one or more coefficients."""
    from ..engines import open_engine
    from ..generate_grid import generate_grid, plan_grid
    from ..textfiles import read_lines
    from ..vectors import PersonaVector

    texts = list(prompts or [])
    if file is not None:
        texts += read_lines(file, "prompt file")
    if not texts:
        raise PersonavecError("no prompts: pass them as arguments or with --file")
    vec = PersonaVector.load(vector) if vector else None
    # check what the vector alone can tell before paying for the model
    chosen, coefs = plan_grid(vec, parse_layer(layer) if layer is not None and vec is not None else None, coef)
    check_engine_options(engine, tensor_parallel_size, gpu_memory_utilization)
    m = load(model, device, dtype, layers_path)
    with progress_bars() as cb, open_engine(m, engine, tensor_parallel_size, gpu_memory_utilization) as eng:
        result = generate_grid(m, texts, vec, layer=chosen, coefs=coefs, positions=positions, system=system,
                               max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                               allow_mismatch=allow_model_mismatch, engine=eng, progress=cb)
    if as_json:
        emit_json({**result.to_dict(), "vector": vector})
        return
    where = f" at layer {chosen}" if vec is not None else ""
    for row in result.rows:
        out.rule(f"[bold]{row.prompt}")
        for c, answer in zip(result.coefs, row.answers, strict=True):
            label = f"coef {c:+g}{where}" if vec is not None else "answer"
            out.print(f"[cyan]{label}:[/cyan] {answer}")
