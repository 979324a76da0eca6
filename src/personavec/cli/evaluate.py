"""`personavec eval`, `sweep` and `report`: trait scores of (steered) answers and the page that shows them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import PersonavecError
from ._common import (
    AllowMismatchOpt,
    ControlOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    GpuMemoryOpt,
    HalfOpt,
    JsonOpt,
    JudgeOpt,
    LayersPathOpt,
    ModelOpt,
    TensorParallelOpt,
    check_engine_options,
    emit_json,
    guard,
    load,
    out,
    parse_floats,
    progress_bars,
)


def eval_cmd(
    trait: Annotated[str, typer.Option(help="Built-in trait name or trait YAML file.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder (rerun to resume).")],
    vector: Annotated[Path | None, typer.Option(help="Persona vector to steer with.")] = None,
    layer: Annotated[int | None, typer.Option(help="Layer L (output of block L); default: the vector's chosen layer.")] = None,
    coef: Annotated[list[str] | None, typer.Option(help="Coefficients, e.g. -2,0,2 (default 0).")] = None,
    positions: Annotated[str, typer.Option(help="all | prompt | response")] = "response",
    judge: JudgeOpt = "auto",
    control: ControlOpt = None,
    half: HalfOpt = "all",
    n_questions: Annotated[int | None, typer.Option(help="Evaluation questions to answer.")] = 10,
    rollouts: int = 1, max_new_tokens: int = 48,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0, seed: int = 0,
    capability: Annotated[bool, typer.Option(help="Also measure perplexity and quiz accuracy.")] = False,
    no_generate: Annotated[bool, typer.Option(
        "--no-generate", help="Reference measure only: skip the answers; no coherence.")] = False,
    model: ModelOpt = None,
    engine: EngineOpt = "hf", tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    allow_model_mismatch: AllowMismatchOpt = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score the model's answers to the trait's evaluation questions, optionally steered."""
    from ..engines import open_engine
    from ..evaluate import Condition, EvalSettings, evaluate
    from ..traits import load_trait
    from ..vectors import PersonaVector

    guard({"--trait": trait, "--vector": vector, "--control": control, "--model": model}, folders={"--out": out_dir})
    loaded = load_trait(trait)
    coefs = parse_floats(coef, "--coef") or [0.0]
    vec = PersonaVector.load(vector) if vector else None
    if vec is None and any(c != 0 for c in coefs):
        raise PersonavecError("--coef needs --vector")
    chosen = layer if layer is not None else (vec.layer if vec else None)
    settings = EvalSettings(n_questions=n_questions, rollouts=rollouts, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, positions=positions, capability=capability,
                            half=half, generate=not no_generate)
    settings.validate()
    controls = _controls(control, vec, seed)
    check_engine_options(engine, tensor_parallel_size, gpu_memory_utilization)
    m = load(model, device, dtype, layers_path)
    with progress_bars() as cb, open_engine(m, engine, tensor_parallel_size, gpu_memory_utilization) as eng:
        cells = evaluate(m, loaded, vector=vec, conditions=[Condition(chosen, c) for c in coefs], judge=judge,
                         settings=settings, run_dir=out_dir, allow_mismatch=allow_model_mismatch, progress=cb,
                         controls=controls, engine=eng, extra_settings={"vector": str(vector or ""),
                                                            "control_specs": list(control or [])})
    if as_json:
        emit_json({"run_dir": out_dir, "trait": loaded.trait.name, "vector": vector, "half": half,
                   "cells": cells, "files": {"cells": out_dir / "cells.csv", "answers": out_dir / "answers.jsonl"}})
        return
    print_cells([c.to_json() for c in cells])
    out.print(f"results in {out_dir}/cells.csv and answers.jsonl")


def _controls(specs: list[str] | None, vec: Any, seed: int) -> dict[str, Any]:
    from ..controls import make_controls

    if specs and vec is None:
        raise PersonavecError("--control needs --vector (a control is matched to the vector's norm)")
    return make_controls(specs, vec, seed) if specs else {}


def print_cells(cells: Sequence[Mapping[str, Any]]) -> None:
    """The cells as a table, from their JSON form or from cells.csv (which the sweep command prints)."""
    measure = next((str(c["measure"]) for c in cells if c.get("measure")), "trait")
    table = Table("vector", "layer", "coef", "n", f"trait ({measure})", "coherence", "judge-free (prompted)",
                  "perplexity", "quiz")

    def f(v: Any, se: Any = None) -> str:
        if v is None:
            return "–"
        return f"{v:.3g}" + (f" ± {se:.2g}" if se is not None else "")

    for c in cells:
        table.add_row(str(c.get("control") or "trait"), str(c["layer"] if c["coef"] != 0 else "–"),
                      f"{c['coef']:+g}", str(int(c["n"] or 0)),
                      f(c["trait_mean"], c["trait_se"]), f(c["coherence_mean"], c["coherence_se"]),
                      f(c["judge_free_mean"], c["judge_free_se"]), f(c.get("perplexity")), f(c.get("quiz_accuracy")))
    out.print(table)


def sweep_cmd(
    vector: Annotated[Path, typer.Option(help="Persona vector file; the chosen layer is written into it.")],
    trait: Annotated[str, typer.Option(help="Built-in trait name or trait YAML file.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder (rerun to resume).")],
    layers: Annotated[list[str] | None, typer.Option(help="Layers, e.g. 9,14,18,22 (default: 4 sized to depth).")] = None,
    coefs: Annotated[list[str] | None, typer.Option(help="Coefficients, e.g. -6,-3,0,3,6.")] = None,
    judge: JudgeOpt = "auto",
    control: ControlOpt = None,
    half: HalfOpt = "first",
    coherence_min: Annotated[float | None, typer.Option(help="Coherence floor (default: 50% of the unsteered coherence).")] = None,
    n_questions: Annotated[int | None, typer.Option(help="Evaluation questions per cell.")] = 8,
    max_new_tokens: int = 40, seed: int = 0,
    capability: Annotated[bool, typer.Option(help="Also measure perplexity and quiz accuracy per cell.")] = False,
    no_update: Annotated[bool, typer.Option("--no-update-vector", help="Do not write the choice into the vector.")] = False,
    model: ModelOpt = None,
    engine: EngineOpt = "hf", tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    allow_model_mismatch: AllowMismatchOpt = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a layer × coefficient grid and choose where to steer (written into the vector file)."""
    from ..engines import open_engine
    from ..evaluate import EvalSettings
    from ..layers import check_layer
    from ..report import read_cells
    from ..steering import check_coef
    from ..sweep import sweep
    from ..traits import load_trait
    from ..vectors import PersonaVector

    # the vector is the one input sweep writes (its chosen layer, atomically); the run folder must not hold it
    guard({"--trait": trait, "--vector": vector, "--control": control, "--model": model}, folders={"--out": out_dir})
    loaded = load_trait(trait)
    vec = PersonaVector.load(vector)
    layer_list = [int(x) for x in parse_floats(layers, "--layers") or []] or None
    for ly in layer_list or []:
        check_layer(ly, vec.n_layers)
    coef_list = parse_floats(coefs, "--coefs")
    for c in coef_list or []:
        check_coef(c)
    check_engine_options(engine, tensor_parallel_size, gpu_memory_utilization)
    m = load(model, device, dtype, layers_path)
    settings = EvalSettings(n_questions=n_questions, max_new_tokens=max_new_tokens, seed=seed, capability=capability,
                            half=half)
    settings.validate()
    controls = _controls(control, vec, seed)
    with progress_bars() as cb, open_engine(m, engine, tensor_parallel_size, gpu_memory_utilization) as eng:
        choice = sweep(m, loaded, vec, layers=layer_list, coefs=coef_list, judge=judge, settings=settings,
                       run_dir=out_dir, coherence_min=coherence_min, vector_path=None if no_update else vector,
                       allow_mismatch=allow_model_mismatch, controls=controls, engine=eng, progress=cb)
    cells = [dict(c) for c in read_cells(out_dir / "cells.csv")[1]]
    if as_json:
        emit_json({"run_dir": out_dir, "vector": vector, "vector_updated": not no_update, "half": settings.half,
                   "choice": choice, "cells": cells})
        return
    print_cells(cells)
    out.print(f"best layer {choice.best_layer} (coef {choice.best_coef:+g}, {choice.measure} change "
              f"{choice.trait_change:+.3g}, {settings.half} half of the evaluation questions); "
              + ("" if no_update else f"written into {vector}; ") + f"run folder {out_dir}")


def report_cmd(run_dir: Annotated[Path, typer.Argument(help="A sweep or eval run folder.")],
               as_json: JsonOpt = False) -> None:
    """Write RUN_DIR/report.html: one self-contained page with plots, tables and example answers."""
    from ..report import write_report

    path = write_report(run_dir)
    if as_json:
        emit_json({"run_dir": run_dir, "report": path})
        return
    out.print(f"wrote {path}")
