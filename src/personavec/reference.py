"""The `reference` trait measure: how much likelier the model, as it stands (steered, prompted or
finetuned), finds authored answers that express the trait than authored answers that do not.

Per evaluation question: mean per-token log-probability (nats) of its `with_trait` references minus that of
its `without_trait` references, given the question (and an optional system prompt). The references are
written independently of the prompt pairs that build the vector, so a vector that moves this measure moves
something the vector never saw. Active steering hooks apply (cache-free forward, `sequence_layout` set)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .capture import Sample
from .chat import encode_chat, encode_response, messages_for
from .errors import TraitError
from .likelihood import response_logprobs
from .progress import Progress, no_progress
from .stats import mean_se

if TYPE_CHECKING:
    from .models import Model
    from .traits import Trait

NAME = "reference"


@dataclass(frozen=True)
class QuestionGap:
    question_idx: int
    with_trait: float  # mean per-token log-probability of the trait-expressing references
    without_trait: float
    gap: float  # with_trait − without_trait (nats per token)


@dataclass(frozen=True)
class ReferenceResult:
    """Per-question gaps and their mean ± standard error over questions."""

    questions: list[QuestionGap]
    mean: float | None
    se: float | None

    @property
    def gaps(self) -> list[float]:
        return [q.gap for q in self.questions]


def reference_questions(trait: Trait, question_idx: Sequence[int] | None = None) -> list[int]:
    """Evaluation-question indices that have references (all of them, or those of `question_idx`)."""
    if not trait.references:
        raise TraitError(f"trait '{trait.name}' has no references; add a references section to its file or "
                         "use the contrast judge")
    wanted = range(len(trait.evaluation_questions)) if question_idx is None else question_idx
    return [i for i in wanted if trait.reference_for(i) is not None]


def reference_measure(model: Model, trait: Trait, question_idx: Sequence[int] | None = None, *,
                      system: str | None = None, batch_size: int = 16,
                      progress: Progress = no_progress) -> ReferenceResult:
    """The reference measure on the given evaluation questions (default: every one with references)."""
    qs = reference_questions(trait, question_idx)
    tok = model.tokenizer
    samples: list[Sample] = []
    sides: list[tuple[int, str]] = []
    for q in qs:
        ref = trait.reference_for(q)
        assert ref is not None
        prompt = encode_chat(tok, messages_for(trait.evaluation_questions[q], system))
        for side in ("with_trait", "without_trait"):
            for answer in getattr(ref, side):
                samples.append(Sample(prompt, encode_response(tok, answer)))
                sides.append((q, side))
    lps = response_logprobs(model, samples, batch_size=batch_size, progress=progress, task=NAME)
    acc: dict[tuple[int, str], list[float]] = {}
    for key, lp in zip(sides, lps, strict=True):
        if lp is not None:
            acc.setdefault(key, []).append(lp)
    rows = []
    for q in qs:
        w, wo = acc.get((q, "with_trait")), acc.get((q, "without_trait"))
        if w and wo:
            a, b = sum(w) / len(w), sum(wo) / len(wo)
            rows.append(QuestionGap(q, a, b, a - b))
    m, se, _ = mean_se([r.gap for r in rows])
    return ReferenceResult(rows, m, se)
