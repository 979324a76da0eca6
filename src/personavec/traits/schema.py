"""The trait file schema (YAML). A trait is a name, a description, contrastive system-prompt pairs,
two disjoint question sets (extraction / evaluation), a judge rubric with {question} and {answer}, and
optionally authored reference answers per evaluation question (the independent `reference` measure)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MIN_PAIRS = 5
MIN_REFERENCES = 2  # answers per side and question
MAX_LENGTH_RATIO = 1.5  # mean words of one side over the other, per question
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def normalize_question(text: str) -> str:
    """Case- and whitespace-insensitive form used to detect duplicates and overlaps."""
    return " ".join(text.lower().split())


class PromptPair(BaseModel):
    """A system prompt that encourages the trait and one that discourages it."""

    model_config = ConfigDict(extra="forbid")
    positive: str = Field(min_length=1)
    negative: str = Field(min_length=1)


def _words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / len(texts)


class Reference(BaseModel):
    """Authored answers to one evaluation question: some that express the trait, some that do not, matched
    in topic and length and written independently of the prompt pairs (never sampled under them)."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    with_trait: list[str]
    without_trait: list[str]

    @model_validator(mode="after")
    def _sides(self) -> Reference:
        for side in ("with_trait", "without_trait"):
            answers = getattr(self, side)
            if len(answers) < MIN_REFERENCES:
                raise ValueError(f"{self.question[:50]!r}: {side} needs at least {MIN_REFERENCES} answers, "
                                 f"found {len(answers)}")
            if any(not a.strip() for a in answers):
                raise ValueError(f"{self.question[:50]!r}: {side} has an empty answer")
        a, b = _words(self.with_trait), _words(self.without_trait)
        if max(a, b) > MAX_LENGTH_RATIO * min(a, b):
            raise ValueError(f"{self.question[:50]!r}: with_trait answers average {a:.0f} words and "
                             f"without_trait {b:.0f}; match their lengths within {MAX_LENGTH_RATIO}x")
        return self


class Trait(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = Field(min_length=1)
    pairs: list[PromptPair]
    extraction_questions: list[str]
    evaluation_questions: list[str]
    rubric: str
    # Graded system prompts (most discouraging first) for monitoring experiments; optional.
    graded_prompts: list[str] = Field(default_factory=list)
    # Authored answers per evaluation question (see Reference); optional, but the default offline measure.
    references: list[Reference] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use lowercase letters, digits, '-' or '_' (e.g. 'evil')")
        return v

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, v: list[PromptPair]) -> list[PromptPair]:
        if len(v) < MIN_PAIRS:
            raise ValueError(f"at least {MIN_PAIRS} positive/negative pairs are needed, found {len(v)}")
        return v

    @field_validator("extraction_questions", "evaluation_questions")
    @classmethod
    def _questions(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one question is needed")
        seen: set[str] = set()
        for q in v:
            if not q.strip():
                raise ValueError("empty question")
            key = normalize_question(q)
            if key in seen:
                raise ValueError(f"duplicate question: {q[:60]!r}")
            seen.add(key)
        return v

    @field_validator("rubric")
    @classmethod
    def _rubric(cls, v: str) -> str:
        missing = [p for p in ("{question}", "{answer}") if p not in v]
        if missing:
            raise ValueError(f"the rubric must contain the placeholders {' and '.join(missing)}")
        return v

    @model_validator(mode="after")
    def _disjoint(self) -> Trait:
        extraction = {normalize_question(q) for q in self.extraction_questions}
        overlap = [q for q in self.evaluation_questions if normalize_question(q) in extraction]
        if overlap:
            raise ValueError(f"evaluation_questions overlap extraction_questions: {overlap[0][:60]!r}"
                             + (f" and {len(overlap) - 1} more" if len(overlap) > 1 else ""))
        evaluation = {normalize_question(q) for q in self.evaluation_questions}
        seen: set[str] = set()
        for ref in self.references:
            key = normalize_question(ref.question)
            if key not in evaluation:
                raise ValueError(f"references: {ref.question[:60]!r} is not one of the evaluation_questions")
            if key in seen:
                raise ValueError(f"references: {ref.question[:60]!r} appears twice")
            seen.add(key)
        return self

    def reference_for(self, question_idx: int) -> Reference | None:
        """The authored references of evaluation question `question_idx`, if it has any."""
        key = normalize_question(self.evaluation_questions[question_idx])
        return next((r for r in self.references if normalize_question(r.question) == key), None)
