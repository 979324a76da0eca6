"""What every command shares: the consoles, the options given before the command name (model loading,
--quiet), model loading, progress bars, JSON output and the parsers of list options. No command here."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from ..errors import PersonavecError
from ..paths import Output, check_outputs, existing_paths
from ..progress import no_progress

out = Console()
err = Console(stderr=True)

# The options of this invocation given before the command name (set afresh by `root` each time: the
# in-process test runner reuses these modules).
_LOADING: dict[str, Any] = {}  # model loading, read by `load`
_STATE: dict[str, Any] = {"quiet": False}


def _print_version(value: bool) -> None:
    if value:
        from .._version import __version__

        typer.echo(f"personavec {__version__}")
        raise typer.Exit()


def root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, spinners or informational "
                                             "lines on stderr (results and errors still print).")] = False,
         # How every command below loads its model (read by load); given before the command name.
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
    """Options that apply before any command (model loading: `personavec --device-map auto extract ...`;
    `personavec -q ...` for quiet scripts)."""
    _LOADING.clear()
    _LOADING.update(device_map=device_map, load_in=load_in, revision=revision,
                    trust_remote_code=trust_remote_code, offload_folder=offload_folder)
    _STATE["quiet"] = quiet


def quiet() -> bool:
    """Whether -q/--quiet was given before the command name."""
    return bool(_STATE["quiet"])


def _loading_options() -> dict[str, Any]:
    """The keyword arguments of load_model that the options before the command name set (see root)."""
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
EngineOpt = Annotated[str, typer.Option("--engine", help="Who generates: hf (Hugging Face generate, the exact "
                                        "reference) | vllm (the vllm extra: paged attention, tensor parallelism; "
                                        "steering runs inside its workers).")]
TensorParallelOpt = Annotated[int, typer.Option("--tensor-parallel-size", help="GPUs the vllm engine splits the "
                                                "model over (vllm engine only).")]
GpuMemoryOpt = Annotated[float | None, typer.Option("--gpu-memory-utilization", help="Share of each GPU the vllm "
                                                    "engine may take (default 0.9; leave room for the Hugging "
                                                    "Face copy the measures read).")]
AllowMismatchOpt = Annotated[bool, typer.Option(help="Use vectors made on other weights (their fingerprint "
                                                         "differs from the model's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout "
                                       "(progress and warnings on stderr).")]


@contextmanager
def progress_bars() -> Iterator[Any]:
    """A rich progress display on stderr and a library callback that feeds it, one bar per task name;
    under --quiet, a callback that draws nothing."""
    if quiet():
        yield no_progress
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bars:
        ids: dict[str, Any] = {}

        def callback(task: str, done: int, total: int) -> None:
            if task not in ids:
                ids[task] = bars.add_task(task, total=total)
            bars.update(ids[task], completed=done, total=total)

        yield callback


def info(message: str) -> None:
    """An informational line on stderr (silenced by --quiet)."""
    if not quiet():
        err.print(message, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A warning line on stderr (printed even under --quiet)."""
    err.print(message, highlight=False, soft_wrap=True)


def check_engine_options(engine: str, tensor_parallel_size: int = 1,
                         gpu_memory_utilization: float | None = None) -> None:
    """`engines.check_engine` plus what only the command line knows: --load-in quantizes the Hugging Face copy
    alone, so vLLM would generate from other weights than the ones personavec reads and steers."""
    from ..engines import check_engine

    if engine == "vllm" and _LOADING.get("load_in"):
        raise PersonavecError("--load-in quantizes only the Hugging Face copy, and vLLM would generate from the "
                              "full-precision weights; drop --load-in with --engine vllm, or use --engine hf")
    check_engine(engine, tensor_parallel_size, gpu_memory_utilization)


def load(model: str | None, device: str | None, dtype: str | None, layers_path: str | None) -> Any:
    """Load the model a command names, with the loading options given before the command name."""
    from ..models import load_model

    spinner = nullcontext() if quiet() else err.status(f"loading {model or 'the embedded model'}…")
    with spinner:
        return load_model(model, device=device, dtype=dtype, layers_path=layers_path, **_loading_options())


def jsonable(value: Any) -> Any:
    """`value` with paths, dataclasses, numpy and torch values made plain JSON (non-finite floats → null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):  # pydantic
        return jsonable(value.model_dump())
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return jsonable(value.tolist())
    return str(value)


def emit_json(result: Any) -> None:
    """The command's one JSON document on stdout (nothing else goes to stdout under --json)."""
    sys.stdout.write(json.dumps(jsonable(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    sys.stdout.flush()


def parse_floats(values: list[str] | None, name: str) -> list[float] | None:
    """'-2,0,2' or repeated options → floats; None when not given."""
    if not values:
        return None
    try:
        parsed = [float(x) for v in values for x in v.split(",") if x.strip()]
    except ValueError:
        raise PersonavecError(f"{name} must be numbers like -2,0,2, got {' '.join(values)}") from None
    if not parsed:
        raise PersonavecError(f"{name} is empty")
    return parsed


def parse_layer(text: str) -> int | list[int] | str:
    """--layer of generate: 'L', 'a,b' or 'all'."""
    if text == "all":
        return "all"
    try:
        parts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonavecError(f"--layer must be an integer, a comma list or 'all', got '{text}'") from None
    if not parts:
        raise PersonavecError("--layer is empty")
    return parts[0] if len(parts) == 1 else parts


#: What to do about an operating-system error on a path the user named, by errno name.
_OS_ADVICE = {
    "EACCES": "check its permissions or choose another path",
    "EPERM": "check its permissions or choose another path",
    "EROFS": "the file system is read-only; choose another path",
    "EISDIR": "it is a folder; name a file",
    "ENOTDIR": "a folder on its path is a file; choose another path",
    "ENOENT": "check the path",
    "ENOSPC": "the disk is full; free space or choose another path",
    "EEXIST": "it exists; choose another path",
    "ENAMETOOLONG": "choose a shorter path",
}


def os_error_line(exc: OSError) -> str:
    """An operating-system error on a user's path as one line: what failed, on which path, what to do."""
    name = errno.errorcode.get(exc.errno or 0, "")
    paths = " → ".join(f"'{f}'" for f in (exc.filename, exc.filename2) if f is not None)
    advice = _OS_ADVICE.get(name, "check the path")
    return f"{exc.strerror or type(exc).__name__}: {paths}; {advice}"


class _WarningLines(logging.Handler):
    """The library's warnings (logger 'personavec') as plain stderr lines, printed even under --quiet."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(f"warning: {record.getMessage()}")


def main_with(app: typer.Typer) -> None:
    """Run `app` as a console script: a user's error is one line and status 2, ^C status 130 with a line saying
    how to resume. An operating-system error on a path (a read-only folder, a folder where a file should be, a
    parent that is a file) is a user's error too; one without a path stays a traceback."""
    library_log = logging.getLogger("personavec")
    handler = _WarningLines(logging.WARNING)
    library_log.addHandler(handler)
    try:
        app()
    except PersonavecError as exc:
        _error_line(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise
        _error_line(os_error_line(exc))
    except SystemExit as exc:
        # typer turns ^C into exit status 130 without a word, terminal or not
        if exc.code == 130:
            err.print("interrupted; rerun the same command to resume where a run folder is used")
        raise
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume where a run folder is used")
        sys.exit(130)
    finally:
        library_log.removeHandler(handler)


def _error_line(message: str) -> None:
    # escaped: a message naming e.g. personavec[vllm] must print as written, not as rich markup
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def guard(inputs: dict[str, Any], files: dict[str, Path | None] | None = None,
          folders: dict[str, Path | None] | None = None, outputs: Sequence[Output] = ()) -> None:
    """The command's inputs (option → path, spec or list of them; names that are no existing path are left
    out) against the files and folders it writes (or `outputs` a library function lists): see
    `paths.check_outputs`. Called before the model loads."""
    def listed(value: Any) -> list[Any]:
        return list(value) if isinstance(value, list | tuple) else [value]

    written = [Output(k, Path(v)) for k, v in (files or {}).items() if v is not None]
    written += [Output(k, Path(v), folder=True) for k, v in (folders or {}).items() if v is not None]
    check_outputs({k: existing_paths(listed(v)) for k, v in inputs.items()}, [*written, *outputs])
