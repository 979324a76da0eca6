"""Steering specs (a request's `steer`, a steered model name's terms) turned into the engine's checked
`SteerTerm`s: the vector must be loaded, the layer inside the model (layer L = output of block L), and
coef × vector[layer] must fit the model's dtype by steering's own rule (`steering.scaled_terms`: an
overflowing product would leave the model answering nothing), checked here so that such a term is a 400
naming its coefficient before the request is queued."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SteeringError, VectorError
from ..steering import scaled_terms
from .engine import SteerTerm
from .schemas import ApiError, SteerSpec

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector


def resolve_steer(vectors: Mapping[str, PersonaVector], model: Model, specs: Sequence[SteerSpec],
                  where: str) -> list[SteerTerm]:
    """The terms of `specs`; a bad one is a 400 naming its parameter (`where`.i.vector / .layer / .coef)."""
    terms = []
    for i, s in enumerate(specs):
        vec = vectors.get(s.vector)
        if vec is None:
            raise ApiError(400, f"unknown vector '{s.vector}'; this server has: {', '.join(vectors) or 'none'}",
                           param=f"{where}.{i}.vector", code="unknown_vector")
        layer = s.layer if s.layer is not None else vec.layer
        if not 1 <= layer <= model.n_layers:
            raise ApiError(400, f"layer {layer} is out of range 1..{model.n_layers} (layer L = output of "
                           "decoder block L)", param=f"{where}.{i}.layer")
        direction = vec.at(layer)
        try:  # steering's own rule, in the model's dtype but on the vector's (host) copy: no device work here
            scaled_terms([(layer, float(s.coef), direction.detach().cpu().to(model.dtype))])
        except SteeringError as exc:
            raise ApiError(400, str(exc), param=f"{where}.{i}.coef") from None
        terms.append(SteerTerm(s.vector, layer, float(s.coef), s.positions, direction))
    return terms


def steered_models(vectors: Mapping[str, PersonaVector], model: Model, served: str,
                   specs: Mapping[str, Sequence[SteerSpec | Mapping[str, Any]]]) -> dict[str, list[SteerTerm]]:
    """{name: terms} of the operator's steered model names; a bad one stops the server before it starts
    (VectorError), so a typo is never answered as a 400 to every client."""
    steered: dict[str, list[SteerTerm]] = {}
    for name, terms in specs.items():
        if name == served or not name:
            raise VectorError(f"steered model name '{name}' must differ from the served model's name")
        try:
            steered[name] = resolve_steer(vectors, model, [SteerSpec.model_validate(s) for s in terms], name)
        except ApiError as exc:
            raise VectorError(f"steered model '{name}': {exc.message}") from None
        except ValueError as exc:
            raise VectorError(f"steered model '{name}': {exc}") from None
    return steered
