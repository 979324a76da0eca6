"""A dataset scored chunk by chunk into a run folder: resumable (finished chunks are appended and never
redone), locally or on Ray, then gathered back into columns sorted by input index."""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator, Mapping
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engines import EngineError, engine_record
from ..engines import run_settings as engine_settings
from ..errors import RunError
from ..io import append_jsonl, iter_jsonl
from ..models import cache_root
from ..progress import Progress, no_progress
from ..runs import open_run
from .score import AnswerCache, ScoreSettings, score_chunk
from .source import ChunkRef, Source, iter_chunks, open_source

log = logging.getLogger("personavec")

if TYPE_CHECKING:
    from ..engines import Engine
    from ..models import Model
    from ..vectors import PersonaVector

__all__ = ["CHUNKS_FILE", "Scored", "score_dataset"]

CHUNKS_FILE = "chunks.jsonl"


@dataclass
class Scored:
    """All scored rows of a dataset, sorted by input index, and its rejects."""

    source: Source
    index: np.ndarray
    ids: list[str | None]
    columns: dict[str, np.ndarray]
    rejects: list[dict[str, Any]]


@dataclass(frozen=True)
class RayOptions:
    """Which Ray cluster scores, and with how many workers of what size."""

    address: str
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """Chunk records of a run, streamed; a torn line (interrupted append) is skipped: its chunk is pending."""
    return (r for r in iter_jsonl(path) if r is not None)


def _done_chunks(path: Path) -> set[int]:
    """The chunks a run folder has finished, warning when an interrupted append tore a record (its chunk is
    scored again)."""
    done, torn = set(), 0
    for record in iter_jsonl(path):
        if record is None:
            torn += 1
        else:
            done.add(int(record["chunk"]))
    if torn:
        log.warning("%s: %d torn chunk record(s) left by an interrupted run ignored; their rows are scored again",
                    path, torn)
    return done


def _run_settings(model: Model, source: Source, vectors: Mapping[str, PersonaVector], settings: ScoreSettings,
                  chunk_size: int, engine: Engine | str | None) -> dict[str, Any]:
    """What the run folder's results depend on: a rerun with other settings is refused, not mixed in."""
    layer_of = {t: settings.layer if settings.layer is not None else v.layer for t, v in vectors.items()}
    return {"input_sha256": source.sha256, "format": source.format, "chunk_size": chunk_size,
            "model": model.model_id, "fingerprint": model.fingerprint, "dtype": str(model.dtype),
            "vectors": {t: v.digest() for t, v in vectors.items()}, "layers": layer_of,
            **{k: v for k, v in asdict(settings).items() if k != "layer"},
            **(engine_settings(engine) if not settings.fast else {})}


def score_dataset(model: Model, data: str | os.PathLike[str], vectors: Mapping[str, PersonaVector], *,
                  settings: ScoreSettings, run_dir: str | os.PathLike[str], chunk_size: int = 256,
                  cache: str | os.PathLike[str] | None = None, ray: str | None = None, workers: int = 2,
                  cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                  engine: Engine | str | None = None, progress: Progress = no_progress,
                  task: str = "screen") -> Scored:
    """Score every chunk not yet in the run folder, then gather all rows (sorted by index) and rejects.
    `engine` writes full mode's base answers (fast mode generates nothing)."""
    if not settings.fast and ray is not None and engine_record(engine)["name"] != "hf":
        raise EngineError(f"--ray scores on each worker's own Hugging Face model; the {engine_record(engine)['name']} "
                          "engine runs in this process: drop --ray, or use --fast, or --engine hf")
    source = open_source(data, chunk_size)
    folder = open_run(Path(run_dir), "screen", _run_settings(model, source, vectors, settings, chunk_size, engine))
    chunks_path = folder / CHUNKS_FILE
    done = _done_chunks(chunks_path)
    cache_path = str(cache) if cache is not None else str(cache_root() / "base-answers.sqlite")
    finished = sum(ref.count for ref in source.chunks if ref.chunk in done)
    progress(task, finished, source.n_rows)
    if ray is None:
        records = _score_here(model, vectors, source, done, settings, cache_path, engine)
    else:
        todo = [ref for ref in source.chunks if ref.chunk not in done]
        records = _score_on_ray(model, vectors, source, todo, settings, cache_path,
                                RayOptions(ray, workers, cpus_per_worker, gpus_per_worker))
    with closing(records):  # the answer cache closes even when an append fails
        for record in records:
            append_jsonl(chunks_path, [record])
            finished += int(record["count"])
            progress(task, finished, source.n_rows)
    return _gather(source, chunks_path, list(vectors))


def _score_here(model: Model, vectors: Mapping[str, PersonaVector], source: Source, done: set[int],
                settings: ScoreSettings, cache_path: str,
                engine: Engine | str | None) -> Generator[dict[str, Any], None, None]:
    """The pending chunks' records, scored in this process (each yielded before the next is scored)."""
    answer_cache = AnswerCache(cache_path)
    try:
        for ref, items in iter_chunks(source, skip=done):
            rows, rejects = score_chunk(model, vectors, items, settings, answer_cache, engine=engine)
            yield {"chunk": ref.chunk, "count": ref.count, "rows": rows, "rejects": [r.as_dict() for r in rejects]}
    finally:
        answer_cache.close()


def _score_on_ray(model: Model, vectors: Mapping[str, PersonaVector], source: Source, todo: list[ChunkRef],
                  settings: ScoreSettings, cache_path: str,
                  opts: RayOptions) -> Generator[dict[str, Any], None, None]:
    """The pending chunks' records, scored by Ray workers that each load the model themselves."""
    from .ray_backend import score_on_ray

    spec = model.source if not Path(model.source).exists() else str(Path(model.source).resolve())
    yield from score_on_ray(source, todo, address=opts.address, workers=opts.workers,
                            cpus_per_worker=opts.cpus_per_worker, gpus_per_worker=opts.gpus_per_worker,
                            model_spec=spec, dtype=str(model.dtype).removeprefix("torch."),
                            layers_path=model.layers_path, fingerprint=model.fingerprint, vectors=vectors,
                            settings=settings, cache_path=cache_path)


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
    missing = sorted({ref.chunk for ref in source.chunks} - seen)
    if missing or len(index) + len(rejects) != source.n_rows:  # never report a partial run as complete
        raise RunError(f"the run folder's records {chunks_path} hold {len(index) + len(rejects)} of {source.n_rows} "
                       f"rows (chunks missing: {missing[:5]}); rerun the same command to score them, or remove "
                       "the run folder to start over")
    order = np.argsort(np.array(index, dtype=np.int64), kind="stable")
    rejects.sort(key=lambda r: r["index"])
    return Scored(source=source, index=np.array(index, dtype=np.int64)[order], ids=[ids[i] for i in order],
                  columns={n: np.array(cols.get(n, []), dtype=np.float64)[order] for n in names},
                  rejects=rejects)
