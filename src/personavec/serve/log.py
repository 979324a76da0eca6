"""Append-only JSONL log of monitored requests.

One line per finished request: ids, timings, token counts, steering and the persona readings. The text
of prompts and completions is left out unless the operator opts in (`log_prompts`): monitoring a live
system should not quietly become a transcript store."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import append_jsonl

if TYPE_CHECKING:
    from .schemas import RequestBase

TEXT_FIELDS = ("messages", "prompt", "completion")


class RequestLog:
    def __init__(self, path: str | Path | None, log_prompts: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()  # fail at start, not at the first request, if the place is not writable

    def write(self, row: dict[str, Any]) -> None:
        """Append `row`; its text fields are dropped unless prompt logging is on."""
        if self.path is None:
            return
        kept = row if self.log_prompts else {k: v for k, v in row.items() if k not in TEXT_FIELDS}
        with self._lock:
            append_jsonl(self.path, [kept])


def log_fields(cid: str, req: RequestBase, **more: Any) -> dict[str, Any]:
    """The fields a request's log row starts with (the engine adds timings, tokens, steering, persona)."""
    return {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "id": cid,
            "model": req.model, "stream": req.stream, **more}
