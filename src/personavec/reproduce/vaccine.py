"""The vaccine comparison of the finetuning stage (issue 13 (c)): on the II set, does a method keep the trait
from growing while the model learns from it, and at what capability cost?

Methods (each a condition of the II finetune): `prevent:C` adds C × v at the vector's layer to every token while
training (the paper's preventative steering), `penalty:W` adds W × the squared projection on v to the loss, `caft`
ablates the direction at every layer while training, and `infer:C` steers the plain II finetune by −C × v on
its responses while it is measured (no training). Each method's coefficient grid runs at the first seed; the
coefficient is chosen on the first half of the measured evaluation questions (largest removal share among
conditions whose neutral-text perplexity is within `ppl_cap` × the plain II finetune's, else the cheapest), then
run at the other seeds; removal share and perplexity cost are reported on the second half, with t intervals
over seeds. Removal share = 1 − (condition − normal) / (II − normal), each finetune compared with the normal
and II finetunes of its own seed. The choice is pure over measured values (`choose`), so it can be replayed.

The control of each method is the same method at its chosen setting with a seeded random direction of the
vector's norm at every layer in place of the vector (`random-<condition>`, `controls.random_like`): the removal a
method owes to the trait's direction is its removal beyond that of pushing (or penalizing, or ablating) some
direction as hard."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..controls import random_like
from ..errors import PersonavecError
from ..training import Interventions
from ..vectors import PersonaVector
from .records import Interval, t_interval
from .settings import VACCINE_METHODS as METHODS

II, NORMAL = "II", "normal"
CONTROL = "random-"  # prefix of a control condition: the method with a random direction in place of the vector
CONTROL_SEED = 0  # the random direction's seed (the first of the shift control's directions)


@dataclass(frozen=True)
class Scored:
    """What the choice and the report read of one measured model: its reference measure per question, its
    neutral-text perplexity and quiz accuracy."""

    condition: str
    seed: int | None
    per_question: dict[int, float]
    perplexity: float
    quiz: float


@dataclass(frozen=True)
class VaccineMethod:
    method: str
    chosen: str  # the condition chosen on the selection half at the first seed
    selection: dict[str, float]  # removal share on the selection half, per grid condition (first seed)
    removal: Interval  # on the report half, over seeds
    ppl_cost: Interval  # perplexity ÷ the same seed's plain II finetune's − 1, over seeds
    quiz_change: Interval  # quiz accuracy − the same seed's plain II finetune's, over seeds
    seeds: list[int]
    control: Interval | None = None  # removal share of `random-<chosen>` on the report half, over seeds
    control_ppl_cost: Interval | None = None
    beyond_control: Interval | None = None  # removal − the control's, paired by seed: what the direction adds
    removal_per_seed: list[float] = field(default_factory=list)  # the values behind `removal`, in `seeds` order
    control_per_seed: list[float] = field(default_factory=list)  # the values behind `control`, in run order


def conditions(method: str, grid: Sequence[float]) -> list[str]:
    """The method's grid as condition names (CAFT has no coefficient)."""
    if method not in METHODS:
        raise PersonavecError(f"unknown vaccine method '{method}'; choose from {', '.join(METHODS)}")
    return ["caft"] if method == "caft" else [f"{method}:{c:g}" for c in grid]


def control_of(condition: str) -> str:
    """The random-direction control of a condition ('prevent:1' → 'random-prevent:1')."""
    return CONTROL + condition


def direction(condition: str, vec: PersonaVector) -> PersonaVector:
    """The direction a condition trains or steers with: the vector, or for a control its random stand-in."""
    return random_like(vec, CONTROL_SEED) if condition.startswith(CONTROL) else vec


def interventions_for(condition: str, vec: PersonaVector, layer: int) -> Interventions:
    """What the trainer does for a training condition ('caft', 'prevent:C', 'penalty:W', each optionally as its
    'random-' control; anything else: nothing)."""
    vec = direction(condition, vec)
    kind, _, value = condition.removeprefix(CONTROL).partition(":")
    if kind == "prevent":
        return Interventions(preventative=vec, coef=float(value), layer=layer)
    if kind == "penalty":
        return Interventions(penalty=float(value), penalty_vector=vec, penalty_layer=layer)
    if kind == "caft":
        return Interventions(ablate=vec)
    return Interventions()


def inference_coef(condition: str) -> float:
    """The steering coefficient a condition is measured under: −C for 'infer:C' (and its control), else 0."""
    kind, _, value = condition.removeprefix(CONTROL).partition(":")
    return -float(value) if kind == "infer" else 0.0


def half_mean(s: Scored, half: Sequence[int]) -> float:
    values = [s.per_question[q] for q in half if q in s.per_question]
    if not values:
        raise PersonavecError(f"no reference value on questions {list(half)}")
    return sum(values) / len(values)


def removal(s: Scored, normal: Scored, plain: Scored, half: Sequence[int]) -> float:
    """Share of the II − normal increase on `half` that `s` does not show (1 = all removed, 0 = none; NaN when
    the II finetune did not rise above the normal one there)."""
    n = half_mean(normal, half)
    gap = half_mean(plain, half) - n
    return 1.0 - (half_mean(s, half) - n) / gap if gap != 0 else float("nan")


def choose(grid: Sequence[Scored], normal: Scored, plain: Scored, half: Sequence[int], ppl_cap: float) -> str:
    """The largest removal on `half` among grid conditions within `ppl_cap` × the plain II perplexity; if none
    is, the cheapest. Ties: the first in grid order."""
    if not grid:
        raise PersonavecError("an empty coefficient grid: give the vaccine method at least one value")
    ok = [g for g in grid if g.perplexity <= ppl_cap * plain.perplexity]
    if not ok:
        return min(grid, key=lambda g: g.perplexity).condition
    scores = [removal(g, normal, plain, half) for g in ok]
    best = max(range(len(ok)), key=lambda k: (scores[k] if scores[k] == scores[k] else float("-inf"), -k))
    return ok[best].condition


def summarize(method: str, grid: Sequence[Scored], chosen: Sequence[Scored], normals: dict[int, Scored],
              plains: dict[int, Scored], select: Sequence[int], report: Sequence[int],
              controls: Sequence[Scored] = ()) -> VaccineMethod:
    """The method's record: the selection-half removal over the grid (first seed) and, at the chosen condition,
    removal, perplexity cost and quiz change on the report half over seeds; with `controls` (the chosen
    condition's random-direction runs), their removal and perplexity cost beside it and the removal beyond
    theirs, paired by seed."""
    seed0 = chosen[0].seed
    assert seed0 is not None
    sel = {g.condition: removal(g, normals[seed0], plains[seed0], select) for g in grid}

    def removals(runs: Sequence[Scored]) -> dict[int, float]:
        return {s.seed: removal(s, normals[s.seed], plains[s.seed], report) for s in runs if s.seed is not None}

    def change(runs: Sequence[Scored], ratio: bool) -> Interval:  # perplexity ratio − 1, or quiz difference
        return t_interval([s.perplexity / plains[s.seed].perplexity - 1 if ratio else s.quiz - plains[s.seed].quiz
                           for s in runs if s.seed is not None])

    rem, ctrl = removals(chosen), removals(controls)
    paired = [rem[k] - ctrl[k] for k in rem if k in ctrl]
    return VaccineMethod(
        method=method, chosen=chosen[0].condition, selection=sel, removal=t_interval(list(rem.values())),
        ppl_cost=change(chosen, True), quiz_change=change(chosen, False), seeds=list(rem),
        control=t_interval(list(ctrl.values())) if ctrl else None,
        control_ppl_cost=change(controls, True) if controls else None,
        beyond_control=t_interval(paired) if paired else None, removal_per_seed=list(rem.values()),
        control_per_seed=list(ctrl.values()))
