"""Scoring chunks on Ray Data: a pool of actors, each loading the model once, scores chunk descriptors.

Each actor reads its chunks from the input itself (so the input must be on storage every worker sees: a
local file for `ray local`, a shared filesystem on a cluster) and runs the same `score_chunk` on the same
chunk boundaries as the single process, so the results agree. The driver only receives finished chunk
records, appends them to the run folder as they stream in (an interrupted Ray run resumes too), and never
holds the dataset."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PersonavecError
from .score import AnswerCache, ScoreSettings, score_chunk
from .source import ChunkRef, Source, read_chunk

if TYPE_CHECKING:
    from ..vectors import PersonaVector


class ChunkScorer:
    """Ray Data callable class: the constructor runs once per actor (loads the model), the call scores a
    batch of chunk descriptors and returns one JSON record per chunk."""

    def __init__(self, source: Source, model_spec: str, dtype: str, layers_path: str | None, fingerprint: str,
                 vectors: Mapping[str, PersonaVector], settings: ScoreSettings, cache_path: str | None,
                 threads: int, device: str) -> None:
        import torch

        from ..models import load_model

        torch.set_num_threads(max(1, threads))
        self.model = load_model(model_spec, device=device, dtype=dtype, layers_path=layers_path)
        if self.model.fingerprint != fingerprint:
            raise RuntimeError(f"worker loaded {model_spec} with weights {self.model.fingerprint}, but the driver's "
                               f"model has {fingerprint}; make the same model available on every worker")
        self.source, self.vectors, self.settings = source, dict(vectors), settings
        self.cache = AnswerCache(cache_path) if cache_path else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks, records = [], []
        for k in range(len(batch["chunk"])):
            ref = ChunkRef(int(batch["chunk"][k]), int(batch["start"][k]), int(batch["count"][k]),
                           int(batch["offset"][k]))
            rows, rejects = score_chunk(self.model, self.vectors, read_chunk(self.source, ref), self.settings,
                                        self.cache)
            chunks.append(ref.chunk)
            records.append(json.dumps({"chunk": ref.chunk, "count": ref.count, "rows": rows,
                                       "rejects": [r.as_dict() for r in rejects]}))
        return {"chunk": np.array(chunks, dtype=np.int64), "record": np.array(records, dtype=object)}


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when a plain HOST:PORT address has nothing listening (ray.init keeps
    retrying the connection for a long time)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PersonavecError(f"no Ray cluster answers at '{address}' ({exc.strerror or exc}); start its head with "
                              "`ray start --head` or check the address") from exc


def score_on_ray(source: Source, todo: list[ChunkRef], *, address: str, workers: int, cpus_per_worker: float,
                 gpus_per_worker: float, model_spec: str, dtype: str, layers_path: str | None, fingerprint: str,
                 vectors: Mapping[str, PersonaVector], settings: ScoreSettings,
                 cache_path: str | None) -> Iterator[dict[str, Any]]:
    """Yield chunk records ({"chunk", "count", "rows", "rejects"}) as the actors finish them.

    `address` "local" starts a private Ray instance sized for the workers (and shuts it down after);
    anything else is passed to `ray.init(address=...)` (e.g. "auto" or "ray://head:10001")."""
    import ray
    import ray.data

    if not todo:
        return
    started = False
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(1, math.ceil(workers * cpus_per_worker)),
                     num_gpus=math.ceil(workers * gpus_per_worker) if gpus_per_worker else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            _probe(address)
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError) as exc:
                reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
                raise PersonavecError(
                    f"cannot join the Ray cluster at '{address}' ({reason}); check the address (on a cluster node, "
                    "--ray auto joins the local cluster) and, if the cluster uses token authentication, set "
                    "RAY_AUTH_MODE=token with its token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from exc
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        items = [asdict(ref) for ref in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ChunkScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs={"source": source, "model_spec": model_spec, "dtype": dtype,
                                   "layers_path": layers_path, "fingerprint": fingerprint, "vectors": dict(vectors),
                                   "settings": settings, "cache_path": cache_path,
                                   "threads": max(1, int(cpus_per_worker)),
                                   "device": "cuda" if gpus_per_worker else "cpu"})
        for row in ds.iter_rows():
            yield json.loads(row["record"])
    finally:
        if started:
            ray.shutdown()
