"""Projections of residual-stream activations onto persona vectors: the monitoring signal.

A projection is the activation's component along the unit vector, a·v/‖v‖, at the vector's layer (its
sweep-chosen layer unless told otherwise). Three readings, all built on the two primitives:
  * `project`: per sample, from one cache-free forward over prompt + response (capture's per-sample
    reductions: "last_prompt" predicts the answer before it is written; "response" is the response-token
    mean used by screening and the paper's monitoring);
  * `watch`: per token while the model runs (generation with the KV cache, streaming), read-only hooks;
  * `directions`: the unit vectors themselves, for callers that hold activations already.
Layer numbering: L = output of decoder block L (1..n_layers; a reading at layer L hooks block L-1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .capture import Sample, iter_reductions
from .errors import VectorError
from .layers import block_output, check_layer
from .progress import Progress, no_progress

if TYPE_CHECKING:
    from .models import Model
    from .vectors import PersonaVector

Layers = int | Mapping[str, int] | None


def layer_for(name: str, vector: PersonaVector, layers: Layers) -> int:
    """The layer at which `name`'s projection is read: an explicit int, a per-trait mapping, or the vector's own."""
    if isinstance(layers, int):
        return layers
    if isinstance(layers, Mapping) and name in layers:
        return int(layers[name])
    return vector.layer


def directions(vectors: Mapping[str, PersonaVector], layers: Layers = None,
               position: str = "response") -> dict[str, tuple[int, torch.Tensor]]:
    """{name: (layer, unit vector [hidden] float32)} for each vector at its reading layer."""
    out: dict[str, tuple[int, torch.Tensor]] = {}
    for name, vec in vectors.items():
        layer = layer_for(name, vec, layers)
        v = vec.at(layer, position).float()
        norm = float(v.norm())
        if not norm > 0:
            raise VectorError(f"vector '{name}' is zero at layer {layer}; choose another layer")
        out[name] = (layer, v / norm)
    return out


def project(model: Model, samples: Sequence[Sample], vectors: Mapping[str, PersonaVector], *,
            layers: Layers = None, positions: Sequence[str] = ("last_prompt", "response"),
            vector_position: str = "response", batch_size: int = 16, max_tokens: int = 16384,
            progress: Progress = no_progress, task: str = "project") -> dict[str, dict[str, torch.Tensor]]:
    """{name: {position: [n_samples] float32}}: each sample's reduction at the vector's layer, projected on
    its unit vector. Batched, length-sorted and padding-aware through `iter_reductions`; the forward pass
    stops at the deepest layer any vector needs. A "response" reading of a sample without response tokens
    is NaN (there is nothing to average), never a silent 0."""
    if not vectors:
        raise VectorError("no vectors to project on; pass at least one")
    for vec in vectors.values():
        vec.check_model(model, allow_mismatch=True)
    dirs = directions(vectors, layers, vector_position)
    wanted = sorted({check_layer(layer, model.n_layers) for layer, _ in dirs.values()})
    slot = {layer: k for k, layer in enumerate(wanted)}
    result = {name: {p: torch.full((len(samples),), float("nan")) for p in positions} for name in vectors}
    for group, out in iter_reductions(model, samples, layers=wanted, positions=positions, batch_size=batch_size,
                                      max_tokens=max_tokens, progress=progress, task=task):
        idx = torch.tensor(group)
        for name, (layer, unit) in dirs.items():
            for p in positions:
                result[name][p][idx] = (out[p][:, slot[layer]] @ unit.to(out[p].device)).cpu()
    if "response" in positions:
        empty = torch.tensor([len(s.response) == 0 for s in samples], dtype=torch.bool)
        for name in vectors:
            result[name]["response"][empty] = float("nan")
    return result


@dataclass
class Watch:
    """Per-token projections recorded by `watch`: one [batch, seq, n_names] tensor per forward call
    (with the KV cache: the prefill, then one step per generated token)."""

    names: list[str]
    steps: list[torch.Tensor] = field(default_factory=list)

    def tokens(self) -> torch.Tensor:
        """All recorded positions in order: [batch, total_positions, n_names] (empty before any forward)."""
        if not self.steps:
            return torch.zeros(0, 0, len(self.names))
        return torch.cat(self.steps, dim=1)


@contextmanager
def watch(model: Model, dirs: Mapping[str, tuple[int, torch.Tensor]]) -> Iterator[Watch]:
    """Read-only hooks that record, for every forward pass while the block is active, the projection of
    every position's activation on each unit direction (from `directions`). Nothing is changed in the
    model's computation; the hooks are removed on exit, even after an error.

    With left-padded generation, the prefill's last position is the last prompt token, and the activation
    of generated token i is recorded at step i + 1 (the step that reads it back)."""
    names = list(dirs)
    record = Watch(names=names)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for k, name in enumerate(names):
        by_layer[check_layer(dirs[name][0], model.n_layers)].append(k)
    pending: dict[int, torch.Tensor] = {}
    deepest = max(by_layer)

    def store(layer: int, hidden: torch.Tensor) -> None:
        mat = torch.stack([dirs[names[k]][1] for k in by_layer[layer]]).to(hidden.device)
        vals = hidden.detach().float() @ mat.T
        if not pending:
            pending[-1] = torch.zeros(*hidden.shape[:2], len(names))
        for j, k in enumerate(by_layer[layer]):
            pending[-1][:, :, k] = vals[:, :, j].cpu()
        if layer == deepest:
            record.steps.append(pending.pop(-1))

    handles = [model.layers[layer - 1].register_forward_hook(
        lambda _m, _a, out, layer=layer: store(layer, block_output(out))) for layer in sorted(by_layer)]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()
