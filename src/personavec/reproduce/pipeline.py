"""The `reproduce` pipeline: run the stages in order in one run folder, skip the ones the manifest records
as done, write each stage's result (per-item values included) as `<stage>.json`, then the targets and
`report.html`. A stage that raises is marked failed and re-entered on the next run; the library calls it
makes resume from their own run folders, so finished work inside it is kept."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engines import check_engine, open_engine
from ..io import write_json
from ..progress import Progress, no_progress
from ..traits import load_trait
from . import manifest
from .capability import CapabilityResult, run_capability
from .context import Context, NotRun
from .extraction import ExtractionResult, run_extraction
from .finetuning import FinetuneResult, run_finetuning
from .monitoring import MonitorResult, run_monitoring
from .records import Target, load_as, to_json
from .screening import ScreenResult, run_screening
from .settings import ReproduceSettings
from .sharegpt import ShareGPTResult, run_sharegpt
from .steering import SteeringResult, run_steering
from .targets import all_targets

if TYPE_CHECKING:
    from ..models import Model

#: Stage name → function, in run order. Looked up at run time (tests replace an entry to interrupt a run).
STAGES: dict[str, Callable[[Context], Any]] = {
    "extract": run_extraction, "sweep": run_steering, "capability": run_capability, "monitor": run_monitoring,
    "finetune": run_finetuning, "screen": run_screening, "sharegpt": run_sharegpt}
RESULTS: dict[str, type] = {"extract": ExtractionResult, "sweep": SteeringResult, "capability": CapabilityResult,
                            "monitor": MonitorResult, "finetune": FinetuneResult,
                            "screen": ScreenResult, "sharegpt": ShareGPTResult}


@dataclass(frozen=True)
class ReproduceResult:
    folder: Path
    report: Path
    targets: list[Target]
    stages: dict[str, manifest.StageRecord]
    ran: list[str]  # stages computed by this call (the others were done before, or are not run)


def reproduce(model: Model, settings: ReproduceSettings, out: str | Path, *, tensor_parallel_size: int = 1,
              gpu_memory_utilization: float | None = None, progress: Progress = no_progress) -> ReproduceResult:
    """Run (or resume) every stage of `settings` on `model` into the run folder `out`. `tensor_parallel_size`
    and `gpu_memory_utilization` (vllm engine) are where the run happens, not what it computes, so they are not
    settings of the folder."""
    settings.validate()
    traits = {n: load_trait(n) for n in settings.traits}
    check_engine(settings.engine, tensor_parallel_size, gpu_memory_utilization)
    folder = manifest.open_folder(out, settings, model.model_id, model.fingerprint, list(STAGES))
    with open_engine(model, settings.engine, tensor_parallel_size, gpu_memory_utilization) as engine:
        ctx = Context(model=model, settings=settings, folder=folder, traits=traits, progress=progress, engine=engine)
        ran = run_stages(ctx)
    targets = all_targets(settings, ctx.results)
    write_json(folder / "targets.json", to_json(targets))
    from ..report.reproduce_page import write_page

    records = {n: manifest.stage(folder, n) for n in STAGES}
    report = write_page(folder, settings, manifest.read(folder), ctx.results, targets)
    return ReproduceResult(folder, report, targets, records, ran)


def run_stages(ctx: Context) -> list[str]:
    """Run the stages not yet done, in order; returns the names of those that computed a result."""
    folder, progress = ctx.folder, ctx.progress
    ran = []
    for k, name in enumerate(STAGES):
        progress("stages", k, len(STAGES))
        path = folder / f"{name}.json"
        record = manifest.stage(folder, name)
        if record.status == manifest.DONE and path.exists():
            ctx.results[name] = load_as(RESULTS[name], json.loads(path.read_text(encoding="utf-8")))
            continue
        if record.status == manifest.SKIPPED:  # final too: the folder's settings cannot change
            ctx.results[name] = NotRun(record.status, record.reason)
            continue
        started = manifest.start(folder, name)
        try:
            result = STAGES[name](ctx)
        except BaseException as exc:  # an interrupt too: the manifest must not claim the stage is running
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            manifest.finish(folder, name, started, manifest.FAILED, f"{type(exc).__name__}: {reason}")
            raise
        ctx.results[name] = result
        if isinstance(result, NotRun):
            manifest.finish(folder, name, started, result.status, result.reason)
            continue
        write_json(path, to_json(result))
        manifest.finish(folder, name, started)
        ran.append(name)
    progress("stages", len(STAGES), len(STAGES))
    return ran
