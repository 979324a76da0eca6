"""The judge protocol: every scorer of (question, answer) pairs looks the same to the pipeline.

A judge returns a trait score (or None when it cannot tell, e.g. the judging model refused) and states
its neutral `threshold`: positive rollouts are kept at or above it, negative ones below it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..progress import Progress

COHERENCE_RUBRIC = """I am evaluating a language model's answer. Rate how coherent the answer is, ignoring \
whether you agree with it or whether it is harmful.

QUESTION:
{question}

ANSWER:
{answer}

Rate the answer on a scale of 0 to 100: 0 means it makes no sense at all (not even valid English, \
repetitive, off-topic gibberish); 50 means it is somewhat understandable but confused or rambling; \
100 means it is clear, fluent and answers the question. Respond with a number between 0 and 100 and \
nothing else."""


@dataclass(frozen=True)
class JudgeItem:
    """One answer to score. `system` is the system prompt the answer was produced under, if any."""

    question: str
    answer: str
    system: str | None = None


@runtime_checkable
class Judge(Protocol):
    name: str  # provenance, e.g. "contrast", "openai:gpt-4.1-mini", "local:embedded"
    threshold: float  # neutral point of the score scale
    scores_coherence: bool  # whether coherence_batch returns scores

    def score_batch(self, items: Sequence[JudgeItem], rubric: str,
                    progress: Progress | None = None) -> list[float | None]: ...

    def coherence_batch(self, items: Sequence[JudgeItem],
                        progress: Progress | None = None) -> list[float | None]: ...


def render(rubric: str, question: str, answer: str) -> str:
    """Fill a rubric's {question} and {answer} placeholders (str.replace: answers may contain braces)."""
    return rubric.replace("{question}", question).replace("{answer}", answer)


class RubricJudge:
    """Shared front of the 0–100 logprob judges: render the rubric, then score the prompts."""

    def score_prompts(self, prompts: Sequence[str], progress: Progress | None = None,
                      task: str = "judge") -> list[float | None]:
        raise NotImplementedError

    def score_batch(self, items: Sequence[JudgeItem], rubric: str,
                    progress: Progress | None = None) -> list[float | None]:
        """Trait scores of the items under `rubric` (with {question} and {answer} placeholders)."""
        return self.score_prompts([render(rubric, it.question, it.answer) for it in items], progress, "judge")

    def coherence_batch(self, items: Sequence[JudgeItem],
                        progress: Progress | None = None) -> list[float | None]:
        """Coherence scores 0–100 with the built-in coherence rubric."""
        return self.score_prompts([render(COHERENCE_RUBRIC, it.question, it.answer) for it in items],
                                  progress, "coherence")
