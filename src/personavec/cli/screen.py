"""`personavec screen`: projection-difference screening of training data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
    guard,
    load,
    out,
    progress_bars,
    warn,
)


def _parse_thresholds(values: list[str] | None) -> float | dict[str, float] | None:
    """'0.5' (every trait) or 'evil=0.5' (repeatable) → a float or {trait: float}."""
    if not values:
        return None
    per: dict[str, float] = {}
    try:
        if len(values) == 1 and "=" not in values[0]:
            return float(values[0])
        for v in values:
            name, sep, num = v.partition("=")
            if not sep:
                raise ValueError
            per[name.strip()] = float(num)
    except ValueError:
        raise PersonavecError(f"--threshold takes a number or TRAIT=NUMBER (repeatable), got {' '.join(values)}") from None
    return per


def screen_cmd(
    data: Annotated[Path, typer.Argument(help="JSONL or Parquet conversations ('messages'; the last assistant "
                                         "turn is the response). Never modified.")],
    vector: Annotated[list[Path], typer.Option(help="Persona vector file; repeat for several traits.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Scores file: .csv, or .parquet.")],
    fast: Annotated[bool, typer.Option(help="Compare with the last prompt token's projection instead of the "
                                       "base model's own answer (no generation).")] = False,
    threshold: Annotated[list[str] | None, typer.Option(help="Flag ΔP above this: a number, or TRAIT=NUMBER "
                                                        "(repeatable).")] = None,
    calibrate: Annotated[Path | None, typer.Option(help="Reference dataset: flag ΔP above its --percentile.")] = None,
    percentile: Annotated[float, typer.Option(help="Percentile of the reference ΔP used as threshold.")] = 95.0,
    filtered_out: Annotated[Path | None, typer.Option(help="Write a copy of DATA without flagged (and rejected) "
                                                      "rows here (same format).")] = None,
    layer: Annotated[int | None, typer.Option(help="Layer L (output of block L) for every vector; default: each "
                                              "vector's chosen layer.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Length of the base model's answers.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
    chunk_size: Annotated[int, typer.Option(help="Rows per checkpointed chunk (and per Ray task).")] = 256,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (default: OUT.run); rerun to resume.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Base-answer cache (sqlite; default in the user cache).")] = None,
    ray: Annotated[str | None, typer.Option(help="Score on Ray Data: 'local', or a cluster address such as "
                                            "'auto' or 'ray://head:10001' (DATA must be readable by workers).")] = None,
    workers: Annotated[int, typer.Option(help="Ray actors, each holding one model copy.")] = 2,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per Ray actor (also its torch threads).")] = 1.0,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per Ray actor (0: CPU actors).")] = 0.0,
    histograms: Annotated[bool, typer.Option(help="Write a ΔP histogram PNG per trait.")] = True,
    model: ModelOpt = None,
    allow_model_mismatch: AllowMismatchOpt = False,
    engine: EngineOpt = "hf", tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Screen training data: projection difference ΔP per sample and per dataset, flags and a filtered copy."""
    from ..engines import open_engine
    from ..screen import OutPaths, screen
    from ..screening.source import precheck
    from ..vectors import PersonaVector

    guard({"DATA": data, "--vector": vector, "--calibrate": calibrate, "--model": model},
          outputs=OutPaths.of(out_path, run_dir).outputs(filtered_out, cache))
    precheck(data)
    if calibrate is not None:
        precheck(calibrate)
    vecs = [PersonaVector.load(v) for v in vector]
    thr = _parse_thresholds(threshold)
    check_engine_options(engine, tensor_parallel_size, gpu_memory_utilization)
    m = load(model, device, dtype, layers_path)
    with progress_bars() as cb, open_engine(m, engine, tensor_parallel_size, gpu_memory_utilization) as eng:
        res = screen(m, data, vecs, out_path, fast=fast, max_new_tokens=max_new_tokens, layer=layer,
                     batch_size=batch_size, chunk_size=chunk_size, threshold=thr, calibrate=calibrate,
                     percentile=percentile, filtered_out=filtered_out, run_dir=run_dir, cache=cache, ray=ray,
                     workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                     allow_mismatch=allow_model_mismatch, histograms=histograms, engine=eng, progress=cb)
    s = res.summary
    if s.rejected:
        warn(f"{s.rejected} rows rejected ({', '.join(f'{k}: {v}' for k, v in s.reject_reasons.items())}); "
             f"reasons in {res.rejects}")
    if as_json:
        emit_json({**vars(res), "summary": s.to_json()})
        return
    table = Table("trait", "layer", "mean ΔP [95% CI]", "threshold", "flagged",
                  title=f"{s.scored} samples scored, {s.rejected} rejected — {s.mode}")
    for t, d in s.traits.items():
        dp = d.delta_p
        ci = f"{dp['mean']:.3g} [{dp['ci_low']:.3g}, {dp['ci_high']:.3g}]"
        thr_text = "–" if d.threshold is None else f"{d.threshold:.3g}"
        table.add_row(t, str(d.layer), ci, thr_text, f"{d.n_flagged}/{s.scored}")
    out.print(table)
    out.print(f"scores {res.scores}; rejects {res.rejects}; summary {res.summary_path}"
              + (f"; histograms {', '.join(map(str, res.histograms))}" if res.histograms else "")
              + (f"; filtered copy {res.filtered} ({s.filtered.rows} rows)" if s.filtered else ""))
