"""The run folder's one manifest: the settings, the model's fingerprint and the versions (written once by
`personavec.runs.open_run`, which refuses a folder made with other settings), plus each stage's status and
timing, rewritten atomically whenever a stage starts, ends or fails. A stage marked done is never redone."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io import write_json
from ..runs import open_run
from .settings import ReproduceSettings, as_dict

KIND = "reproduce"
MANIFEST = "manifest.json"
DONE, RUNNING, FAILED, SKIPPED, PENDING = "done", "running", "failed", "skipped", "pending"


@dataclass(frozen=True)
class StageRecord:
    status: str = PENDING
    attempts: int = 0  # times the stage was started (a resumed stage counts again)
    started: float | None = None  # unix time of the last start
    finished: float | None = None
    seconds: float | None = None  # wall time of the attempt that finished it
    reason: str = ""  # why a stage was skipped or failed


def open_folder(out: str | Path, settings: ReproduceSettings, model_id: str, fingerprint: str,
                stages: list[str]) -> Path:
    """Create or reopen the run folder; the stage table starts with every stage pending."""
    folder = open_run(out, KIND, {"settings": as_dict(settings), "model_id": model_id, "fingerprint": fingerprint},
                      option="--out")
    manifest = read(folder)
    table = manifest.setdefault("stages", {})
    for name in stages:
        table.setdefault(name, asdict(StageRecord()))
    manifest["model"] = {"id": model_id, "fingerprint": fingerprint}
    write_json(folder / MANIFEST, manifest)
    return folder


def read(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / MANIFEST).read_text(encoding="utf-8")))


def stage(folder: Path, name: str) -> StageRecord:
    return StageRecord(**read(folder).get("stages", {}).get(name, {}))


def update(folder: Path, name: str, **changes: Any) -> StageRecord:
    """Rewrite one stage's record (atomically) and return it."""
    manifest = read(folder)
    table = manifest.setdefault("stages", {})
    record = StageRecord(**{**table.get(name, {}), **changes})
    table[name] = asdict(record)
    write_json(folder / MANIFEST, manifest)
    return record


def start(folder: Path, name: str) -> float:
    now = time.time()
    update(folder, name, status=RUNNING, attempts=stage(folder, name).attempts + 1, started=now, finished=None,
           seconds=None, reason="")
    return now


def finish(folder: Path, name: str, started: float, status: str = DONE, reason: str = "") -> StageRecord:
    now = time.time()
    return update(folder, name, status=status, finished=now, seconds=round(now - started, 2), reason=reason)
