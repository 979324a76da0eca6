"""Run folders: a manifest of inputs and versions, append-only JSONL records, and the rule that a run
folder resumes only the run it was made for."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

from .errors import RunError
from .io import write_json


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"personavec": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_run(run_dir: str | Path, kind: str, settings: dict[str, Any]) -> Path:
    """Create or reopen a run folder. Reopening with different settings is refused: results would mix."""
    folder = Path(run_dir)
    manifest = folder / "manifest.json"
    key = settings_hash(settings)
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{manifest} is corrupt; remove the run folder {folder} to start over") from None
        if old.get("kind") != kind or old.get("settings_hash") != key:
            changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                             if settings.get(k) != old.get("settings", {}).get(k))
            raise RunError(f"run folder {folder} belongs to another {old.get('kind', 'run')} "
                           f"(differs in: {', '.join(changed) or 'kind'}); use another --run-dir or the same settings")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"kind": kind, "settings": settings, "settings_hash": key, "versions": versions(),
                          "command": sys.argv})
    return folder
