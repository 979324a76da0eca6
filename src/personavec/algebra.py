"""Vector algebra and comparison for persona vectors of one model.

Combinations are linear, layer by layer and position by position: ``combine([(1, evil), (-0.5, humorous)])``
is evil − 0.5 × humorous at every layer. Inputs must have the same shape and weight fingerprint (a direction
of one model means nothing in another's residual stream); the result records its inputs (trait, digest,
coefficient, source) under ``meta["algebra"]`` so its provenance survives. A sweep's chosen layer is kept only
when every input agrees on it; a chosen coefficient is dropped (its scale no longer applies).

``cosine_matrix`` compares traits at one layer (the paper's trait-correlation figure); ``cosine_by_layer``
gives the same for every layer. Layer L is the output of decoder block L (1-based); 0 is the embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import VectorError
from .vectors import PersonaVector, now_iso

Term = tuple[float, PersonaVector]


def _label(vec: PersonaVector, source: str | None) -> str:
    return f"'{source}'" if source else f"'{vec.trait}'"


def check_compatible(vectors: Sequence[PersonaVector], sources: Sequence[str | None] | None = None,
                     allow_mismatch: bool = False) -> list[str]:
    """Raise VectorError unless all vectors share shape and weights (and a position); return the common
    positions in the first vector's order."""
    if not vectors:
        raise VectorError("no vectors given")
    names = [_label(v, s) for v, s in zip(vectors, sources or [None] * len(vectors), strict=True)]
    first = vectors[0]
    for vec, name in zip(vectors[1:], names[1:], strict=True):
        if (vec.n_layers, vec.hidden_size) != (first.n_layers, first.hidden_size):
            raise VectorError(f"{name} has shape [{vec.n_layers + 1}, {vec.hidden_size}] but {names[0]} has "
                              f"[{first.n_layers + 1}, {first.hidden_size}]; combine vectors of one model")
        fa, fb = first.meta.get("fingerprint"), vec.meta.get("fingerprint")
        if fa and fb and fa != fb and not allow_mismatch:
            raise VectorError(f"{name} comes from {vec.meta.get('model_id')} (weights {fb}) and {names[0]} from "
                              f"{first.meta.get('model_id')} (weights {fa}); combine vectors of one model or pass "
                              "--allow-model-mismatch")
    common = [p for p in first.tensors if all(p in v.tensors for v in vectors[1:])]
    if not common:
        raise VectorError(f"{', '.join(names)} share no capture position; they cannot be combined")
    return common


def combine(terms: Sequence[Term], *, trait: str | None = None, op: str | None = None,
            sources: Sequence[str | None] | None = None, allow_mismatch: bool = False) -> PersonaVector:
    """Σ coef_i × vector_i over the positions all inputs have, with provenance in the metadata."""
    vectors = [v for _, v in terms]
    srcs = list(sources) if sources is not None else [None] * len(terms)
    positions = check_compatible(vectors, srcs, allow_mismatch)
    tensors = {p: sum((c * v.tensors[p].float() for c, v in terms), torch.zeros_like(vectors[0].tensors[p].float()))
               for p in positions}
    expr = op or " ".join(f"{'+' if c >= 0 else '-'} {abs(c):g}*{v.trait}" for c, v in terms).removeprefix("+ ")
    inputs = [{"trait": v.trait, "coef": c, "digest": v.digest(), "source": s}
              for (c, v), s in zip(terms, srcs, strict=True)]
    return PersonaVector(tensors=tensors, meta=_meta(vectors, trait or _default_name(terms), expr, inputs, positions))


def _default_name(terms: Sequence[Term]) -> str:
    if len(terms) == 1:
        return terms[0][1].trait
    return "".join(("+" if c >= 0 else "-") + v.trait for c, v in terms).lstrip("+")[:64]


def _meta(vectors: Sequence[PersonaVector], trait: str, expr: str, inputs: list[dict[str, Any]],
          positions: list[str]) -> dict[str, Any]:
    from . import __version__

    first = vectors[0].meta
    keep = ("model_id", "fingerprint", "hidden_size", "n_layers", "layer_convention")
    meta: dict[str, Any] = {k: first[k] for k in keep if k in first}
    meta.update(trait=trait, positions=positions, version=__version__, created=now_iso(),
                algebra={"op": expr, "inputs": inputs})
    chosen = {v.meta.get("best_layer") for v in vectors}
    if len(chosen) == 1 and None not in chosen:
        meta["best_layer"] = chosen.pop()
    return meta


def add(*vectors: PersonaVector, trait: str | None = None, **kw: Any) -> PersonaVector:
    return combine([(1.0, v) for v in vectors], trait=trait, **kw)


def subtract(a: PersonaVector, b: PersonaVector, *, trait: str | None = None, **kw: Any) -> PersonaVector:
    return combine([(1.0, a), (-1.0, b)], trait=trait, **kw)


def scale(vec: PersonaVector, factor: float, *, trait: str | None = None, **kw: Any) -> PersonaVector:
    return combine([(factor, vec)], trait=trait, op=f"{factor:g}*{vec.trait}", **kw)


def normalize(vec: PersonaVector, norm: float = 1.0, *, trait: str | None = None,
              source: str | None = None) -> PersonaVector:
    """Every layer's row rescaled to length `norm` (zero rows stay zero): directions only, so a coefficient
    means the same step size at every layer."""
    if norm <= 0:
        raise VectorError(f"the target norm must be positive, got {norm:g}")
    tensors = {}
    for p, t in vec.tensors.items():
        t = t.float()
        lengths = t.norm(dim=1, keepdim=True)
        tensors[p] = torch.where(lengths > 0, t * (norm / lengths.clamp_min(1e-12)), torch.zeros_like(t))
    meta = _meta([vec], trait or vec.trait, f"normalize({vec.trait}, {norm:g})",
                 [{"trait": vec.trait, "coef": None, "digest": vec.digest(), "source": source}], list(tensors))
    meta["normalized_to"] = norm
    return PersonaVector(tensors=tensors, meta=meta)


def cosine_by_layer(vectors: Sequence[PersonaVector], position: str = "response",
                    allow_mismatch: bool = False) -> torch.Tensor:
    """[n_layers + 1, n, n] cosine similarities between the vectors at every layer (0 where a row is zero)."""
    positions = check_compatible(vectors, allow_mismatch=allow_mismatch)
    if position not in positions:
        raise VectorError(f"not every vector has a '{position}' tensor; common positions: {', '.join(positions)}")
    stack = torch.stack([v.tensors[position].float() for v in vectors], dim=1)  # [layers, n, hidden]
    unit = stack / stack.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.transpose(1, 2)


def cosine_matrix(vectors: Sequence[PersonaVector], layer: int, position: str = "response",
                  allow_mismatch: bool = False) -> torch.Tensor:
    """[n, n] cosine similarities between the vectors at `layer` (output of block `layer`)."""
    if vectors and not 0 <= layer <= vectors[0].n_layers:
        raise VectorError(f"layer {layer} is out of range 0..{vectors[0].n_layers}")
    return cosine_by_layer(vectors, position, allow_mismatch)[layer]
