"""Run folders: a manifest of inputs and versions, append-only JSONL records, and the rule that a run
folder resumes only the run it was made for. `Records` + `pending_chunks` + `chunk_seed` are the one
resumable record loop every pipeline uses: plan the work as keyed items, skip the keys already stored, do the
rest a chunk at a time with a seed that depends only on the chunk's place in the plan, and append each
finished chunk before the next starts."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import RunError
from .io import JsonlRows, append_jsonl, load_jsonl, write_json

log = logging.getLogger("personavec")

T = TypeVar("T")

#: A prime stride between the seeds of consecutive chunks (seed + 7919 × position).
SEED_STRIDE = 7919


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"personavec": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(new: Any, old: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two settings structures differ (nested dicts compared key by key)."""
    if isinstance(new, dict) and isinstance(old, dict):
        return [d for k in sorted(set(new) | set(old), key=str)
                for d in _differences(new.get(k), old.get(k), f"{prefix}{k}.")]
    return [] if new == old else [prefix.rstrip(".")]


def open_run(run_dir: str | Path, kind: str, settings: dict[str, Any], option: str = "--run-dir") -> Path:
    """Create or reopen a run folder. Reopening with different settings is refused: results would mix.
    `option` is the command-line option that names the folder, for the one-line error."""
    folder = Path(run_dir)
    manifest = folder / "manifest.json"
    key = settings_hash(settings)
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{manifest} is corrupt; remove the run folder {folder} to start over") from None
        if old.get("kind") != kind or old.get("settings_hash") != key:
            changed = _differences(settings, old.get("settings", {}))
            raise RunError(f"run folder {folder} belongs to another {old.get('kind', 'run')} "
                           f"(differs in: {', '.join(changed[:6]) or 'kind'}); use another {option} or the same "
                           "settings")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"kind": kind, "settings": settings, "settings_hash": key, "versions": versions(),
                          "command": sys.argv})
    return folder


class Records:
    """JSONL records keyed by one field (default 'key'), read back from `path` when it exists; in memory
    only when `path` is None. `add` appends to the file before remembering, so an interrupted run keeps
    every finished chunk and no more; `torn` counts the lines an interrupted append cut (warned about once,
    their keys are pending again)."""

    def __init__(self, path: Path | None, key: str = "key") -> None:
        self.path = path
        self.key = key
        loaded = load_jsonl(path) if path else JsonlRows([])
        self.rows: dict[str, dict[str, Any]] = {r[key]: r for r in loaded.rows}
        self.torn = loaded.torn  # lines cut by an interrupted append: their rows are absent, so recomputed
        if self.torn:
            log.warning("%s: %d torn record line(s) left by an interrupted run ignored; their rows are recomputed",
                        path, self.torn)

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.rows[key]

    def add(self, rows: list[dict[str, Any]]) -> None:
        if self.path:
            append_jsonl(self.path, rows)
        self.rows.update({r[self.key]: r for r in rows})


def _key(item: Any) -> str:
    return str(item.key)


def pending_chunks(plan: Sequence[T], done: Records, size: int,
                   key: Callable[[T], str] = _key) -> Iterator[tuple[int, list[T]]]:
    """The plan's items whose key is not in `done`, `size` at a time, each chunk with its position: how
    many plan items precede it once every earlier chunk is done (finished items first, then the earlier
    pending chunks). A rerun after an interruption therefore gives the next chunk the position, and with
    `chunk_seed` the seed, that it had in the interrupted run."""
    todo = [item for item in plan if key(item) not in done]
    base = len(plan) - len(todo)
    step = max(size, 1)
    for start in range(0, len(todo), step):
        yield base + start, todo[start:start + step]


def chunk_seed(seed: int, position: int) -> int:
    """The sampling seed of the chunk at `position` in the plan (see `pending_chunks`)."""
    return seed + SEED_STRIDE * position
