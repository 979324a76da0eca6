"""The finetuning shift: how far finetuning moved the model's activations along the persona vector.

Per layer L: (mean last-prompt-token activation of the finetuned model − that of the base model) · v̂_L,
over the trait's evaluation questions with no system prompt. The last prompt token is where the model
has read the question and not yet answered, so its shift predicts the trait of the coming answer
(the paper reports r = 0.76-0.97 between this shift and the trait change)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from ..capture import Sample, capture_means
from ..chat import encode_chat, messages_for
from ..progress import Progress, no_progress
from ..traits import LoadedTrait, load_trait

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector


def eval_prompts(model: Model, trait: str | LoadedTrait, n_questions: int | None = None) -> list[Sample]:
    loaded = trait if isinstance(trait, LoadedTrait) else load_trait(trait)
    questions = loaded.trait.evaluation_questions[:n_questions]
    return [Sample(encode_chat(model.tokenizer, messages_for(q)), []) for q in questions]


def last_prompt_means(model: Model, samples: list[Sample], progress: Progress = no_progress,
                      task: str = "shift") -> torch.Tensor:
    """[n_layers + 1, hidden] mean last-prompt-token activation of the model as it runs now."""
    return capture_means(model, samples, positions=("last_prompt",), progress=progress, task=task)["last_prompt"]


@contextlib.contextmanager
def base_of(model: Model) -> Any:
    """The model with its PEFT adapter disabled (the base model, no second copy in memory)."""
    if not hasattr(model.hf, "disable_adapter"):
        raise TypeError("base_of needs a model whose .hf is a peft PeftModel")
    with model.hf.disable_adapter():
        yield model


def project(finetuned: torch.Tensor, base: torch.Tensor, vector: PersonaVector) -> list[float | None]:
    """Per layer: (finetuned − base) · unit(vector[L]); None where the vector is zero (the embeddings)."""
    out: list[float | None] = []
    for layer in range(vector.n_layers + 1):
        v = vector.at(layer).float()
        norm = float(v.norm())
        out.append(None if norm == 0 else float((finetuned[layer] - base[layer]).float() @ (v / norm)))
    return out


def shift_record(per_layer: list[float | None], vector: PersonaVector, **extra: Any) -> dict[str, Any]:
    return {"layer": vector.layer, "shift": per_layer[vector.layer], "per_layer": per_layer,
            "trait": vector.trait, **extra}


def finetuning_shift(finetuned: Model, vector: PersonaVector, trait: str | LoadedTrait | None = None, *,
                     base: Model | None = None, base_means: torch.Tensor | None = None,
                     n_questions: int | None = None, progress: Progress = no_progress) -> dict[str, Any]:
    """Shift of `finetuned` relative to `base` (default: the same model with its adapter disabled).

    Returns {"layer": the vector's layer, "shift": the shift there, "per_layer": [...], "trait": ...}."""
    samples = eval_prompts(finetuned, trait or vector.trait, n_questions)
    ft = last_prompt_means(finetuned, samples, progress, "shift: finetuned")
    if base_means is None:
        if base is not None:
            base_means = last_prompt_means(base, samples, progress, "shift: base")
        else:
            with base_of(finetuned):
                base_means = last_prompt_means(finetuned, samples, progress, "shift: base")
    return shift_record(project(ft, base_means, vector), vector, n_questions=len(samples))
