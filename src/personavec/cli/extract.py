"""`personavec extract`: a persona vector from contrastive rollouts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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


def extract(
    trait: Annotated[str, typer.Option(help="Built-in trait name or trait YAML file.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Vector file to write (.pv.safetensors).")],
    model: ModelOpt = None,
    judge: Annotated[str, typer.Option(help="contrast | local | local:MODEL | openai:MODEL[@URL]")] = "contrast",
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (default: OUT.run); rerun to resume.")] = None,
    n_questions: Annotated[int | None, typer.Option(help="Use the first N extraction questions.")] = None,
    n_pairs: Annotated[int | None, typer.Option(help="Use the first N prompt pairs.")] = None,
    rollouts: Annotated[int, typer.Option(help="Answers per (system prompt, question).")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 1.0,
    threshold: Annotated[float | None, typer.Option(help="Trait-score threshold (default: judge's neutral point).")] = None,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 32,
    engine: EngineOpt = "hf", tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract a persona vector: rollouts under contrastive prompts, judge, filter, capture, difference."""
    from ..engines import open_engine
    from ..extract import extract as run_extract
    from ..traits import load_trait

    folder = run_dir or out_path.with_name(out_path.name + ".run")
    guard({"--trait": trait, "--model": model}, files={"--out": out_path}, folders={"--run-dir": folder})
    loaded = load_trait(trait)  # fail on a bad trait or engine before spending time on the model
    check_engine_options(engine, tensor_parallel_size, gpu_memory_utilization)
    m = load(model, device, dtype, layers_path)
    with progress_bars() as cb, open_engine(m, engine, tensor_parallel_size, gpu_memory_utilization) as eng:
        vec = run_extract(m, loaded, judge=judge, run_dir=folder, batch_size=batch_size, engine=eng, progress=cb,
                          n_questions=n_questions, n_pairs=n_pairs, rollouts=rollouts,
                          max_new_tokens=max_new_tokens, temperature=temperature, threshold=threshold, seed=seed)
    vec.save(out_path)
    c = vec.meta["counts"]
    if as_json:
        emit_json({"out": out_path, "run_dir": folder, "trait": vec.trait, "model_id": vec.meta.get("model_id"),
                   "n_layers": vec.n_layers, "hidden_size": vec.hidden_size, "shape": [vec.n_layers + 1, vec.hidden_size],
                   "layer": vec.layer, "positions": sorted(vec.tensors), "judge": vec.meta.get("judge"),
                   "threshold": vec.meta.get("threshold"), "counts": c})
        return
    out.print(f"wrote {out_path}: trait {vec.trait}, shape [{vec.n_layers + 1}, {vec.hidden_size}], kept "
              f"{c['positive_kept']}/{c['positive_total']} positive and {c['negative_kept']}/{c['negative_total']} "
              f"negative rollouts (judge {vec.meta['judge']}); run folder {folder}")
