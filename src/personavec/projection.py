"""Projections of residual-stream activations onto persona vectors: the monitoring signal.

A projection is the activation's component along the unit vector, a·v/‖v‖, at the vector's layer (its
sweep-chosen layer unless told otherwise). Three readings, all built on the two primitives:
  * `project`: per sample, from one cache-free forward over prompt + response (capture's per-sample
    reductions: "last_prompt" predicts the answer before it is written; "response" is the response-token
    mean used by screening and the paper's monitoring); `project_prompts` is its prompt-only shortcut;
  * `watch`: per token while the model runs (generation with the KV cache, streaming), through `capture.read`;
  * `directions`: the unit vectors themselves, for callers that hold activations already.
Layer numbering: L = output of decoder block L (1..n_layers; a reading at layer L hooks block L-1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .capture import Sample, iter_reductions, read
from .errors import VectorError
from .layers import check_layer
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
            progress: Progress = no_progress, task: str = "project",
            allow_mismatch: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {position: [n_samples] float32}}: each sample's reduction at the vector's layer, projected on
    its unit vector. Batched, length-sorted and padding-aware through `iter_reductions`; the forward pass
    stops at the deepest layer any vector needs. A "response" reading of a sample without response tokens
    is NaN (there is nothing to average), never a silent 0. Vectors of another shape are always refused,
    vectors of other weights only with allow_mismatch=False."""
    if not vectors:
        raise VectorError("no vectors to project on; pass at least one")
    if any(not s.prompt for s in samples):
        raise ValueError("every sample needs at least one prompt token (the chat template adds some)")
    for vec in vectors.values():
        vec.check_model(model, allow_mismatch=allow_mismatch)
    dirs = directions(vectors, layers, vector_position)
    wanted = sorted({check_layer(layer, model.n_layers) for layer, _ in dirs.values()})
    slot = {layer: k for k, layer in enumerate(wanted)}
    result = {name: {p: torch.full((len(samples),), float("nan")) for p in positions} for name in vectors}
    if not samples:
        return result
    # iter_reductions holds its hooks only during each forward pass, so a failure here leaves none behind.
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


def project_prompts(model: Model, prompts: Sequence[list[int]], vectors: Mapping[str, PersonaVector], *,
                    layers: Layers = None, vector_position: str = "response", batch_size: int = 16,
                    max_tokens: int = 16384, progress: Progress = no_progress, task: str = "project",
                    allow_mismatch: bool = True) -> dict[str, torch.Tensor]:
    """{name: [n_prompts]}: the last-prompt-token projection of rendered prompts (generation prompt
    included), the prediction made before any answer token exists."""
    out = project(model, [Sample(list(p), []) for p in prompts], vectors, layers=layers, positions=("last_prompt",),
                  vector_position=vector_position, batch_size=batch_size, max_tokens=max_tokens,
                  progress=progress, task=task, allow_mismatch=allow_mismatch)
    return {name: v["last_prompt"] for name, v in out.items()}


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

    def prompt_last(self) -> torch.Tensor:
        """[batch, n_names]: the last position of the first forward; with left-padded generation, each
        row's last prompt token (the reading that predicts the answer)."""
        if not self.steps:
            raise ValueError("nothing was recorded: no forward pass ran inside the watch")
        return self.steps[0][:, -1]

    def generated(self) -> torch.Tensor:
        """[batch, n_steps - 1, n_names]: generated token k's activation, read when it is fed back at step
        k + 1. The last generated token is never fed back, so it has no reading."""
        if not self.steps:
            raise ValueError("nothing was recorded: no forward pass ran inside the watch")
        later = self.steps[1:]
        if not later:
            return torch.zeros(self.steps[0].shape[0], 0, len(self.names))
        return torch.cat(later, dim=1)

    def response_mean(self, lengths: Sequence[int]) -> torch.Tensor:
        """[batch, n_names]: mean over each row's first `lengths[i]` response tokens that were read back
        (NaN where none was). It equals `project(...)["response"]` of the same answer when the answer
        ended with an end token; an answer cut by max_new_tokens lacks its last token's reading."""
        gen = self.generated()
        if len(lengths) != gen.shape[0]:
            raise ValueError(f"{len(lengths)} lengths for a batch of {gen.shape[0]} rows")
        width = gen.shape[1]
        n = torch.tensor([min(int(k), width) for k in lengths])
        mask = (torch.arange(width)[None, :] < n[:, None]).float()
        sums = torch.einsum("bt,btn->bn", mask, gen)
        mean = sums / n.clamp_min(1)[:, None]
        mean[n == 0] = float("nan")
        return mean


#: Watches that record only forwards run in the context (thread or task) that opened them.
_ISOLATED: ContextVar[frozenset[int]] = ContextVar("personavec_watches", default=frozenset())


@contextmanager
def watch(model: Model, dirs: Mapping[str, tuple[int, torch.Tensor]], *, isolated: bool = False) -> Iterator[Watch]:
    """Read-only hooks that record, for every forward pass while the block is active, the projection of
    every position's activation on each unit direction (from `directions`). Nothing is changed in the
    model's computation; the hooks are removed on exit, even after an error. A forward that stops early
    (an error, capture's early stop) leaves no partial step behind.

    With left-padded generation, the prefill's last position is the last prompt token, and the activation
    of generated token i is recorded at step i + 1 (the step that reads it back); left-padding positions
    of the prefill hold meaningless values. `isolated=True` records only forward passes run in this
    context (a contextvars context: this thread, or an asyncio task), so concurrent requests that each
    open a watch never see each other's passes; a thread started inside the block must then run in a
    copy of this context (contextvars.copy_context().run)."""
    names = list(dirs)
    if not names:
        raise VectorError("no directions to watch; pass at least one")
    record = Watch(names=names)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for k, name in enumerate(names):
        by_layer[check_layer(dirs[name][0], model.n_layers)].append(k)
    mats = {layer: torch.stack([dirs[names[k]][1].float() for k in ks]) for layer, ks in by_layer.items()}
    first, deepest = min(by_layer), max(by_layer)
    pending: dict[str, torch.Tensor] = {}
    key = id(record)

    def store(layer: int, hidden: torch.Tensor) -> None:
        if isolated and key not in _ISOLATED.get():
            return
        if layer == first:  # a new forward pass starts here: drop what an interrupted one left
            pending["row"] = torch.zeros(*hidden.shape[:2], len(names))
        elif "row" not in pending:
            return
        mat = mats[layer].to(hidden.device)
        vals = (hidden.detach().float() @ mat.T).cpu()
        pending["row"][:, :, by_layer[layer]] = vals
        if layer == deepest:
            record.steps.append(pending.pop("row"))

    token = _ISOLATED.set(_ISOLATED.get() | {key}) if isolated else None
    try:
        with read(model, by_layer, store):
            yield record
    finally:
        if token is not None:
            _ISOLATED.reset(token)
