"""The `personavec` command line: it parses, calls the library and draws progress; no logic here."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .errors import PersonavecError
from .steering import check_coef

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Persona vectors: extract trait directions from a chat model and steer with them.")
traits_app = typer.Typer(no_args_is_help=True, help="Built-in and user trait files.")
vector_app = typer.Typer(no_args_is_help=True, help="Inspect persona vector files.")
app.add_typer(traits_app, name="traits")
app.add_typer(vector_app, name="vector")
out = Console()
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from ._version import __version__

        typer.echo(f"personavec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="Print the version and exit.")] = False,
          # How every command below loads its model (read by _load); given before the command name.
          device_map: Annotated[str | None, typer.Option(help="Place the model's modules with accelerate: auto, "
                                                         "balanced, sequential, or a JSON object of module → "
                                                         "device ('cpu', 'disk', 0, 'cuda:1'); replaces --device.")] = None,
          load_in: Annotated[str | None, typer.Option(help="8bit or 4bit: quantize with bitsandbytes "
                                                      "(needs a CUDA GPU).")] = None,
          revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of --model.")] = None,
          trust_remote_code: Annotated[bool, typer.Option(help="Run the model repository's own code "
                                                          "(only for repositories you trust).")] = False,
          offload_folder: Annotated[Path | None, typer.Option(help="Folder for modules --device-map puts on "
                                                              "'disk'.")] = None) -> None:
    """Options that apply before any command (model loading: `personavec --device-map auto extract ...`)."""
    _LOADING.clear()  # every invocation sets them afresh (the in-process test runner reuses this module)
    _LOADING.update(device_map=device_map, load_in=load_in, revision=revision,
                    trust_remote_code=trust_remote_code, offload_folder=offload_folder)


_LOADING: dict[str, Any] = {}  # the model-loading options of this invocation, given before the command name


def _loading_options() -> dict[str, Any]:
    """The keyword arguments of load_model that the options before the command name set (see _root)."""
    options = dict(_LOADING)
    device_map = options.get("device_map")
    if isinstance(device_map, str) and device_map.lstrip().startswith("{"):
        try:
            options["device_map"] = json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise PersonavecError(f"--device-map is not a JSON object ({exc.msg}); pass auto, balanced, "
                                  'sequential or e.g. \'{"model.layers.0": 0, "lm_head": "cpu"}\'') from None
    return options

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Hub id, model folder or .gguf file "
                                              "(default: the embedded SmolLM2-135M-Instruct).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: best available).")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: bf16 where fast).")]
LayersPathOpt = Annotated[str | None, typer.Option("--layers-path", help="Dotted path of the decoder blocks, "
                                                   "for architectures discovery does not know.")]
JudgeOpt = Annotated[str, typer.Option(help="Trait measure: auto (reference when the trait has authored "
                                       "references, else contrast) | reference | contrast | local | "
                                       "local:MODEL | openai:MODEL[@URL]")]
ControlOpt = Annotated[list[str] | None, typer.Option(help="Control direction run at the same layers and "
                                                      "coefficients, at the vector's per-layer norm: 'random' "
                                                      "(or random:SEED) or another vector file; repeatable.")]
HalfOpt = Annotated[str, typer.Option(help="Evaluation questions: all | first | second half (choose settings "
                                      "on one half, report on the other).")]


@contextmanager
def progress_bars() -> Iterator[Any]:
    """A rich progress display and a library callback that feeds it, one bar per task name."""
    with Progress(SpinnerColumn(), TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bars:
        ids: dict[str, Any] = {}

        def callback(task: str, done: int, total: int) -> None:
            if task not in ids:
                ids[task] = bars.add_task(task, total=total)
            bars.update(ids[task], completed=done, total=total)

        yield callback


def _load(model: str | None, device: str | None, dtype: str | None, layers_path: str | None) -> Any:
    from .models import load_model

    with err.status(f"loading {model or 'the embedded model'}…"):
        return load_model(model, device=device, dtype=dtype, layers_path=layers_path, **_loading_options())


@app.command()
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
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
) -> None:
    """Extract a persona vector: rollouts under contrastive prompts, judge, filter, capture, difference."""
    from .extract import extract as run_extract
    from .traits import load_trait

    loaded = load_trait(trait)  # fail on a bad trait before spending time on the model
    m = _load(model, device, dtype, layers_path)
    folder = run_dir or out_path.with_name(out_path.name + ".run")
    with progress_bars() as cb:
        vec = run_extract(m, loaded, judge=judge, run_dir=folder, batch_size=batch_size, progress=cb,
                          n_questions=n_questions, n_pairs=n_pairs, rollouts=rollouts,
                          max_new_tokens=max_new_tokens, temperature=temperature, threshold=threshold, seed=seed)
    vec.save(out_path)
    c = vec.meta["counts"]
    out.print(f"wrote {out_path}: trait {vec.trait}, shape [{vec.n_layers + 1}, {vec.hidden_size}], kept "
              f"{c['positive_kept']}/{c['positive_total']} positive and {c['negative_kept']}/{c['negative_total']} "
              f"negative rollouts (judge {vec.meta['judge']}); run folder {folder}")


@app.command()
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
    allow_model_mismatch: Annotated[bool, typer.Option(help="Apply a vector made on other weights.")] = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
) -> None:
    """Answer prompts, optionally steered by a persona vector at one or more coefficients."""
    from .chat import messages_for
    from .generation import generate as run_generate
    from .layers import check_layer
    from .steering import check_coef
    from .vectors import PersonaVector

    texts = list(prompts or [])
    if file is not None:
        if not file.is_file():
            raise PersonavecError(f"prompt file '{file}' does not exist")
        texts += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise PersonavecError("no prompts: pass them as arguments or with --file")
    coefs = [check_coef(c) for c in coef or [1.0 if vector else 0.0]]
    vec = PersonaVector.load(vector) if vector else None
    if vec is None and any(c != 0 for c in coefs):
        raise PersonavecError("--coef needs --vector")
    chosen: Any = None
    if vec is not None:  # check what the vector alone can tell before paying for the model
        chosen = _parse_layer(layer) if layer is not None else vec.layer
        for ly in [chosen] if isinstance(chosen, int) else [] if chosen == "all" else chosen:
            check_layer(ly, vec.n_layers)
    m = _load(model, device, dtype, layers_path)
    if vec is not None:
        vec.check_model(m, allow_model_mismatch)
    conversations = [messages_for(t, system) for t in texts]
    answers: dict[float, list[str]] = {}
    with progress_bars() as cb:
        for c in coefs:
            handle = vec.steer(m, layer=chosen, coef=c, positions=positions,
                               allow_mismatch=allow_model_mismatch) if vec is not None else None
            try:
                answers[c] = run_generate(m, conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                          seed=seed, progress=cb, task=f"coef {c:+g}")
            finally:
                if handle is not None:
                    handle.remove()
    where = f" at layer {chosen}" if vec is not None else ""
    for i, t in enumerate(texts):
        out.rule(f"[bold]{t}")
        for c in coefs:
            label = f"coef {c:+g}{where}" if vec is not None else "answer"
            out.print(f"[cyan]{label}:[/cyan] {answers[c][i]}")


def _parse_floats(values: list[str] | None, name: str) -> list[float] | None:
    """'-2,0,2' or repeated options → floats; None when not given."""
    if not values:
        return None
    try:
        out = [float(x) for v in values for x in v.split(",") if x.strip()]
    except ValueError:
        raise PersonavecError(f"{name} must be numbers like -2,0,2, got {' '.join(values)}") from None
    if not out:
        raise PersonavecError(f"{name} is empty")
    return out


@app.command("eval")
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
    model: ModelOpt = None,
    allow_model_mismatch: Annotated[bool, typer.Option(help="Apply a vector made on other weights.")] = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
) -> None:
    """Score the model's answers to the trait's evaluation questions, optionally steered."""
    from .evaluate import Condition, EvalSettings, evaluate
    from .traits import load_trait
    from .vectors import PersonaVector

    loaded = load_trait(trait)
    coefs = _parse_floats(coef, "--coef") or [0.0]
    vec = PersonaVector.load(vector) if vector else None
    if vec is None and any(c != 0 for c in coefs):
        raise PersonavecError("--coef needs --vector")
    chosen = layer if layer is not None else (vec.layer if vec else None)
    settings = EvalSettings(n_questions=n_questions, rollouts=rollouts, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, positions=positions, capability=capability,
                            half=half)
    settings.validate()
    controls = _controls(control, vec, seed)
    m = _load(model, device, dtype, layers_path)
    with progress_bars() as cb:
        cells = evaluate(m, loaded, vector=vec, conditions=[Condition(chosen, c) for c in coefs], judge=judge,
                         settings=settings, run_dir=out_dir, allow_mismatch=allow_model_mismatch, progress=cb,
                         controls=controls, extra_settings={"vector": str(vector or ""),
                                                            "control_specs": list(control or [])})
    _print_cells(cells)
    out.print(f"results in {out_dir}/cells.csv and answers.jsonl")


def _controls(specs: list[str] | None, vec: Any, seed: int) -> dict[str, Any]:
    from .controls import make_controls

    if specs and vec is None:
        raise PersonavecError("--control needs --vector (a control is matched to the vector's norm)")
    return make_controls(specs, vec, seed) if specs else {}


def _print_cells(cells: list[dict[str, Any]]) -> None:
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


@app.command("sweep")
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
    allow_model_mismatch: Annotated[bool, typer.Option(help="Apply a vector made on other weights.")] = False,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
) -> None:
    """Evaluate a layer × coefficient grid and choose where to steer (written into the vector file)."""
    from .evaluate import EvalSettings
    from .layers import check_layer
    from .sweep import sweep
    from .traits import load_trait
    from .vectors import PersonaVector

    loaded = load_trait(trait)
    vec = PersonaVector.load(vector)
    layer_list = [int(x) for x in _parse_floats(layers, "--layers") or []] or None
    for ly in layer_list or []:
        check_layer(ly, vec.n_layers)
    coef_list = _parse_floats(coefs, "--coefs")
    for c in coef_list or []:
        check_coef(c)
    m = _load(model, device, dtype, layers_path)
    settings = EvalSettings(n_questions=n_questions, max_new_tokens=max_new_tokens, seed=seed, capability=capability,
                            half=half)
    settings.validate()
    controls = _controls(control, vec, seed)
    with progress_bars() as cb:
        choice = sweep(m, loaded, vec, layers=layer_list, coefs=coef_list, judge=judge, settings=settings,
                       run_dir=out_dir, coherence_min=coherence_min, vector_path=None if no_update else vector,
                       allow_mismatch=allow_model_mismatch, controls=controls, progress=cb)
    from .report import read_cells

    _print_cells([dict(c) for c in read_cells(out_dir / "cells.csv")[1]])
    out.print(f"best layer {choice['best_layer']} (coef {choice['best_coef']:+g}, {choice['measure']} change "
              f"{choice['trait_change']:+.3g}, {settings.half} half of the evaluation questions); " + ("" if no_update else f"written into {vector}; ")
              + f"run folder {out_dir}")


@app.command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="A sweep or eval run folder.")]) -> None:
    """Write RUN_DIR/report.html: one self-contained page with plots, tables and example answers."""
    from .report import write_report

    path = write_report(run_dir)
    out.print(f"wrote {path}")


def _parse_layer(text: str) -> int | list[int] | str:
    if text == "all":
        return "all"
    try:
        parts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonavecError(f"--layer must be an integer, a comma list or 'all', got '{text}'") from None
    if not parts:
        raise PersonavecError("--layer is empty")
    return parts[0] if len(parts) == 1 else parts


@traits_app.command("list")
def traits_list() -> None:
    """List the built-in traits."""
    from .traits import builtin_traits, load_trait

    table = Table("trait", "pairs", "extraction", "evaluation", "description")
    for name in builtin_traits():
        t = load_trait(name).trait
        table.add_row(name, str(len(t.pairs)), str(len(t.extraction_questions)), str(len(t.evaluation_questions)),
                      t.description.split(". ")[0][:70])
    out.print(table)


@traits_app.command("show")
def traits_show(trait: Annotated[str, typer.Argument(help="Built-in name or trait file.")]) -> None:
    """Print a trait file (validated)."""
    from .traits import load_trait

    loaded = load_trait(trait)
    out.print(f"# {loaded.source} (sha256 {loaded.sha256[:16]})")
    out.print(Path(loaded.source).read_text(encoding="utf-8"), markup=False, highlight=False)


@vector_app.command("info")
def vector_info(path: Annotated[Path, typer.Argument(help="A .pv.safetensors file.")],
                as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Show a vector's provenance and per-layer norms (layer L = output of decoder block L; 0 = embeddings)."""
    from .vectors import PersonaVector

    summary = PersonaVector.load(path).summary()
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    meta = summary["meta"]
    table = Table("field", "value", title=str(path))
    for key in ("trait", "model_id", "fingerprint", "n_layers", "hidden_size", "judge", "threshold", "counts",
                "best_layer", "trait_sha256", "version", "created", "layer_convention"):
        if key in meta:
            table.add_row(key, json.dumps(meta[key]) if isinstance(meta[key], dict) else str(meta[key]))
    table.add_row("shape", str(summary["shape"]))
    out.print(table)
    norms = summary["norms"].get("response") or next(iter(summary["norms"].values()))
    out.print("response-vector norm by layer: " + ", ".join(f"{i}:{n:.1f}" for i, n in enumerate(norms)))


# The commands of later features live in modules of their own (cli_*.py); importing them registers them
# on `app`, `traits_app` and `vector_app`, so this file stays the one entry point.
from . import cli_interop, cli_monitor, cli_screen, cli_serve, cli_train, cli_vectors  # noqa: E402, F401


def main() -> None:
    try:
        app()
    except PersonavecError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume where a run folder is used")
        sys.exit(130)


if __name__ == "__main__":
    # Under `python -m personavec.cli` this file runs as __main__, but the cli_* modules register their commands
    # on the imported `personavec.cli` module's app: run that one, so both entry points see every command.
    from personavec.cli import main as _main

    _main()
