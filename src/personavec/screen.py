"""Screen training data before it goes live: projection difference ΔP per sample and per dataset.

For every conversation (the last assistant turn is the response), ΔP = projection of the dataset's answer
minus projection of the base model's own answer to the same prompt, on each persona vector at its layer
(`fast=True`: minus the last prompt token's projection, no generation). Large ΔP marks samples that would
pull a finetuned model toward the trait; the dataset mean predicts the shift finetuning on it would cause.

Scale: the input is streamed in fixed chunks (memory holds one chunk plus ~40 bytes per scored sample for
the final ranking), finished chunks are appended to the run folder so an interrupted run resumes where it
stopped, and `ray=` scores the same chunks on a Ray cluster with the same results.

Outputs (all new files; the input is never touched): the scores table (CSV, or Parquet for a `.parquet`
name), `<stem>.rejects.jsonl`, `<stem>.summary.json`, `<stem>.<trait>.png` histograms, and on request a
filtered copy of the dataset without the flagged samples.

A screen runs in named phases over one `ScreenSettings`: check the inputs, score the dataset (and the
calibration reference), set the thresholds, build the table and summary, write the outputs."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .engines import engine_record, engine_scope
from .errors import VectorError
from .io import write_json, write_text
from .paths import Output, check_outputs, existing_paths
from .progress import Progress, no_progress
from .screening.dataset import Scored, score_dataset
from .screening.outputs import histogram, write_table
from .screening.rows import DatasetError
from .screening.score import ScoreSettings
from .screening.source import format_of, write_filtered
from .screening.stats import percentile_threshold, ranks
from .stats import mean_ci
from .vectors import name_by_trait

if TYPE_CHECKING:
    from .engines import Engine
    from .models import Model
    from .vectors import PersonaVector

__all__ = ["DatasetError", "Filtered", "ScreenResult", "ScreenSettings", "ScreenSummary", "TraitSummary", "score_dataset",
           "screen", "screen_with"]

TOKEN_COLUMNS = ("prompt_tokens", "answer_tokens", "base_tokens")


@dataclass(frozen=True)
class TraitSummary:
    """One vector's screen: its layer, the dataset's ΔP (`personavec.stats.mean_ci`'s record: mean, t
    interval, n), the threshold (None: nothing flagged) with where it came from, and how many it flags."""

    layer: int
    delta_p: dict[str, Any]
    threshold: float | None
    threshold_source: str | None
    n_flagged: int


@dataclass(frozen=True)
class Filtered:
    """The filtered copy of the dataset: its path, the rows kept, and the rows left out and why."""

    path: str
    rows: int
    dropped_flagged: int
    dropped_rejected: int


@dataclass(frozen=True)
class ScreenSummary:
    """What a screen found: `<stem>.summary.json`. `histograms` and `filtered` are None (and absent from the
    file) when they were not asked for."""

    input: str
    input_sha256: str
    rows: int  # in the input
    scored: int
    rejected: int
    reject_reasons: dict[str, int]
    flagged_any: int  # samples that any trait flags
    mode: str
    model: str
    max_new_tokens: int | None  # None in fast mode (nothing generated)
    engine: dict[str, Any] | None  # the engine that wrote the base answers; None in fast mode
    traits: dict[str, TraitSummary]
    scores: str
    rejects_file: str
    run_dir: str
    histograms: list[str] | None = None
    filtered: Filtered | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("histograms", "filtered")}


@dataclass
class ScreenResult:
    scores: Path
    rejects: Path
    summary_path: Path
    summary: ScreenSummary
    histograms: list[Path] = field(default_factory=list)
    filtered: Path | None = None


@dataclass(frozen=True)
class ScreenSettings:
    """The keywords of `screen` as one value, so every phase reads the same settings (see `screen`)."""

    fast: bool = False
    max_new_tokens: int = 64
    layer: int | None = None  # None: each vector's own layer
    batch_size: int = 16
    chunk_size: int = 256
    threshold: float | Mapping[str, float] | None = None  # one number, or per trait
    calibrate: str | os.PathLike[str] | None = None  # reference dataset for a percentile threshold
    percentile: float = 95.0
    filtered_out: str | os.PathLike[str] | None = None
    run_dir: str | os.PathLike[str] | None = None  # None: <out>.run
    cache: str | os.PathLike[str] | None = None  # base answers; None: in the user cache
    ray: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    allow_mismatch: bool = False
    histograms: bool = True

    def validate(self, data: str | os.PathLike[str]) -> None:
        """Settings that cannot work together fail before any scoring is paid for."""
        if self.threshold is not None and self.calibrate is not None:
            raise DatasetError("give either a threshold or a calibration dataset, not both")
        if self.filtered_out is not None and self.threshold is None and self.calibrate is None:
            raise DatasetError("a filtered copy needs flags: pass --threshold or --calibrate REF --percentile P")
        if self.filtered_out is not None and format_of(self.filtered_out) != format_of(data):
            raise DatasetError(f"the filtered copy must have the input's format ({format_of(data)}); "
                               f"name it with a {'.parquet' if format_of(data) == 'parquet' else '.jsonl'} suffix")
        if not 0 < self.percentile < 100:
            raise DatasetError(f"percentile must lie strictly between 0 and 100, got {self.percentile}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise DatasetError("max_new_tokens and batch_size must be at least 1")

    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(fast=self.fast, max_new_tokens=self.max_new_tokens, layer=self.layer,
                             batch_size=self.batch_size)


@dataclass(frozen=True)
class OutPaths:
    """Where a screen writes: the scores table, its rejects and summary beside it, the run folder."""

    scores: Path
    rejects: Path
    summary: Path
    stem: Path  # histograms are <stem>.<trait>.png
    run_dir: Path

    @classmethod
    def of(cls, out: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None) -> OutPaths:
        out_p = Path(out)
        stem = out_p.name[: -len(out_p.suffix)] if out_p.suffix else out_p.name
        return cls(out_p, out_p.with_name(f"{stem}.rejects.jsonl"), out_p.with_name(f"{stem}.summary.json"),
                   out_p.with_name(stem),
                   Path(run_dir) if run_dir is not None else out_p.with_name(out_p.name + ".run"))

    def outputs(self, filtered_out: str | os.PathLike[str] | None = None,
                cache: str | os.PathLike[str] | None = None) -> list[Output]:
        """Every path a screen writes, for the output guard (`paths.check_outputs`)."""
        named = [Output("--out", self.scores), Output("its rejects file", self.rejects),
                 Output("its summary file", self.summary), Output("--run-dir", self.run_dir, folder=True)]
        return named + [Output(option, Path(p)) for option, p in (("--filtered-out", filtered_out),
                                                                  ("--cache", cache)) if p is not None]


@dataclass(frozen=True)
class Thresholds:
    """ΔP above which a sample is flagged, per trait (None: never flagged), and where they came from."""

    values: dict[str, float | None]
    source: str | None  # "given", "percentile P of N reference samples (REF)", or None


def screen(model: Model, data: str | os.PathLike[str],
           vectors: Sequence[PersonaVector] | Mapping[str, PersonaVector], out: str | os.PathLike[str], *,
           fast: bool = False, max_new_tokens: int = 64, layer: int | None = None, batch_size: int = 16,
           chunk_size: int = 256, threshold: float | Mapping[str, float] | None = None,
           calibrate: str | os.PathLike[str] | None = None, percentile: float = 95.0,
           filtered_out: str | os.PathLike[str] | None = None, run_dir: str | os.PathLike[str] | None = None,
           cache: str | os.PathLike[str] | None = None, ray: str | None = None, workers: int = 2,
           cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, allow_mismatch: bool = False,
           histograms: bool = True, engine: Engine | str | None = None,
           progress: Progress = no_progress) -> ScreenResult:
    """Screen `data` (JSONL or Parquet conversations) with one or more persona vectors; see the module doc.

    Flags: ΔP above `threshold` (one number, or per trait), or above the `percentile` of ΔP on the
    reference dataset `calibrate` (screened with the same settings). The run folder (default
    `<out>.run`) makes a rerun resume; `cache` holds base-model answers (default in the user cache).
    `engine` ("hf", "vllm" or an engine object) writes full mode's base answers."""
    settings = ScreenSettings(
        fast=fast, max_new_tokens=max_new_tokens, layer=layer, batch_size=batch_size, chunk_size=chunk_size,
        threshold=threshold, calibrate=calibrate, percentile=percentile, filtered_out=filtered_out,
        run_dir=run_dir, cache=cache, ray=ray, workers=workers, cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker, allow_mismatch=allow_mismatch, histograms=histograms)
    return screen_with(model, data, vectors, out, settings, engine=engine, progress=progress)


def screen_with(model: Model, data: str | os.PathLike[str],
                vectors: Sequence[PersonaVector] | Mapping[str, PersonaVector], out: str | os.PathLike[str],
                settings: ScreenSettings, *, engine: Engine | str | None = None,
                progress: Progress = no_progress) -> ScreenResult:
    """`screen` with its settings as one value."""
    named = _check_inputs(model, data, vectors, out, settings)
    paths = OutPaths.of(out, settings.run_dir)
    scored, reference = _score(model, data, named, settings, paths.run_dir, engine, progress)
    thresholds = _thresholds(settings, list(named), reference)
    _write_rejects(scored, data, paths.rejects)
    table, flagged_any, summary = _table_and_summary(model, data, scored, named, thresholds, settings, paths,
                                                     engine)
    return _write_outputs(scored, reference, table, flagged_any, summary, thresholds, settings, paths)


def _check_inputs(model: Model, data: str | os.PathLike[str],
                  vectors: Sequence[PersonaVector] | Mapping[str, PersonaVector], out: str | os.PathLike[str],
                  s: ScreenSettings) -> dict[str, PersonaVector]:
    """The vectors by trait name, each checked against the model; then paths and settings."""
    named = name_by_trait(vectors)
    if not named:
        raise VectorError("no vectors to screen with; pass at least one --vector")
    for v in named.values():
        v.check_model(model, s.allow_mismatch)
    paths = OutPaths.of(out, s.run_dir)
    check_outputs({"DATA": existing_paths([data]), "--calibrate": existing_paths([s.calibrate])},
                  paths.outputs(s.filtered_out))
    s.validate(data)
    return named


def _score(model: Model, data: str | os.PathLike[str], named: dict[str, PersonaVector], s: ScreenSettings,
           folder: Path, engine: Engine | str | None, progress: Progress) -> tuple[Scored, Scored | None]:
    """The dataset's scores and, when calibrating, the reference's (in `folder`/reference), on one engine."""
    common: dict[str, Any] = {"settings": s.score_settings(), "chunk_size": s.chunk_size, "cache": s.cache,
                              "ray": s.ray, "workers": s.workers, "cpus_per_worker": s.cpus_per_worker,
                              "gpus_per_worker": s.gpus_per_worker, "progress": progress}
    with engine_scope(model, engine) as eng:
        scored = score_dataset(model, data, named, run_dir=folder, engine=eng, **common, task="screen")
        reference = (score_dataset(model, s.calibrate, named, run_dir=folder / "reference", engine=eng, **common,
                                   task="calibrate") if s.calibrate is not None else None)
    return scored, reference


def _given_thresholds(threshold: float | Mapping[str, float] | None,
                      traits: list[str]) -> dict[str, float | None]:
    if threshold is None:
        return dict.fromkeys(traits)
    if isinstance(threshold, Mapping):
        unknown = sorted(set(threshold) - set(traits))
        if unknown:
            raise DatasetError(f"threshold given for unknown trait(s) {', '.join(unknown)}; traits: {', '.join(traits)}")
        return {t: (float(threshold[t]) if t in threshold else None) for t in traits}
    return dict.fromkeys(traits, float(threshold))


def _thresholds(s: ScreenSettings, traits: list[str], reference: Scored | None) -> Thresholds:
    """The given thresholds, or the reference's ΔP percentile per trait when calibrating."""
    given = Thresholds(_given_thresholds(s.threshold, traits), "given" if s.threshold is not None else None)
    if reference is None:
        return given
    if len(reference.index) == 0:
        raise DatasetError(f"the calibration dataset '{s.calibrate}' has no valid samples; see its rejects")
    return Thresholds({t: percentile_threshold(reference.columns[f"{t}_delta_p"], s.percentile) for t in traits},
                      f"percentile {s.percentile:g} of {len(reference.index)} reference samples ({s.calibrate})")


def _write_rejects(scored: Scored, data: str | os.PathLike[str], path: Path) -> None:
    """The rejects file is written even when nothing was scored: it says why."""
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in scored.rejects))
    if len(scored.index) == 0:
        raise DatasetError(f"no valid samples in '{data}' ({len(scored.rejects)} rejected); see {path}")


def _table_and_summary(model: Model, data: str | os.PathLike[str], scored: Scored,
                       named: dict[str, PersonaVector], thresholds: Thresholds, s: ScreenSettings,
                       paths: OutPaths, engine: Engine | str | None
                       ) -> tuple[dict[str, Any], np.ndarray, ScreenSummary]:
    """The scores table (columns in output order), which samples any trait flags, and the summary."""
    n = len(scored.index)
    flags = {t: (scored.columns[f"{t}_delta_p"] > thr if thr is not None else np.zeros(n, dtype=bool))
             for t, thr in thresholds.values.items()}
    flagged_any = np.zeros(n, dtype=bool)
    for f in flags.values():
        flagged_any |= f
    per_trait = {t: TraitSummary(layer=s.layer if s.layer is not None else named[t].layer,
                                 delta_p=mean_ci(scored.columns[f"{t}_delta_p"]), threshold=thresholds.values[t],
                                 threshold_source=thresholds.source if thresholds.values[t] is not None else None,
                                 n_flagged=int(f.sum())) for t, f in flags.items()}
    summary = ScreenSummary(
        input=str(data), input_sha256=scored.source.sha256, rows=scored.source.n_rows, scored=n,
        rejected=len(scored.rejects), reject_reasons=dict(Counter(r["reason"].split(":")[0]
                                                                  for r in scored.rejects)),
        flagged_any=int(flagged_any.sum()),
        mode="fast (last prompt token)" if s.fast else "full (base model's own answer)",
        model=model.model_id, max_new_tokens=None if s.fast else s.max_new_tokens,
        engine=None if s.fast else engine_record(engine), traits=per_trait,
        scores=str(paths.scores), rejects_file=str(paths.rejects), run_dir=str(paths.run_dir))
    return _table(scored, flags), flagged_any, summary


def _table(scored: Scored, flags: dict[str, np.ndarray]) -> dict[str, Any]:
    table: dict[str, Any] = {"index": scored.index, "id": scored.ids}
    for t, f in flags.items():
        dp = scored.columns[f"{t}_delta_p"]
        table |= {f"{t}_delta_p": dp, f"{t}_rank": ranks(dp), f"{t}_flagged": f,
                  f"{t}_answer_proj": scored.columns[f"{t}_answer_proj"],
                  f"{t}_base_proj": scored.columns[f"{t}_base_proj"]}
    return table | {c: scored.columns[c].astype(np.int64) for c in TOKEN_COLUMNS}


def _write_outputs(scored: Scored, reference: Scored | None, table: dict[str, Any], flagged_any: np.ndarray,
                   summary: ScreenSummary, thresholds: Thresholds, s: ScreenSettings,
                   paths: OutPaths) -> ScreenResult:
    """The table, the histograms and the filtered copy when asked for, and last the summary naming them."""
    write_table(paths.scores, table)
    result = ScreenResult(scores=paths.scores, rejects=paths.rejects, summary_path=paths.summary, summary=summary)
    if s.histograms:
        for t, thr in thresholds.values.items():
            ref_values = reference.columns[f"{t}_delta_p"] if reference is not None else None
            result.histograms.append(histogram(paths.stem.with_name(f"{paths.stem.name}.{t}.png"), t,
                                               scored.columns[f"{t}_delta_p"], thr, ref_values, s.fast))
        result.summary = replace(result.summary, histograms=[str(p) for p in result.histograms])
    if s.filtered_out is not None:
        keep = np.zeros(scored.source.n_rows, dtype=bool)
        keep[scored.index[~flagged_any]] = True
        kept = write_filtered(scored.source, keep, s.filtered_out)
        result.filtered = Path(s.filtered_out)
        result.summary = replace(result.summary, filtered=Filtered(
            path=str(s.filtered_out), rows=kept, dropped_flagged=int(flagged_any.sum()),
            dropped_rejected=len(scored.rejects)))
    write_json(paths.summary, result.summary.to_json())
    return result
