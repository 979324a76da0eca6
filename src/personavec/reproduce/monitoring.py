"""Stage 4: does the last-prompt-token projection predict the trait before the answer is written?

`personavec.monitor.monitor_eval` runs the prompts (graded system prompts and/or many-shot) × evaluation
questions at the sweep's chosen layer. Reported against the reference measure under each prompt (authored
answers, independent of the prompt pairs and the graded prompts), each with a 95% Fisher-z interval:
r over all points, over level means, within levels (both centred on their level's mean, so prompt identity
alone cannot drive it) and within questions (centred on the question's mean, which removes the spread of
the references' own likelihood gap between questions); plus the highest content-word overlap of any graded
prompt with any prompt pair. These are the statistics of experiments/monitor_reference.py, as library code."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..io import read_jsonl
from ..monitor import MonitorSettings, monitor_eval
from ..stats import centre
from ..traits import Trait
from ..vectors import PersonaVector
from .context import Context
from .extraction import ExtractionResult
from .records import Correlation, correlation
from .steering import SteeringResult

STOP_WORDS = ("a an the you your yours are is be to of and or in on at for with as that this it its who whom which "
              "what every each all any their them they those these never always should make makes let lets like reply "
              "answer from by not no do does so than then into up out over about most more very s")
STOP = frozenset(STOP_WORDS.split(" "))


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP}


@dataclass(frozen=True)
class Overlap:
    """The graded prompt and prompt-pair prompt that share the most content words (Jaccard)."""

    jaccard: float
    graded: str
    pair: str
    shared: list[str]


def overlap(trait: Trait) -> Overlap:
    pairs = [getattr(p, side) for p in trait.pairs for side in ("positive", "negative")]
    best = Overlap(0.0, "", "", [])
    for g in trait.graded_prompts or []:
        for p in pairs:
            shared = words(g) & words(p)
            union = words(g) | words(p)
            j = len(shared) / len(union) if union else 0.0
            if j > best.jaccard:
                best = Overlap(j, g, p, sorted(shared))
    return best


@dataclass(frozen=True)
class Point:
    condition: str
    level: int
    question_idx: int
    projection: float
    reference: float
    trait_score: float | None  # the judge's score of the sampled answer(s)


@dataclass(frozen=True)
class LevelMean:
    condition: str
    level: int
    label: str
    projection: float
    reference: float


@dataclass(frozen=True)
class MonitorTrait:
    trait: str
    layer: int
    judge: str
    r_points: Correlation
    r_level_means: Correlation
    r_within_levels: Correlation
    r_within_questions: Correlation
    r_judge_points: Correlation  # projection vs the judge's score of the answers (beside, not the headline)
    overlap: Overlap
    levels: list[LevelMean]
    points: list[Point]
    run_dir: str  # monitor run folder (relative): points.jsonl, results.json, monitor.png


@dataclass(frozen=True)
class MonitorResult:
    traits: dict[str, MonitorTrait]


def correlations(points: Sequence[Point]) -> dict[str, Correlation]:
    """r over points, level means, within levels and within questions (projection vs reference)."""
    x, y = [p.projection for p in points], [p.reference for p in points]
    levels = [(p.condition, p.level) for p in points]
    questions = [p.question_idx for p in points]
    keys = list(dict.fromkeys(levels))
    lx = [sum(v for v, g in zip(x, levels, strict=True) if g == k) / levels.count(k) for k in keys]
    ly = [sum(v for v, g in zip(y, levels, strict=True) if g == k) / levels.count(k) for k in keys]
    return {"points": correlation(x, y), "level_means": correlation(lx, ly),
            "within_levels": correlation(centre(x, levels), centre(y, levels)),
            "within_questions": correlation(centre(x, questions), centre(y, questions))}


def run_monitoring(ctx: Context) -> MonitorResult:
    s, m = ctx.settings, ctx.settings.monitor
    vectors = ctx.result("extract", ExtractionResult)
    steering = ctx.result("sweep", SteeringResult)
    settings = MonitorSettings(n_questions=m.n_questions, rollouts=m.rollouts, max_new_tokens=m.max_new_tokens,
                               temperature=1.0, shots=m.shots, conditions=m.conditions, judge_free=False,
                               seed=s.seed)
    out = {}
    for name, loaded in ctx.traits.items():
        vec = PersonaVector.load(vectors.path(ctx.folder, name))
        run = ctx.stage_dir("monitor", name)
        layer = steering.traits[name].layer
        res = monitor_eval(ctx.model, loaded, vec, judge=s.judge, settings=settings, layer=layer, run_dir=run,
                           engine=ctx.engine, progress=ctx.progress)
        points = [Point(p["condition"], int(p["level"]), int(p["question_idx"]), float(p["projection"]),
                        float(p["reference"]), p.get("trait_score"))
                  for p in read_jsonl(run / "points.jsonl") if p.get("reference") is not None]
        judged = [p for p in points if p.trait_score is not None]
        r = correlations(points)
        out[name] = MonitorTrait(
            trait=name, layer=layer, judge=res.judge, r_points=r["points"], r_level_means=r["level_means"],
            r_within_levels=r["within_levels"], r_within_questions=r["within_questions"],
            r_judge_points=correlation([p.projection for p in judged], [float(p.trait_score or 0) for p in judged]),
            overlap=overlap(loaded.trait),
            levels=[LevelMean(v.condition, v.level, v.label, v.projection, v.reference)
                    for v in res.levels if v.projection is not None and v.reference is not None],
            points=points, run_dir=str(run.relative_to(ctx.folder)))
    return MonitorResult(out)
