"""`personavec reproduce`: the paper's main experiments on one model, resumably, into one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import PersonavecError
from ._common import (
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
)


def reproduce_cmd(
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (rerun the same command to "
                                                 "resume; finished stages are not redone).")] = None,
    preset: Annotated[str, typer.Option(help="smoke (CI, minutes) | cpu (three traits, two cores) | paper "
                                        "(7–8B models, needs --judge).")] = "cpu",
    traits: Annotated[str | None, typer.Option(help="Comma list of built-in traits (default: the preset's).")] = None,
    judge: Annotated[str | None, typer.Option(help="Judge for extraction and the monitoring answers: contrast | "
                                              "local[:MODEL] | openai:MODEL[@URL] (default: contrast; the paper "
                                              "preset needs one).")] = None,
    data: Annotated[Path | None, typer.Option(help="Folder of authored sets <trait>/<set>.jsonl (normal, II, "
                                              "mixtures; experiments/data/finetune_authored in the repository): "
                                              "the finetuning and screening stages are skipped without it.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one setting, key=value (dotted keys, "
                                                   "e.g. sweep.layers=10,14); repeatable.")] = None,
    show_preset: Annotated[str | None, typer.Option("--show-preset", help="Print every value of a preset (with "
                                                    "--set overrides applied) and exit.")] = None,
    model: ModelOpt = None,
    engine: EngineOpt = "hf", tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extraction → steering sweep with controls (chosen on one half of the questions, reported on the other)
    → capability → monitoring → finetuning and screening on --data, with one manifest and one self-contained
    report.html."""
    from ..reproduce import preset as get_preset
    from ..reproduce import reproduce, show, with_overrides

    settings = get_preset(show_preset or preset)
    given = {"model": model, "traits": traits, "judge": judge, "data": None if data is None else str(data)}
    settings = with_overrides(settings, [f"{k}={v}" for k, v in given.items() if v is not None]
                              + ([f"engine={engine}"] if engine != "hf" else []) + list(set_ or []))
    if show_preset is not None:
        for line in show(settings):
            typer.echo(line)
        return
    if out_dir is None:
        raise PersonavecError("--out is required: the run folder that holds the manifest and report.html")
    guard({"--data": settings.data, "--model": settings.model}, folders={"--out": out_dir})
    settings.validate()
    check_engine_options(settings.engine, tensor_parallel_size, gpu_memory_utilization)
    m = load(settings.model, device, dtype, layers_path)
    with progress_bars() as cb:
        result = reproduce(m, settings, out_dir, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, progress=cb)
    if as_json:
        emit_json({"run_dir": result.folder, "report": result.report, "ran": result.ran,
                   "stages": result.stages, "targets": result.targets})
        return
    table = Table("stage", "target", "value", "met", title=f"reproduce ({settings.preset}) targets")
    for t in result.targets:
        table.add_row(t.stage, t.name, t.value, "not tested" if t.met is None else "met" if t.met else "missed")
    out.print(table)
    out.print(f"report: {result.report}")
