"""Stage 2: the layer × coefficient sweep with the reference measure and its controls.

Choose on the first half of the evaluation questions, by default (`sweep.rule=rise`) with the rule of
experiments/steering_reference.py (`choose_by_rise`: the largest −c → +c rise of the reference measure among
cells whose neutral-text perplexity at ±c holds), so that reproduce and the experiment compute the same thing
(issue 17); `sweep.rule=sweep` keeps `personavec.sweep.sweep`'s rule (the largest rise over the unsteered model
among cells whose fluency holds). Then report on the second half, which the choice never saw: at the chosen
layer and coefficient c, the per-question rise of the reference measure from
−c to +c for the trait's own vector, for seeded random directions and for every other trait's vector (both at
the own vector's per-layer norm), with 95% bootstrap intervals over questions. `heldout` holds the statistics
of experiments/steering_reference.py (issue 12's targets) as a library function, and `choose_by_rise` that
experiment's own choice rule (largest −c → +c rise among cells whose neutral-text perplexity holds), pure over
measured values so the committed choice can be replayed without a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from ..capability import neutral_texts, perplexity
from ..controls import matched_norm, random_like
from ..errors import PersonavecError
from ..evaluate import Condition, EvalSettings, evaluate, question_indices
from ..io import read_jsonl
from ..reference import NAME as REFERENCE
from ..runs import Records
from ..sweep import default_layers, sweep
from ..vectors import PersonaVector
from .context import Context
from .extraction import ExtractionResult
from .records import Interval, interval

OWN = "own"


@dataclass(frozen=True)
class GridCell:
    """One layer × c cell of the selection grid, as measured."""

    layer: int
    coef: float
    rise: float  # mean rise of the measure from −coef to +coef over the selection questions
    ppl_ratio: float  # the larger of the neutral-text perplexities at ±coef ÷ the unsteered perplexity
    kept: bool  # ppl_ratio within the limit: only kept cells can be chosen


@dataclass(frozen=True)
class GridChoice:
    """The chosen cell and the whole grid it was chosen from (to show what the rule saw)."""

    layer: int
    coef: float
    selection_rise: float
    grid: tuple[GridCell, ...]


def grid_cell(layer: int, coef: float, rises: Sequence[float], ppl_up: float, ppl_down: float, base_ppl: float,
              ppl_max: float) -> GridCell:
    """A cell from its per-question rises and the perplexities at +coef, −coef and unsteered; steering either way
    must keep the text fluent, so the worse of the two decides."""
    ratio = max(ppl_up, ppl_down) / base_ppl
    return GridCell(layer=layer, coef=coef, rise=sum(rises) / len(rises), ppl_ratio=ratio, kept=ratio <= ppl_max)


def choose_by_rise(grid: Sequence[GridCell]) -> GridChoice:
    """The kept cell with the largest rise (the first in grid order on a tie): the rule of
    experiments/steering_reference.py, fixed before its first run."""
    kept = [g for g in grid if g.kept]
    if not kept:
        least = min((g.ppl_ratio for g in grid), default=float("nan"))
        raise PersonavecError(f"no cell of the layer × coefficient grid kept neutral-text perplexity within the "
                              f"limit (smallest ratio to the unsteered perplexity: {least:.2f})")
    best = max(kept, key=lambda g: g.rise)
    return GridChoice(layer=best.layer, coef=best.coef, selection_rise=best.rise, grid=tuple(grid))


@dataclass(frozen=True)
class HeldOut:
    """The held-out rises and the two tests a trait direction has to pass."""

    own: Interval
    random: dict[str, Interval]
    others: dict[str, Interval]
    max_abs_random: float
    ratio_to_random: float | None  # own mean rise ÷ the largest |mean rise| of the random directions
    best_other: str | None
    best_other_rise: float | None
    interval_above_zero: bool
    beats_random: bool  # own mean rise ≥ k × the largest random |rise|
    beats_others: bool | None  # None with one trait: nothing to compare with


def heldout(own: Sequence[float], randoms: Mapping[str, Sequence[float]], others: Mapping[str, Sequence[float]],
            k: float = 3.0) -> HeldOut:
    """Issue 12's steering statistics from per-question rises (same questions, same order everywhere)."""
    own_i = interval(own)
    rand = {n: interval(v) for n, v in randoms.items()}
    oth = {n: interval(v) for n, v in others.items()}
    max_random = max((abs(i.mean) for i in rand.values() if i.mean is not None), default=0.0)
    own_mean = own_i.mean if own_i.mean is not None else float("nan")
    def rise_of(n: str) -> float:
        m = oth[n].mean
        return m if m is not None else float("-inf")

    best = max(oth, key=rise_of, default=None)
    best_rise = oth[best].mean if best is not None else None
    return HeldOut(own=own_i, random=rand, others=oth, max_abs_random=max_random,
                   ratio_to_random=own_mean / max_random if max_random > 0 else None,
                   best_other=best, best_other_rise=best_rise, interval_above_zero=own_i.above_zero,
                   beats_random=bool(own_mean >= k * max_random),
                   beats_others=None if best_rise is None else bool(own_mean > best_rise))


@dataclass(frozen=True)
class SteeringTrait:
    trait: str
    layer: int
    coef: float
    criterion: str
    selection_change: float  # the chosen cell's rise over coefficient 0 on the selection half
    selection_questions: list[int]
    report_questions: list[int]
    heldout: HeldOut
    rises: dict[str, list[float]]  # per report question: own, each random direction, each other trait
    select_dir: str  # run folders (relative to the run folder): cells.csv, measure.jsonl, answers.jsonl
    # (rule rise generates no answers in select_dir: generate=False, see select_by_rise)
    report_dir: str
    rule: str = "sweep"  # the choice rule (sweep.rule); "sweep" for folders written before the rise rule
    grid: tuple[GridCell, ...] = ()  # rule "rise": every cell the choice saw (empty for rule "sweep")


@dataclass(frozen=True)
class SteeringResult:
    traits: dict[str, SteeringTrait]


def per_question(run_dir: Path) -> dict[str, dict[int, float]]:
    """{cell: {question index: reference gap}} from an evaluation run folder's measure.jsonl."""
    out: dict[str, dict[int, float]] = {}
    for row in read_jsonl(run_dir / "measure.jsonl"):
        if row.get("value") is not None:
            out.setdefault(row["cell"], {})[int(row["question_idx"])] = float(row["value"])
    return out


def rises(cells: Mapping[str, Mapping[int, float]], layer: int, coef: float, control: str | None = None
          ) -> list[float]:
    """Per-question rise from −coef to +coef at `layer` (for a control's cells when named)."""
    def key(c: float) -> str:
        cell = Condition(layer, c).cell
        return cell if control is None else f"{control}:{cell}"

    return paired_rise(cells[key(coef)], cells[key(-coef)])


def paired_rise(up: Mapping[int, float], down: Mapping[int, float]) -> list[float]:
    """Per-question rise from the values at −c (`down`) to those at +c (`up`), in question order."""
    return [up[q] - down[q] for q in sorted(up) if q in down]


def run_steering(ctx: Context) -> SteeringResult:
    vectors = ctx.result("extract", ExtractionResult)
    loaded_vectors = {n: PersonaVector.load(vectors.path(ctx.folder, n)) for n in ctx.traits}
    return SteeringResult({n: steer_trait(ctx, n, loaded_vectors) for n in ctx.traits})


def steer_trait(ctx: Context, name: str, vectors: Mapping[str, PersonaVector]) -> SteeringTrait:
    s, w = ctx.settings, ctx.settings.sweep
    vec, loaded = vectors[name], ctx.traits[name]
    randoms = {f"random{seed}": random_like(vec, seed) for seed in w.random_seeds}
    others = {o: matched_norm(v, vec) for o, v in vectors.items() if o != name}
    controls = {**randoms, **others}

    def settings(half: str, n: int | None) -> EvalSettings:
        return EvalSettings(n_questions=n, rollouts=1, max_new_tokens=w.max_new_tokens, temperature=0.0,
                            seed=s.seed, half=half)

    select_dir, report_dir = ctx.stage_dir("sweep", name) / "select", ctx.stage_dir("sweep", name) / "report"
    grid: tuple[GridCell, ...] = ()
    if w.rule == "rise":
        pick = select_by_rise(ctx, name, vec, settings("first", w.n_select), select_dir,
                              controls if w.selection_controls else None)
        layer, coef, criterion, change, grid = pick.layer, pick.coef, rise_criterion(w.ppl_ratio_max), \
            pick.selection_rise, pick.grid
    else:
        choice = sweep(ctx.model, loaded, vec, layers=w.layers, coefs=list(w.coefs), judge=REFERENCE,
                       settings=settings("first", w.n_select), run_dir=select_dir, coherence_min=w.coherence_min,
                       controls=controls if w.selection_controls else None, engine=ctx.engine,
                       progress=ctx.progress)
        layer, coef = choice.best_layer, float(choice.best_coef)  # float: the settings may give an int
        criterion, change = choice.criterion, choice.trait_change
    evaluate(ctx.model, loaded, vector=vec, judge=REFERENCE, settings=settings("second", w.n_report),
             conditions=[Condition(layer, -coef), Condition(None, 0.0), Condition(layer, coef)],
             run_dir=report_dir, kind="reproduce-heldout", controls=controls, engine=ctx.engine, progress=ctx.progress,
             extra_settings={"layer": layer, "coef": coef})
    cells = per_question(report_dir)
    table = {OWN: rises(cells, layer, coef), **{n: rises(cells, layer, coef, n) for n in controls}}
    n_eval = len(loaded.trait.evaluation_questions)
    return SteeringTrait(
        trait=name, layer=layer, coef=coef, criterion=criterion, selection_change=change,
        selection_questions=question_indices(n_eval, "first", w.n_select),
        report_questions=question_indices(n_eval, "second", w.n_report),
        heldout=heldout(table[OWN], {n: table[n] for n in randoms}, {n: table[n] for n in others},
                        w.rise_vs_random),
        rises=table, select_dir=str(select_dir.relative_to(ctx.folder)),
        report_dir=str(report_dir.relative_to(ctx.folder)), rule=w.rule, grid=grid)


def rise_criterion(ppl_max: float) -> str:
    return (f"rise: the largest mean rise of the reference measure from −c to +c on the selection half, among "
            f"cells whose neutral-text perplexity at +c and at −c stays within {ppl_max:g}× the unsteered one "
            "(the rule of experiments/steering_reference.py)")


def select_by_rise(ctx: Context, name: str, vec: PersonaVector, settings: EvalSettings, run_dir: Path,
                   controls: Mapping[str, PersonaVector] | None) -> GridChoice:
    """The experiment's choice on the selection half: the reference measure at ±c for every layer (and the
    unsteered cell, for the plot), neutral-text perplexity at ±c, stored in `run_dir` so a rerun measures
    nothing twice. The texts are the capability stage's (`capability.n_texts`), at the CPU preset all of them,
    as in the experiment. The rule reads neither answers nor coherence, so none are generated
    (`generate=False`; the measure's values are those of a run that generates)."""
    w = ctx.settings.sweep
    layers = list(default_layers(ctx.model.n_layers) if w.layers is None else w.layers)
    coefs = [float(c) for c in w.coefs]
    conditions = [Condition(layer, sc) for layer in layers for c in coefs for sc in (-c, c)]
    evaluate(ctx.model, ctx.traits[name], vector=vec, judge=REFERENCE, settings=replace(settings, generate=False),
             conditions=[Condition(None, 0.0), *conditions], run_dir=run_dir, kind="reproduce-select",
             controls=controls, engine=ctx.engine, progress=ctx.progress,
             extra_settings={"rule": "rise", "layers": layers, "coefs": coefs})
    cells = per_question(run_dir)
    texts = neutral_texts()[: ctx.settings.capability.n_texts]
    done = Records(run_dir / "perplexity.jsonl")

    def ppl(cond: Condition) -> float:
        key = cond.cell
        if key not in done:
            hooks = vec.steer(ctx.model, layer=cond.layer, coef=cond.coef) if cond.steered else nullcontext()
            with hooks:
                value = perplexity(ctx.model, texts)
            done.add([{"key": key, "layer": cond.layer, "coef": cond.coef, "n_texts": len(texts),
                       "perplexity": value}])
        return float(done[key]["perplexity"])

    base = ppl(Condition(None, 0.0))
    grid = [grid_cell(layer, c, rises(cells, layer, c), ppl(Condition(layer, c)), ppl(Condition(layer, -c)), base,
                      w.ppl_ratio_max) for layer in layers for c in coefs]
    return choose_by_rise(grid)
