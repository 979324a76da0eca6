"""Training-time interventions, active while the Trainer runs and never saved into the adapter.

- preventative steering: add coef × v[L] at every token (the paper steers all positions during training),
  at the vector's layer, a chosen layer, or all layers with incremental vectors;
- CAFT: project the trait direction out of every layer's output;
- projection penalty: an extra loss term, computed by the trainer (see trainer.py), not a hook.

The hooks are plain forward hooks (steering.steer / steering.ablate) attached by a TrainerCallback on
train begin and removed on train end; `paused()` lifts them while a callback measures the model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..errors import PersonavecError
from ..steering import Handle, ablate, check_coef, steering_terms

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector


@dataclass
class Interventions:
    """What to do to the model while it trains. `layer`: None = the vector's layer, an int, or "all"."""

    preventative: PersonaVector | None = None
    coef: float = 0.0
    layer: int | str | None = None
    ablate: PersonaVector | None = None
    penalty: float = 0.0
    penalty_vector: PersonaVector | None = None
    penalty_layer: int | None = None

    def check(self, model: Model, allow_mismatch: bool = False) -> None:
        """Fail before training on vectors for another model, bad coefficients or missing vectors."""
        check_coef(self.coef)
        check_coef(self.penalty)
        if self.penalty < 0:
            raise PersonavecError(f"--projection-penalty must be ≥ 0, got {self.penalty}")
        if self.penalty and self.penalty_vector is None:
            raise PersonavecError("--projection-penalty needs a vector (--vector)")
        if self.preventative is None and self.coef:
            raise PersonavecError("--coef needs --preventative VECTOR")
        for vec in (self.preventative, self.ablate, self.penalty_vector):
            if vec is not None:
                vec.check_model(model, allow_mismatch)
        if isinstance(self.layer, str) and self.layer != "all":
            raise PersonavecError(f"--layer must be a layer number or 'all', got {self.layer!r}")
        if self.preventative is not None and self.coef:  # an overflowing --coef fails before training starts
            steering_terms(model, self.preventative.layer_vectors(model, self.layer, allow_mismatch=allow_mismatch),
                           self.coef)

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the run manifest (vector digests, not paths)."""
        def digest(v: PersonaVector | None) -> str | None:
            return None if v is None else v.digest()

        return {"preventative": digest(self.preventative), "coef": self.coef,
                "layer": self.layer if self.preventative is not None else None,
                "ablate": digest(self.ablate), "penalty": self.penalty,
                "penalty_vector": digest(self.penalty_vector) if self.penalty else None,
                "penalty_layer": self.resolved_penalty_layer() if self.penalty else None}

    def resolved_penalty_layer(self) -> int | None:
        if self.penalty_vector is None:
            return None
        return self.penalty_layer or self.penalty_vector.layer

    @property
    def hooks_needed(self) -> bool:
        return (self.preventative is not None and self.coef != 0) or self.ablate is not None

    def attach(self, model: Model, allow_mismatch: bool = False) -> Handle:
        """Register the hooks; the returned handle removes them all."""
        handle = Handle()
        if self.preventative is not None and self.coef != 0:
            h = self.preventative.steer(model, layer=self.layer, coef=self.coef, positions="all",
                                        allow_mismatch=allow_mismatch)
            handle.hooks.extend(h.hooks)
        if self.ablate is not None:
            vec = self.ablate
            dirs = {layer: vec.at(layer) for layer in range(1, model.n_layers + 1)
                    if torch.isfinite(vec.at(layer).norm()) and float(vec.at(layer).norm()) > 0}
            handle.hooks.extend(ablate(model, dirs, positions="all").hooks)
        return handle


class InterventionCallback(TrainerCallback):
    """Attach the interventions' hooks for the duration of `trainer.train()` only."""

    def __init__(self, model: Model, interventions: Interventions, allow_mismatch: bool = False) -> None:
        self.model = model
        self.interventions = interventions
        self.allow_mismatch = allow_mismatch
        self.handle: Handle | None = None

    @property
    def active(self) -> bool:
        return self.handle is not None and bool(self.handle.hooks)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach()
        self.handle = self.interventions.attach(self.model, self.allow_mismatch)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach()

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run a measurement on the model as it would be saved (no training-time hooks)."""
        was = self.handle is not None
        self.detach()
        try:
            yield
        finally:
            if was:
                self.handle = self.interventions.attach(self.model, self.allow_mismatch)
