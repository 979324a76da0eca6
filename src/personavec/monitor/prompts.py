"""The monitored prompts: graded system prompts and many-shot contexts built from the model's own judged
answers to extraction questions, each crossed with the evaluation questions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..chat import Message, encode_chat, messages_for
from ..errors import PersonavecError, TraitError
from ..generation import generate_ids
from ..io import append_jsonl, read_jsonl
from ..judges import Judge, JudgeItem
from ..progress import Progress, no_progress
from ..traits import LoadedTrait
from .settings import MonitorSettings

if TYPE_CHECKING:
    from ..engines import Engine
    from ..models import Model


@dataclass(frozen=True)
class PromptSpec:
    """One monitored prompt: a condition, its level (graded index or number of shots) and the messages."""

    key: str
    condition: str
    level: int
    label: str
    question_idx: int
    question: str
    messages: list[Message]


def shot_examples(model: Model, loaded: LoadedTrait, judge: Judge, s: MonitorSettings, folder: Path | None,
                  progress: Progress = no_progress, engine: Engine | str | None = None) -> list[dict[str, Any]]:
    """max(shots) example dialogues from EXTRACTION questions answered under positive system prompts,
    ranked by the judge's trait score (highest first). Cached in the run folder."""
    n = max(s.shots) if "many_shot" in s.conditions else 0
    path = folder / "shots.jsonl" if folder else None
    rows = read_jsonl(path) if path is not None else []
    if len(rows) < n:
        t = loaded.trait
        qs, pairs = t.extraction_questions, t.pairs
        plan = [(j, qs[j % len(qs)], pairs[(j + j // len(qs)) % len(pairs)].positive) for j in range(len(rows), n)]
        prompts = [encode_chat(model.tokenizer, messages_for(q, system)) for _, q, system in plan]
        outs = generate_ids(model, prompts, max_new_tokens=s.shot_tokens, temperature=1.0, seed=s.seed + 15485863,
                            progress=progress, task="shot examples", engine=engine)
        texts = [model.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
        scores = judge.score_batch([JudgeItem(q, a, system) for (_, q, system), a in zip(plan, texts, strict=True)],
                                   t.rubric, progress=progress)
        new = [{"index": j, "question": q, "system": system, "answer": a, "score": sc}
               for (j, q, system), a, sc in zip(plan, texts, scores, strict=True)]
        if path is not None:
            append_jsonl(path, new)
        rows += new
    usable = [r for r in rows[:n] if r["answer"]]
    return sorted(usable, key=lambda r: (r["score"] is None, -(r["score"] or 0.0), r["index"]))


def check_graded(loaded: LoadedTrait, s: MonitorSettings) -> None:
    if "graded" in s.conditions and len(loaded.trait.graded_prompts) < 2:
        raise TraitError(f"trait '{loaded.trait.name}' has no graded_prompts (at least 2 system prompts, most "
                         "discouraging first); add them to the trait file or run only the many_shot condition")


def plan_prompts(loaded: LoadedTrait, s: MonitorSettings, shots: Sequence[dict[str, Any]]) -> list[PromptSpec]:
    t = loaded.trait
    questions = t.evaluation_questions[: s.n_questions]
    plan: list[PromptSpec] = []
    check_graded(loaded, s)
    if "graded" in s.conditions:
        for level, system in enumerate(t.graded_prompts):
            for q, question in enumerate(questions):
                plan.append(PromptSpec(f"graded/{level}/{q}", "graded", level, system, q, question,
                                       messages_for(question, system)))
    if "many_shot" in s.conditions:
        for k in sorted(set(s.shots)):
            if k > len(shots):
                raise PersonavecError(f"only {len(shots)} non-empty shot examples for {k} shots; lower --shots")
            context: list[Message] = []
            for ex in shots[:k]:
                context += [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["answer"]}]
            for q, question in enumerate(questions):
                plan.append(PromptSpec(f"many_shot/{k}/{q}", "many_shot", k, f"{k} shots", q, question,
                                       context + messages_for(question)))
    return plan
