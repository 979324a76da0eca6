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
filtered copy of the dataset without the flagged samples."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .engines import EngineError, engine_record, engine_scope
from .engines import run_settings as engine_settings
from .errors import VectorError
from .io import append_jsonl, atomic_path, write_json, write_text
from .models import cache_root
from .progress import Progress, no_progress
from .runs import open_run
from .screening.rows import DatasetError
from .screening.score import AnswerCache, ScoreSettings, score_chunk
from .screening.source import Source, format_of, iter_chunks, open_source, write_filtered
from .screening.stats import percentile_threshold, ranks
from .stats import mean_ci
from .vectors import name_by_trait

if TYPE_CHECKING:
    from .engines import Engine
    from .models import Model
    from .vectors import PersonaVector

__all__ = ["DatasetError", "ScreenResult", "score_dataset", "screen"]

CHUNKS_FILE = "chunks.jsonl"


@dataclass
class ScreenResult:
    scores: Path
    rejects: Path
    summary_path: Path
    summary: dict[str, Any]
    histograms: list[Path] = field(default_factory=list)
    filtered: Path | None = None


@dataclass
class Scored:
    """All scored rows of a dataset, sorted by input index, and its rejects."""

    source: Source
    index: np.ndarray
    ids: list[str | None]
    columns: dict[str, np.ndarray]
    rejects: list[dict[str, Any]]


def _named(vectors: Sequence[PersonaVector] | Mapping[str, PersonaVector]) -> dict[str, PersonaVector]:
    named = name_by_trait(vectors)
    if not named:
        raise VectorError("no vectors to screen with; pass at least one --vector")
    return named


def _out_paths(out: Path) -> tuple[Path, Path, Path]:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return (out.with_name(f"{stem}.rejects.jsonl"), out.with_name(f"{stem}.summary.json"),
            out.with_name(stem))


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """Chunk records of a run, streamed; a torn last line (interrupted append) is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def score_dataset(model: Model, data: str | os.PathLike[str], vectors: Mapping[str, PersonaVector], *,
                  settings: ScoreSettings, run_dir: str | os.PathLike[str], chunk_size: int = 256,
                  cache: str | os.PathLike[str] | None = None, ray: str | None = None, workers: int = 2,
                  cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                  engine: Engine | str | None = None, progress: Progress = no_progress,
                  task: str = "screen") -> Scored:
    """Score every chunk not yet in the run folder, then gather all rows (sorted by index) and rejects.
    `engine` writes full mode's base answers (fast mode generates nothing)."""
    generates = not settings.fast
    if generates and ray is not None and engine_record(engine)["name"] != "hf":
        raise EngineError(f"--ray scores on each worker's own Hugging Face model; the {engine_record(engine)['name']} "
                          "engine runs in this process: drop --ray, or use --fast, or --engine hf")
    source = open_source(data, chunk_size)
    layer_of = {t: settings.layer if settings.layer is not None else v.layer for t, v in vectors.items()}
    run_settings = {"input_sha256": source.sha256, "format": source.format, "chunk_size": chunk_size,
                    "model": model.model_id, "fingerprint": model.fingerprint, "dtype": str(model.dtype),
                    "vectors": {t: v.digest() for t, v in vectors.items()}, "layers": layer_of,
                    **{k: v for k, v in asdict(settings).items() if k != "layer"},
                    **(engine_settings(engine) if generates else {})}
    folder = open_run(Path(run_dir), "screen", run_settings)
    chunks_path = folder / CHUNKS_FILE
    done = {int(r["chunk"]) for r in _records(chunks_path)}
    cache_path = str(cache) if cache is not None else str(cache_root() / "base-answers.sqlite")
    finished = sum(ref.count for ref in source.chunks if ref.chunk in done)
    progress(task, finished, source.n_rows)
    todo = [ref for ref in source.chunks if ref.chunk not in done]
    if ray is None:
        answer_cache = AnswerCache(cache_path)
        try:
            for ref, items in iter_chunks(source, skip=done):
                rows, rejects = score_chunk(model, vectors, items, settings, answer_cache, engine=engine)
                append_jsonl(chunks_path, [{"chunk": ref.chunk, "count": ref.count, "rows": rows,
                                            "rejects": [r.as_dict() for r in rejects]}])
                finished += ref.count
                progress(task, finished, source.n_rows)
        finally:
            answer_cache.close()
    else:
        from .screening.ray_backend import score_on_ray

        spec = model.source if not Path(model.source).exists() else str(Path(model.source).resolve())
        for record in score_on_ray(source, todo, address=ray, workers=workers, cpus_per_worker=cpus_per_worker,
                                   gpus_per_worker=gpus_per_worker, model_spec=spec,
                                   dtype=str(model.dtype).removeprefix("torch."),
                                   layers_path=model.layers_path, fingerprint=model.fingerprint,
                                   vectors=vectors, settings=settings, cache_path=cache_path):
            append_jsonl(chunks_path, [record])
            finished += int(record["count"])
            progress(task, finished, source.n_rows)
    return _gather(source, chunks_path, list(vectors))


def _gather(source: Source, chunks_path: Path, traits: list[str]) -> Scored:
    seen: set[int] = set()
    index: list[int] = []
    ids: list[str | None] = []
    cols: dict[str, list[float]] = {}
    rejects: list[dict[str, Any]] = []
    names = ["prompt_tokens", "answer_tokens", "base_tokens"] + [
        f"{t}_{c}" for t in traits for c in ("delta_p", "answer_proj", "base_proj")]
    for record in _records(chunks_path):
        if record["chunk"] in seen:
            continue
        seen.add(record["chunk"])
        rejects += record["rejects"]
        for row in record["rows"]:
            index.append(row["index"])
            ids.append(row["id"])
            for name in names:
                cols.setdefault(name, []).append(row[name])
    order = np.argsort(np.array(index, dtype=np.int64), kind="stable")
    rejects.sort(key=lambda r: r["index"])
    return Scored(source=source, index=np.array(index, dtype=np.int64)[order], ids=[ids[i] for i in order],
                  columns={n: np.array(cols.get(n, []), dtype=np.float64)[order] for n in names},
                  rejects=rejects)


def _thresholds(threshold: float | Mapping[str, float] | None, traits: list[str]) -> dict[str, float | None]:
    if threshold is None:
        return dict.fromkeys(traits)
    if isinstance(threshold, Mapping):
        unknown = sorted(set(threshold) - set(traits))
        if unknown:
            raise DatasetError(f"threshold given for unknown trait(s) {', '.join(unknown)}; traits: {', '.join(traits)}")
        return {t: (float(threshold[t]) if t in threshold else None) for t in traits}
    return dict.fromkeys(traits, float(threshold))


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
    named = _named(vectors)
    for v in named.values():
        v.check_model(model, allow_mismatch)
    data_p, out_p = Path(data), Path(out)
    for p, what in ((out_p, "--out"), (Path(filtered_out) if filtered_out else None, "--filtered-out")):
        if p is not None and data_p.exists() and p.exists() and p.resolve() == data_p.resolve():
            raise DatasetError(f"{what} is the input file; screening never overwrites its input, name a new file")
    if threshold is not None and calibrate is not None:
        raise DatasetError("give either a threshold or a calibration dataset, not both")
    if filtered_out is not None and threshold is None and calibrate is None:
        raise DatasetError("a filtered copy needs flags: pass --threshold or --calibrate REF --percentile P")
    if filtered_out is not None and format_of(filtered_out) != format_of(data):
        raise DatasetError(f"the filtered copy must have the input's format ({format_of(data)}); "
                           f"name it with a {'.parquet' if format_of(data) == 'parquet' else '.jsonl'} suffix")
    if not 0 < percentile < 100:
        raise DatasetError(f"percentile must lie strictly between 0 and 100, got {percentile}")
    if max_new_tokens < 1 or batch_size < 1:
        raise DatasetError("max_new_tokens and batch_size must be at least 1")
    settings = ScoreSettings(fast=fast, max_new_tokens=max_new_tokens, layer=layer, batch_size=batch_size)
    folder = Path(run_dir) if run_dir is not None else out_p.with_name(out_p.name + ".run")
    common: dict[str, Any] = {"settings": settings, "chunk_size": chunk_size, "cache": cache, "ray": ray,
                              "workers": workers, "cpus_per_worker": cpus_per_worker,
                              "gpus_per_worker": gpus_per_worker, "progress": progress}
    with engine_scope(model, engine) as eng:
        scored = score_dataset(model, data, named, run_dir=folder, engine=eng, **common, task="screen")
        reference = (score_dataset(model, calibrate, named, run_dir=folder / "reference", engine=eng, **common,
                                   task="calibrate") if calibrate is not None else None)
    traits = list(named)
    thresholds = _thresholds(threshold, traits)
    source_of_threshold = "given" if threshold is not None else None
    if reference is not None:
        if len(reference.index) == 0:
            raise DatasetError(f"the calibration dataset '{calibrate}' has no valid samples; see its rejects")
        thresholds = {t: percentile_threshold(reference.columns[f"{t}_delta_p"], percentile) for t in traits}
        source_of_threshold = f"percentile {percentile:g} of {len(reference.index)} reference samples ({calibrate})"
    rejects_p, summary_p, stem = _out_paths(out_p)
    write_text(rejects_p, "".join(json.dumps(r, sort_keys=True) + "\n" for r in scored.rejects))
    n = len(scored.index)
    if n == 0:
        raise DatasetError(f"no valid samples in '{data}' ({len(scored.rejects)} rejected); see {rejects_p}")
    table: dict[str, Any] = {"index": scored.index, "id": scored.ids}
    flagged_any = np.zeros(n, dtype=bool)
    summary_traits: dict[str, Any] = {}
    for t in traits:
        dp = scored.columns[f"{t}_delta_p"]
        thr = thresholds[t]
        flags = dp > thr if thr is not None else np.zeros(n, dtype=bool)
        flagged_any |= flags
        table[f"{t}_delta_p"] = dp
        table[f"{t}_rank"] = ranks(dp)
        table[f"{t}_flagged"] = flags
        table[f"{t}_answer_proj"] = scored.columns[f"{t}_answer_proj"]
        table[f"{t}_base_proj"] = scored.columns[f"{t}_base_proj"]
        summary_traits[t] = {"layer": layer if layer is not None else named[t].layer, "delta_p": mean_ci(dp),
                             "threshold": thr, "threshold_source": source_of_threshold if thr is not None else None,
                             "n_flagged": int(flags.sum())}
    for c in ("prompt_tokens", "answer_tokens", "base_tokens"):
        table[c] = scored.columns[c].astype(np.int64)
    _write_table(out_p, table)
    reasons = Counter(r["reason"].split(":")[0] for r in scored.rejects)
    summary: dict[str, Any] = {
        "input": str(data), "input_sha256": scored.source.sha256, "rows": scored.source.n_rows, "scored": n,
        "rejected": len(scored.rejects), "reject_reasons": dict(reasons), "flagged_any": int(flagged_any.sum()),
        "mode": "fast (last prompt token)" if fast else "full (base model's own answer)",
        "model": model.model_id, "max_new_tokens": None if fast else max_new_tokens,
        "engine": None if fast else engine_record(engine), "traits": summary_traits,
        "scores": str(out_p), "rejects_file": str(rejects_p), "run_dir": str(folder)}
    result = ScreenResult(scores=out_p, rejects=rejects_p, summary_path=summary_p, summary=summary)
    if histograms:
        for t in traits:
            ref_values = reference.columns[f"{t}_delta_p"] if reference is not None else None
            result.histograms.append(_histogram(stem.with_name(f"{stem.name}.{t}.png"), t,
                                                scored.columns[f"{t}_delta_p"], thresholds[t], ref_values, fast))
        summary["histograms"] = [str(p) for p in result.histograms]
    if filtered_out is not None:
        keep = np.zeros(scored.source.n_rows, dtype=bool)
        keep[scored.index[~flagged_any]] = True
        kept = write_filtered(scored.source, keep, filtered_out)
        result.filtered = Path(filtered_out)
        summary["filtered"] = {"path": str(filtered_out), "rows": kept,
                               "dropped_flagged": int(flagged_any.sum()), "dropped_rejected": len(scored.rejects)}
    write_json(summary_p, summary)
    return result


def _write_table(path: Path, table: dict[str, Any]) -> None:
    import pyarrow as pa

    arrow = pa.table({k: pa.array(v, type=pa.string()) if k == "id" else pa.array(v) for k, v in table.items()})
    with atomic_path(path) as tmp:
        if format_of(path) == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(arrow, str(tmp))
        else:
            import pyarrow.csv as pacsv

            pacsv.write_csv(arrow, str(tmp))


def _histogram(path: Path, trait: str, values: np.ndarray, threshold: float | None,
               reference: np.ndarray | None, fast: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    both = values if reference is None else np.concatenate([values, reference])
    bins = np.histogram_bin_edges(both, bins=min(60, max(10, int(np.sqrt(len(both)))))).tolist()
    ax.hist(values, bins=bins, alpha=0.7, label=f"dataset (n={len(values)})")
    if reference is not None:
        ax.hist(reference, bins=bins, alpha=0.5, label=f"reference (n={len(reference)})")
    ax.axvline(float(np.mean(values)), color="k", linestyle="--", label=f"mean {np.mean(values):.3g}")
    if threshold is not None:
        ax.axvline(threshold, color="r", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(f"{trait} ΔP ({'answer − last prompt token' if fast else 'answer − base answer'})")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
