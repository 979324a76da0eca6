"""`personavec monitor-eval`: does the last-prompt-token projection predict the trait of the answer?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    parse_floats,
    progress_bars,
)

if TYPE_CHECKING:
    from ..monitor import MonitorSummary


def monitor_eval_cmd(
    vector: Annotated[Path, typer.Option(help="Persona vector file (.pv.safetensors).")],
    trait: Annotated[str, typer.Option(help="Built-in trait name or trait YAML file (with graded_prompts).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder (rerun to resume).")],
    judge: Annotated[str, typer.Option(help="contrast | local | local:MODEL | openai:MODEL[@URL]")] = "contrast",
    n_questions: Annotated[int | None, typer.Option(help="Evaluation questions per prompt.")] = 10,
    rollouts: Annotated[int, typer.Option(help="Sampled answers per prompt × question.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer (and per reference answer).")] = 32,
    temperature: Annotated[float, typer.Option(help="Answer sampling temperature (0 = greedy).")] = 1.0,
    layer: Annotated[int | None, typer.Option(help="Layer L to read (output of block L); default: the vector's "
                                              "chosen layer.")] = None,
    shots: Annotated[list[str] | None, typer.Option(help="Many-shot sizes, e.g. 0,5,10,15,20.")] = None,
    shot_tokens: Annotated[int, typer.Option(help="Tokens per many-shot example answer.")] = 40,
    condition: Annotated[list[str] | None, typer.Option(help="graded and/or many_shot (default both).")] = None,
    judge_free: Annotated[bool, typer.Option(help="Also compute the judge-free measure.")] = True,
    write_threshold: Annotated[bool, typer.Option(help="Write the calibrated threshold into the vector file "
                                                  "(meta 'monitor', atomic) for `personavec serve`.")] = False,
    seed: int = 0,
    model: ModelOpt = None,
    allow_model_mismatch: AllowMismatchOpt = False,
    engine: EngineOpt = "hf", tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The paper's monitoring experiment: graded system prompts and many-shot prompts × evaluation questions;
    Pearson r between the last-prompt-token projection (before generation) and the trait of the answers."""
    from ..engines import open_engine
    from ..layers import check_layer
    from ..monitor import CONDITIONS, MonitorSettings, monitor_eval, store_calibration
    from ..traits import load_trait
    from ..vectors import PersonaVector

    guard({"--trait": trait, "--vector": vector, "--model": model}, folders={"--out": out_dir})
    loaded = load_trait(trait)
    vec = PersonaVector.load(vector)
    if layer is not None:
        check_layer(layer, vec.n_layers)
    sizes = parse_floats(shots, "--shots") or [0, 5, 10, 15, 20]
    if any(k != int(k) for k in sizes):
        raise PersonavecError("--shots must be whole numbers, e.g. 0,5,10,15,20")
    conditions = tuple(x for c in condition or list(CONDITIONS) for x in c.split(",") if x.strip())
    settings = MonitorSettings(n_questions=n_questions, rollouts=rollouts, max_new_tokens=max_new_tokens,
                               temperature=temperature, shots=tuple(int(k) for k in sizes), shot_tokens=shot_tokens,
                               conditions=conditions, judge_free=judge_free, seed=seed)
    settings.validate()
    check_engine_options(engine, tensor_parallel_size, gpu_memory_utilization)
    m = load(model, device, dtype, layers_path)
    with progress_bars() as cb, open_engine(m, engine, tensor_parallel_size, gpu_memory_utilization) as eng:
        result = monitor_eval(m, loaded, vec, judge=judge, settings=settings, layer=layer, run_dir=out_dir,
                              allow_mismatch=allow_model_mismatch, engine=eng, progress=cb)
    if write_threshold:
        store_calibration(vector, result)
    if as_json:
        emit_json({**result.to_json(), "run_dir": out_dir, "threshold_written": write_threshold,
                   "files": {n: out_dir / n for n in ("results.json", "results.csv", "monitor.png")}})
        return
    _print(result)
    if write_threshold:
        out.print(f"wrote meta 'monitor' (layer {result.layer}, threshold "
                  f"{_f(result.monitor_meta['threshold'])}) into {vector}")
    out.print(f"results in {out_dir}/results.json, results.csv and monitor.png")


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3g}"


def _print(result: MonitorSummary) -> None:
    table = Table("measure", "points", "all", "graded", "many-shot",
                  title=f"Pearson r with the last-prompt-token projection ({result.trait}, layer {result.layer})")
    for measure, label in (("reference", "reference (authored answers)"),
                           ("trait_score", f"trait score ({result.judge})"), ("judge_free", "judge-free (prompted)")):
        if all(v is None for v in result.pearson[measure].values()):
            continue
        for kind, rs in (("prompt × question", result.pearson[measure]),
                         ("level means", result.pearson_levels[measure]),
                         ("within levels", result.pearson_within_levels[measure])):
            table.add_row(label, kind, _f(rs.get("overall")), _f(rs.get("graded")), _f(rs.get("many_shot")))
    out.print(table)
    cal = result.calibration["prompt"]
    out.print(f"flag threshold (last-prompt projection ≥ t ⇒ answer scored ≥ {result.judge_threshold:g}): "
              f"t = {_f(cal.threshold)}, balanced accuracy {_f(cal.balanced_accuracy)} (in-sample), "
              f"{_f(cal.heldout_balanced_accuracy)} (fitted on even questions, tested on odd); "
              f"response-mean threshold {_f(result.calibration['response'].threshold)}")
