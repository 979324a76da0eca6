"""What every stage function receives: the model, the settings, the run folder, the loaded traits, the
progress callback and the results of the stages before it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..progress import Progress, no_progress

if TYPE_CHECKING:
    from ..models import Model
    from ..traits import LoadedTrait
    from .settings import ReproduceSettings


@dataclass(frozen=True)
class NotRun:
    """A stage that produced no result, and why (status 'skipped': an input such as --data is missing)."""

    status: str
    reason: str


@dataclass
class Context:
    model: Model
    settings: ReproduceSettings
    folder: Path
    traits: dict[str, LoadedTrait]
    progress: Progress = no_progress
    engine: Any = "hf"  # the engine object every generating call shares (opened once by the pipeline)
    results: dict[str, Any] = field(default_factory=dict)  # finished stages' results, by stage name

    def stage_dir(self, stage: str, trait: str) -> Path:
        return self.folder / stage / trait

    def result(self, stage: str, kind: type[Any]) -> Any:
        """The result of an earlier stage; a missing one is a bug in the stage order."""
        value = self.results[stage]
        assert isinstance(value, kind), f"stage {stage} has no {kind.__name__}"
        return value
