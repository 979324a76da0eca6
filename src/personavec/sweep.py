"""Layer × coefficient sweeps: evaluate every cell (resumably), choose where to steer, and record the
choice in the vector file so later commands steer there by default."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LayerError, PersonavecError
from .evaluate import Cell, Condition, EvalSettings, evaluate, resolve_measure
from .io import write_json
from .judges import Judge
from .layers import check_layer
from .progress import Progress, no_progress
from .steering import check_coef
from .traits import LoadedTrait, load_trait

if TYPE_CHECKING:
    from .engines import Engine
    from .models import Model
    from .vectors import PersonaVector

#: Steering strengths tried by default; coefficient 0 (the unsteered model) is evaluated once and shared.
DEFAULT_COEFS = (-6.0, -3.0, 0.0, 3.0, 6.0)


@dataclass(frozen=True)
class Choice:
    """Where `choose` would steer: the chosen cell, its rise over coefficient 0 (and the judge-free measure's
    beside a judge, else None), its score under the rule, and the rule with its coherence threshold."""

    best_layer: int
    best_coef: float
    trait_change: float
    judge_free_change: float | None
    score: float
    coherence_threshold: float
    criterion: str


@dataclass(frozen=True)
class SweepChoice(Choice):
    """A sweep's choice with what it was chosen from: the content of choice.json."""

    judge: str
    measure: str
    trait: str
    half: str
    layers: list[int]
    coefs: list[float]
    vector_file: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_layers(n_layers: int) -> list[int]:
    """Four layers spread over the middle of the network (30%–75% of the depth), where persona vectors
    steer best in the paper; few enough that the default sweep stays affordable on a CPU."""
    return sorted({max(1, min(n_layers, round(n_layers * f))) for f in (0.3, 0.45, 0.6, 0.75)})


def _spread(values: Sequence[float | None]) -> float | None:
    """Standard deviation over the grid: the unit in which a measure's change is counted."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    return sd if sd > 0 else None


def choose(cells: Sequence[Cell], coherence_min: float | None) -> Choice:
    """Best layer = the largest rise of the trait over the unsteered model, among positive coefficients
    whose mean coherence stays at or above the threshold. A threshold of None means 50% of the unsteered
    coherence (for judge-free fluency, which has no absolute scale).

    With the reference measure (authored answers) the rise is that measure's alone. With a judge, the rise
    counts two readings when the cells carry both: the judge's mean trait score and the prompted judge-free
    measure, each in units of its own spread over the grid, summed. Control cells (`control` set) are
    never chosen."""
    cells = [c for c in cells if not c.control]
    base = next((c for c in cells if c.coef == 0), None)
    if base is None or base.trait_mean is None:
        raise PersonavecError("the sweep needs coefficient 0 in --coefs to measure trait change")
    base_trait, base_coherence, base_jf = base.trait_mean, base.coherence_mean, base.judge_free_mean
    threshold = coherence_min
    if threshold is None:
        threshold = 0.5 * base_coherence if base_coherence is not None else -math.inf
    unit_t = _spread([c.trait_mean for c in cells]) or 1.0
    unit_j = _spread([c.judge_free_mean for c in cells]) if base_jf is not None else None
    best: tuple[float, int, float, float, float | None] | None = None  # score, layer, coef, the two changes
    for c in cells:
        if c.coef <= 0 or c.layer is None or c.trait_mean is None:
            continue
        if c.coherence_mean is not None and c.coherence_mean < threshold:
            continue
        change = c.trait_mean - base_trait
        score = change / unit_t
        jf_change = None
        if unit_j is not None and base_jf is not None and c.judge_free_mean is not None:
            jf_change = c.judge_free_mean - base_jf
            score += jf_change / unit_j
        if best is None or score > best[0]:
            best = score, c.layer, c.coef, change, jf_change
    if best is None:
        raise PersonavecError(f"no positive coefficient kept coherence ≥ {threshold:.3g}; try smaller --coefs")
    score, layer, coef, change, jf_change = best
    both = unit_j is not None
    return Choice(best_layer=layer, best_coef=coef, trait_change=change, judge_free_change=jf_change,
                  score=score, coherence_threshold=threshold,
                  criterion="largest rise over coefficient 0 of the mean trait measure"
                  + (" plus the judge-free measure, each in units of its spread over the grid," if both else "")
                  + " among positive coefficients whose mean coherence stays at or above the threshold")


def sweep(model: Model, trait: str | Path | LoadedTrait, vector: PersonaVector, *,
          layers: Sequence[int] | None = None, coefs: Sequence[float] | None = None,
          judge: Judge | str | None = None, settings: EvalSettings | None = None,
          run_dir: str | Path, coherence_min: float | None = None, vector_path: str | Path | None = None,
          allow_mismatch: bool = False, controls: Mapping[str, PersonaVector] | None = None,
          engine: Engine | str | None = None, progress: Progress = no_progress) -> SweepChoice:
    """Evaluate the grid (and the same steered grid for each control), write cells.csv and choice.json into
    `run_dir`, and (if `vector_path` is given) rewrite that vector file atomically with best_layer /
    best_coef in its metadata. The choice reads the trait's own cells only. `engine` generates every cell's
    answers, steered per cell (see `evaluate`)."""
    loaded = trait if isinstance(trait, LoadedTrait) else load_trait(trait)
    vector.check_model(model, allow_mismatch)
    layer_list = list(default_layers(model.n_layers) if layers is None else layers)
    coef_list = list(DEFAULT_COEFS if coefs is None else coefs)
    if not layer_list:
        raise LayerError("the layer list is empty; name at least one layer")
    if not coef_list:
        raise PersonavecError("the coefficient list is empty; name at least one coefficient")
    for layer in layer_list:
        check_layer(layer, model.n_layers)
    for c in coef_list:
        check_coef(c)
    if 0.0 not in coef_list:
        coef_list.append(0.0)
    coef_list.sort()
    measure = resolve_measure(loaded.trait, judge)
    conditions = [Condition(layer, c) for layer in layer_list for c in coef_list]
    # the run folder is identified by the vector's digest and the settings; its grid may grow between runs
    cells = evaluate(model, loaded, vector=vector, conditions=conditions, judge=judge, settings=settings,
                     run_dir=run_dir, kind="sweep", allow_mismatch=allow_mismatch, controls=controls,
                     engine=engine, progress=progress)
    s = settings or EvalSettings()
    choice = SweepChoice(**asdict(choose(cells, coherence_min)), judge=measure, measure=measure,
                         trait=loaded.trait.name, half=s.half, layers=layer_list, coefs=coef_list,
                         vector_file=str(vector_path or ""))
    write_json(Path(run_dir) / "choice.json", choice.to_json())
    if vector_path is not None:
        vector.with_meta(best_layer=choice.best_layer, best_coef=choice.best_coef,
                         sweep_run=str(run_dir), sweep_judge=measure).save(vector_path)
    return choice
