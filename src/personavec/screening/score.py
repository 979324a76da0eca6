"""Projection difference of one chunk of conversations on one model.

ΔP = proj(dataset answer) − proj(reference), both at the vector's layer on its unit direction:
  * full mode: the reference is the base model's own greedy answer to the same prompt (response-token
    means of both answers), as in the paper; base answers are cached on disk by prompt hash;
  * fast mode: the reference is the last prompt token's projection (no generation), the paper's cheap
    approximation: it predicts where the model's own answer would go."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..capture import Sample
from ..chat import encode_chat, encode_response
from ..generation import generate_ids
from ..io import sha256_bytes
from ..models import text_config
from ..progress import Progress, no_progress
from ..projection import project
from .rows import Parsed, Reject

if TYPE_CHECKING:
    from ..engines import Engine
    from ..models import Model
    from ..vectors import PersonaVector


@dataclass(frozen=True)
class ScoreSettings:
    """What changes a score (and so belongs in a run's settings hash)."""

    fast: bool = False
    max_new_tokens: int = 64
    layer: int | None = None  # None: each vector's own (sweep-chosen) layer
    batch_size: int = 16
    max_tokens: int = 16384


class AnswerCache:
    """Base-model answers (token ids) keyed by model weights, answer budget and prompt ids, in sqlite:
    atomic, shareable by the processes of one machine (Ray actors), and reused by any later screen."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @staticmethod
    def key(fingerprint: str, max_new_tokens: int, prompt: list[int], engine: str = "hf") -> str:
        """An engine other than hf is part of the key (its greedy answers may differ by kernel rounding);
        hf keys stay what they were before engines existed, so existing caches are reused."""
        parts: list[Any] = [fingerprint, max_new_tokens, prompt] + ([] if engine == "hf" else [engine])
        return sha256_bytes(json.dumps(parts).encode())

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=120, check_same_thread=False)
            with contextlib.suppress(sqlite3.DatabaseError):  # e.g. a network filesystem without shm
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, ids TEXT)")
            conn.commit()
            self._conn = conn
        return self._conn

    def get_many(self, keys: list[str]) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        with self._lock:
            conn = self._connect()
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                marks = ",".join("?" * len(part))
                for k, ids in conn.execute(f"SELECT key, ids FROM answers WHERE key IN ({marks})", part):
                    found[k] = json.loads(ids)
        return found

    def put_many(self, items: Mapping[str, list[int]]) -> None:
        with self._lock:
            conn = self._connect()
            conn.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in items.items()])
            conn.commit()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def model_context(model: Model) -> int | None:
    """The longest sequence the model takes (its position-embedding size), if it says."""
    n = getattr(text_config(model.hf.config), "max_position_embeddings", None)
    return int(n) if n else None


def _encode(model: Model, item: Parsed, settings: ScoreSettings, context: int | None) -> Sample | Reject:
    from jinja2.exceptions import TemplateError

    try:
        prompt = encode_chat(model.tokenizer, item.prompt)
    except (TemplateError, ValueError, TypeError) as exc:
        return Reject(item.index, f"the model's chat template rejects this conversation: {str(exc)[:120]}")
    response = encode_response(model.tokenizer, item.answer)
    if context is not None:
        need = len(prompt) + (len(response) if settings.fast else max(len(response), settings.max_new_tokens))
        if need > context:
            return Reject(item.index, f"prompt of {len(prompt)} tokens plus answer ({len(response)} tokens"
                          + ("" if settings.fast else f", base answer up to {settings.max_new_tokens}")
                          + f") exceeds the model's context of {context} tokens")
    return Sample(prompt=prompt, response=response)


def score_chunk(model: Model, vectors: Mapping[str, PersonaVector], items: list[Parsed | Reject],
                settings: ScoreSettings, cache: AnswerCache | None = None, progress: Progress = no_progress,
                engine: Engine | str | None = None) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Score the valid rows of a chunk: (rows in input order, rejects). A row holds `index`, `id`,
    `prompt_tokens`, `answer_tokens` and per trait `<t>_delta_p`, `<t>_answer_proj`, `<t>_base_proj`.
    `engine` ("hf", "vllm" or an engine object) writes full mode's base answers."""
    context = model_context(model)
    rejects = [it for it in items if isinstance(it, Reject)]
    valid: list[Parsed] = []
    samples: list[Sample] = []
    for it in items:
        if isinstance(it, Parsed):
            enc = _encode(model, it, settings, context)
            if isinstance(enc, Reject):
                rejects.append(enc)
            else:
                valid.append(it)
                samples.append(enc)
    if not valid:
        return [], sorted(rejects, key=lambda r: r.index)
    layers = settings.layer
    if settings.fast:
        proj = project(model, samples, vectors, layers=layers, positions=("last_prompt", "response"),
                       batch_size=settings.batch_size, max_tokens=settings.max_tokens, progress=progress,
                       task="project")
        answer = {t: proj[t]["response"] for t in vectors}
        base = {t: proj[t]["last_prompt"] for t in vectors}
        base_len = [0] * len(valid)
    else:
        base_ids = _base_answers(model, [s.prompt for s in samples], settings, cache, progress, engine)
        keep = [k for k, ids in enumerate(base_ids) if ids]
        rejects += [Reject(valid[k].index, "the base model's own answer is empty (nothing to compare with)")
                    for k, ids in enumerate(base_ids) if not ids]
        valid = [valid[k] for k in keep]
        samples = [samples[k] for k in keep]
        base_len = [len(base_ids[k]) for k in keep]
        if not valid:
            return [], sorted(rejects, key=lambda r: r.index)
        both = samples + [Sample(prompt=s.prompt, response=base_ids[k]) for s, k in zip(samples, keep, strict=True)]
        proj = project(model, both, vectors, layers=layers, positions=("response",),
                       batch_size=settings.batch_size, max_tokens=settings.max_tokens, progress=progress,
                       task="project")
        n = len(samples)
        answer = {t: proj[t]["response"][:n] for t in vectors}
        base = {t: proj[t]["response"][n:] for t in vectors}
    rows = []
    for k, it in enumerate(valid):
        row: dict[str, Any] = {"index": it.index, "id": it.id, "prompt_tokens": len(samples[k].prompt),
                               "answer_tokens": len(samples[k].response), "base_tokens": base_len[k]}
        for t in vectors:
            a, b = float(answer[t][k]), float(base[t][k])
            row[f"{t}_delta_p"] = a - b
            row[f"{t}_answer_proj"] = a
            row[f"{t}_base_proj"] = b
        rows.append(row)
    return rows, sorted(rejects, key=lambda r: r.index)


def _base_answers(model: Model, prompts: list[list[int]], settings: ScoreSettings, cache: AnswerCache | None,
                  progress: Progress, engine: Engine | str | None) -> list[list[int]]:
    """The base model's greedy answers (token ids, no end token), from the cache where present."""
    from ..engines import engine_record

    name = engine_record(engine)["name"]
    keys = [AnswerCache.key(model.fingerprint, settings.max_new_tokens, p, name) for p in prompts]
    found = cache.get_many(keys) if cache is not None else {}
    todo: dict[str, list[int]] = {}
    for key, p in zip(keys, prompts, strict=True):
        if key not in found:
            todo.setdefault(key, p)
    if todo:
        new = generate_ids(model, list(todo.values()), max_new_tokens=settings.max_new_tokens, temperature=0.0,
                           batch_size=settings.batch_size, progress=progress, task="base answers", engine=engine)
        made = dict(zip(todo, new, strict=True))
        if cache is not None:
            cache.put_many(made)
        found.update(made)
    return [found[k] for k in keys]
