"""Which Trainer checkpoint a rerun resumes from: the newest *complete* one. A run killed while saving leaves
checkpoint-N/ without its trainer_state.json (the Trainer writes it last) or with a torn one; resuming from it
would crash, so it is passed over (and named) in favour of the previous checkpoint."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: Files every checkpoint of a LoRA run holds besides trainer_state.json (plus one rng_state*.pth per process).
_REQUIRED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


@dataclass(frozen=True)
class Resume:
    """The checkpoint to resume from (None: start afresh) and the newer, incomplete ones passed over."""

    checkpoint: str | None
    skipped: list[str] = field(default_factory=list)


def incomplete(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "a torn trainer_state.json"
    missing = [f for f in _REQUIRED if not (folder / f).is_file() or (folder / f).stat().st_size == 0]
    if not any(folder.glob("rng_state*.pth")):
        missing.append("rng_state*.pth")
    return f"missing {', '.join(missing)}" if missing else None


def last_complete_checkpoint(run: Path) -> Resume:
    """The newest complete checkpoint-N in `run`, with the incomplete newer ones it passed over."""
    if not run.is_dir():
        return Resume(None)
    found = sorted(((int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
                   reverse=True)
    skipped: list[str] = []
    for _, path in found:
        why = incomplete(path)
        if why is None:
            return Resume(str(path), skipped)
        skipped.append(f"{path.name} ({why})")
    return Resume(None, skipped)
