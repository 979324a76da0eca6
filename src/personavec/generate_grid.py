"""Answer prompts unsteered or steered by a persona vector at several coefficients: the loop behind
`personavec generate`. Layer L is the output of decoder block L (the hook sits on block L−1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PersonavecError
from .progress import Progress, no_progress

if TYPE_CHECKING:
    from .engines import Engine
    from .models import Model
    from .vectors import PersonaVector

Layer = int | list[int] | str | None


@dataclass(frozen=True)
class GridAnswer:
    """One prompt's answers, in the order of the coefficients."""

    prompt: str
    answers: list[str]


@dataclass(frozen=True)
class GridResult:
    """What `generate_grid` produced: `rows[i].answers[j]` answers prompt i at coefficient `coefs[j]`."""

    model_id: str
    trait: str | None  # the vector's trait; None when unsteered
    layer: Layer  # the layer(s) steered (personavec numbering), None when unsteered
    positions: str
    coefs: list[float]
    rows: list[GridAnswer]

    def answers_at(self, coef: float) -> list[str]:
        """Every prompt's answer at one coefficient."""
        j = self.coefs.index(coef)
        return [r.answers[j] for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: one entry per prompt, each with its (coef, answer) pairs."""
        return {"model_id": self.model_id, "trait": self.trait, "layer": self.layer, "positions": self.positions,
                "coefs": list(self.coefs),
                "prompts": [{"prompt": r.prompt,
                             "answers": [{"coef": c, "text": a} for c, a in zip(self.coefs, r.answers, strict=True)]}
                            for r in self.rows]}


def plan_grid(vector: PersonaVector | None, layer: Layer, coefs: Sequence[float] | None) -> tuple[Layer, list[float]]:
    """Check what the vector alone can tell before a model is loaded: the steered layer(s) (default: the
    vector's chosen layer) and the coefficients (default 1 with a vector, 0 without); one-line errors."""
    from .layers import check_layer
    from .steering import check_coef

    checked = [check_coef(c) for c in (coefs or [1.0 if vector is not None else 0.0])]
    if vector is None:
        if any(c != 0 for c in checked):
            raise PersonavecError("--coef needs --vector")
        return None, checked
    chosen: Layer = layer if layer is not None else vector.layer
    steered: list[int] = [chosen] if isinstance(chosen, int) else chosen if isinstance(chosen, list) else []
    for ly in steered:  # "all" is every layer the vector has
        check_layer(ly, vector.n_layers)
    return chosen, checked


def generate_grid(model: Model, prompts: Sequence[str], vector: PersonaVector | None = None, *,
                  layer: Layer = None, coefs: Sequence[float] | None = None, positions: str = "response",
                  system: str | None = None, max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 0,
                  allow_mismatch: bool = False, engine: Engine | str | None = None,
                  progress: Progress = no_progress) -> GridResult:
    """Answer every prompt once per coefficient, steering with `vector` at `layer`. Every coefficient's
    answers use the same seed. `engine` ("hf", "vllm" or an engine object) generates them, carrying the
    steering itself (hooks on the Hugging Face model would not reach vLLM's workers)."""
    from .chat import messages_for
    from .engines import Steering, engine_scope
    from .generation import generate

    if not prompts:
        raise PersonavecError("no prompts: pass them as arguments or with --file")
    chosen, checked = plan_grid(vector, layer, coefs)
    if vector is not None:
        vector.check_model(model, allow_mismatch)
    conversations = [messages_for(p, system) for p in prompts]
    answers: list[list[str]] = []
    specs = [Steering.from_vector(vector, model, layer=chosen, coef=c, positions=positions,
                                  allow_mismatch=allow_mismatch) if vector is not None else None
             for c in checked]  # every coefficient checked in the model's dtype before any answer
    with engine_scope(model, engine) as eng:
        for c, spec in zip(checked, specs, strict=True):
            answers.append(generate(model, conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                    seed=seed, progress=progress, task=f"coef {c:+g}", engine=eng, steering=spec))
    rows = [GridAnswer(p, [answers[j][i] for j in range(len(checked))]) for i, p in enumerate(prompts)]
    return GridResult(model_id=model.model_id, trait=vector.trait if vector is not None else None, layer=chosen,
                      positions=positions, coefs=checked, rows=rows)
