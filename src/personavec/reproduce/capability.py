"""Stage 3: capability at the chosen steering setting, item by item so that every figure has an interval:
perplexity of each shipped neutral text and the right/wrong answer of each quiz item, unsteered and
steered at the sweep's layer and +coefficient. Items are stored per condition and reused on a rerun."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..capability import neutral_texts, perplexity, quiz_accuracy, quiz_items
from ..runs import Records
from ..vectors import PersonaVector
from .context import Context
from .extraction import ExtractionResult
from .records import Interval, interval
from .steering import SteeringResult

BASE = "unsteered"


@dataclass(frozen=True)
class Items:
    """Per-item capability of one condition."""

    perplexity: list[float]  # one per neutral text
    quiz: list[float]  # 1.0 right, 0.0 wrong, one per quiz item


@dataclass(frozen=True)
class CapabilityTrait:
    trait: str
    layer: int
    coef: float
    log_ppl_change: Interval  # per text: log(steered perplexity ÷ unsteered)
    quiz_base: Interval
    quiz_steered: Interval
    quiz_change: Interval  # per item: steered − unsteered (paired)
    steered: Items

    @property
    def ppl_ratio(self) -> float | None:
        m = self.log_ppl_change.mean
        return None if m is None else math.exp(m)


@dataclass(frozen=True)
class CapabilityResult:
    base: Items
    traits: dict[str, CapabilityTrait]


def measure_items(ctx: Context) -> Items:
    """The model as it runs now (steered by the caller or not), one text and one quiz item at a time."""
    c = ctx.settings.capability
    texts, quiz = neutral_texts()[: c.n_texts], quiz_items()[: c.n_quiz]
    ppl = [perplexity(ctx.model, [t]) for t in texts]
    ctx.progress("capability items", len(texts), len(texts) + len(quiz))
    right = [quiz_accuracy(ctx.model, [q]) for q in quiz]
    ctx.progress("capability items", len(texts) + len(quiz), len(texts) + len(quiz))
    return Items(ppl, right)


def run_capability(ctx: Context) -> CapabilityResult:
    steering = ctx.result("sweep", SteeringResult)
    vectors = ctx.result("extract", ExtractionResult)
    done = Records(ctx.folder / "capability.items.jsonl")

    def items(key: str, vec: PersonaVector | None, layer: int, coef: float) -> Items:
        if key not in done:
            if vec is None:
                got = measure_items(ctx)
            else:
                with vec.steer(ctx.model, layer=layer, coef=coef):
                    got = measure_items(ctx)
            done.add([{"key": key, "perplexity": got.perplexity, "quiz": got.quiz}])
        row = done[key]
        return Items(row["perplexity"], row["quiz"])

    base = items(BASE, None, 0, 0.0)
    out = {}
    for name, st in steering.traits.items():
        vec = PersonaVector.load(vectors.path(ctx.folder, name))
        it = items(f"{name}:L{st.layer}_c{st.coef:+g}", vec, st.layer, st.coef)
        out[name] = CapabilityTrait(
            trait=name, layer=st.layer, coef=st.coef,
            log_ppl_change=interval([math.log(a / b) for a, b in zip(it.perplexity, base.perplexity, strict=True)]),
            quiz_base=interval(base.quiz), quiz_steered=interval(it.quiz),
            quiz_change=interval([a - b for a, b in zip(it.quiz, base.quiz, strict=True)]), steered=it)
    return CapabilityResult(base, out)
