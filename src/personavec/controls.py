"""Control directions for steering experiments: what a trait's effect is compared against.

- ``random_like(v, seed)``: a seeded Gaussian direction with v's norm at every layer and position, so any
  effect it has is what "pushing the residual stream this hard" does without the trait's direction;
- ``matched_norm(other, v)``: another trait's vector rescaled to v's per-layer norm, so a cross-trait
  comparison at the same layer and coefficient differs only in direction.
A trait vector earns its name when it moves its own measure more than both."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .algebra import check_compatible
from .errors import PersonavecError
from .vectors import PersonaVector

RANDOM = "random"


def random_like(vector: PersonaVector, seed: int = 0) -> PersonaVector:
    """A seeded random direction with the same norm as `vector` at every layer and position."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for pos, t in vector.tensors.items():
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        norms = t.float().norm(dim=1, keepdim=True)
        tensors[pos] = noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-12) * norms
    meta = {k: v for k, v in vector.meta.items() if k not in ("best_layer", "best_coef", "trait")}
    return PersonaVector(tensors, {**meta, "trait": f"{RANDOM}{seed}", "control": {"kind": RANDOM, "seed": seed,
                                                                                    "like": vector.trait}})


def matched_norm(other: PersonaVector, like: PersonaVector) -> PersonaVector:
    """`other` rescaled to `like`'s norm at every layer and position (their shared positions)."""
    positions = check_compatible([like, other])
    tensors = {}
    for pos in positions:
        a, b = like.tensors[pos].float(), other.tensors[pos].float()
        tensors[pos] = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12) * a.norm(dim=1, keepdim=True)
    return PersonaVector(tensors, {**other.meta, "control": {"kind": "trait", "like": like.trait}})


def make_controls(specs: Sequence[str], vector: PersonaVector, seed: int = 0) -> dict[str, PersonaVector]:
    """Controls named by the CLI: 'random' (or 'random:SEED') and vector files, each matched to `vector`'s
    per-layer norm. Keys are the labels results carry ('random0', or the other vector's trait name)."""
    out: dict[str, PersonaVector] = {}
    for spec in specs:
        if spec == RANDOM or spec.startswith(f"{RANDOM}:"):
            text = spec.partition(":")[2]
            try:
                s = int(text) if text else seed
            except ValueError:
                raise PersonavecError(f"--control {spec}: the seed after 'random:' must be an integer") from None
            ctrl = random_like(vector, s)
        else:
            ctrl = matched_norm(PersonaVector.load(Path(spec)), vector)
        name = ctrl.trait
        while name in out or name == vector.trait:
            name += "'"
        out[name] = ctrl
    return out
