"""Stage 1: one persona vector per trait (every layer, the three positions), by `personavec.extract`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..extract import ExtractSettings, extract
from .context import Context


@dataclass(frozen=True)
class ExtractedVector:
    trait: str
    path: str  # relative to the run folder
    digest: str
    judge: str
    threshold: float
    positive_kept: int
    positive_total: int
    negative_kept: int
    negative_total: int


@dataclass(frozen=True)
class ExtractionResult:
    vectors: dict[str, ExtractedVector]

    def path(self, folder: Path, trait: str) -> Path:
        return folder / self.vectors[trait].path


def run_extraction(ctx: Context) -> ExtractionResult:
    """Extract each trait's vector in its own run folder (rollouts and scores resume there)."""
    s = ctx.settings
    e = s.extract
    settings = ExtractSettings(n_questions=e.n_questions, n_pairs=e.n_pairs, rollouts=e.rollouts,
                               max_new_tokens=e.max_new_tokens, temperature=e.temperature, seed=s.seed)
    out = {}
    for name, loaded in ctx.traits.items():
        run = ctx.stage_dir("extract", name)
        vec = extract(ctx.model, loaded, judge=s.judge, settings=settings, run_dir=run, engine=ctx.engine,
                      progress=ctx.progress)
        counts = vec.meta["counts"]
        out[name] = ExtractedVector(
            trait=name, path=str((run / "vector.pv.safetensors").relative_to(ctx.folder)), digest=vec.digest(),
            judge=str(vec.meta["judge"]), threshold=float(vec.meta["threshold"]),
            positive_kept=counts["positive_kept"], positive_total=counts["positive_total"],
            negative_kept=counts["negative_kept"], negative_total=counts["negative_total"])
    return ExtractionResult(out)
