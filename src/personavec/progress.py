"""Progress reporting without printing: the library calls a callback, the caller draws bars."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Called as work advances: `task` names the stage, `done` of `total` units are finished."""

    def __call__(self, task: str, done: int, total: int) -> None: ...


def no_progress(task: str, done: int, total: int) -> None:
    """The default callback: report nothing."""
