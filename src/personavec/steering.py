"""Interventions on the residual stream through forward hooks (never module replacement).

`intervene` is the primitive: at chosen layers, a transform rewrites the block output at chosen
positions. `steer` adds coef × vector[L]; `ablate` projects a direction out (CAFT-style). Each returns a
handle that is also a context manager; after removal the model computes exactly what it did before.

Layer L (1..n_layers) is the output of decoder block L-1, so vector[L] is added by a hook on block L-1.

Positions, for generation with the KV cache and left-padded batches:
  all       every position, every step;
  prompt    every position of the first (prefill) forward, nothing afterwards;
  response  the positions that predict response tokens: the last prompt position in the prefill and
            every generated token afterwards (the persona-vectors paper's convention);
  a bool tensor [batch, seq] for a single cache-free forward, e.g. a full prompt+response sequence.
Padding positions may receive the vector too; they are masked out of attention so nothing reads them.
Which positions a step steers is decided from shapes and the cache length alone, so the hooks never wait
for the device (no host sync per layer and step).

Models split across devices (a `device_map`): each vector is placed on its own block's device when the
hooks are registered, and the per-step position mask is copied to each device once per forward.

Cache-free forwards over whole prompt+response sequences (capture, likelihood scoring, training) declare
each row's prompt length with `sequence_layout(...)`; "prompt" and "response" then mean the same token
positions as during generation. The layout lives in a ContextVar, so concurrent threads never share it.

Per-row steering (a server's batch, in which every request brings its own terms): `RowPositions` names
the positions row by row (None: the row is not touched), and `steer_rows` adds each row's own terms. A row
gets exactly what `steer` would give it alone (the same products coef × vector in the model's dtype, added
one term at a time in the same order); a row without a term at a layer gets exactly zero added there.

Every product coef × vector is computed once, at setup, in the dtype it runs in, and a coefficient that would
overflow there is refused (`scaled_terms`, the one check, which every caller goes through).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from .errors import SteeringError
from .layers import block_output, check_layer, module_device, replace_block_output

if TYPE_CHECKING:
    from .models import Model

Transform = Callable[[torch.Tensor], torch.Tensor]  # hidden [..., h] -> change to add [..., h] (or [h])
STEER_POSITIONS = ("all", "prompt", "response")


@dataclass
class Handle:
    """Removable set of hooks; `with` removes them on exit, `remove()` does it by hand (idempotent)."""

    hooks: list[RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(frozen=True, eq=False)
class RowPositions:
    """Positions chosen row by row for a batch whose rows steer differently: one of STEER_POSITIONS per
    row, or None for a row that this intervention leaves alone. The step mask is built from per-row flags
    kept on the device (no host sync per step); with a `sequence_layout`, "prompt" and "response" follow each
    row's declared prompt length as they do for named positions."""

    rows: tuple[str | None, ...]
    _flags: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        bad = [p for p in self.rows if p is not None and p not in STEER_POSITIONS]
        if bad:
            raise SteeringError(f"unknown positions '{bad[0]}'; choose one of {', '.join(STEER_POSITIONS)}")

    def flags(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[3, batch] 0/1 rows: "all", "prompt", "response" (a row has at most one 1)."""
        key = (device, dtype)
        if key not in self._flags:
            self._flags[key] = torch.tensor([[float(p == name) for p in self.rows] for name in STEER_POSITIONS],
                                            dtype=dtype, device=device)
        return self._flags[key]

    def mask(self, hidden: torch.Tensor, past: int) -> torch.Tensor:
        """[batch, seq, 1] weights (exactly 0 or 1) for this forward step."""
        batch, seq = hidden.shape[:2]
        if batch != len(self.rows):
            raise SteeringError(f"per-row positions for {len(self.rows)} rows do not fit a batch of {batch}")
        every, prompt, response = self.flags(hidden.device, hidden.dtype)[:, :, None]
        if past:  # a cached step: its tokens are response positions
            return (every + response)[..., None]
        layout = _LAYOUT.get()
        cols = torch.arange(seq, device=hidden.device)[None, :]
        plen: torch.Tensor | int = seq
        if layout is not None and layout.shape[0] == batch:
            plen = layout.to(hidden.device)[:, None]
        in_prompt = (cols < plen).to(hidden.dtype)
        from_last = (cols >= plen - 1).to(hidden.dtype)
        return (every + prompt * in_prompt + response * from_last)[..., None]


Positions = str | torch.Tensor | RowPositions

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


_LAYOUT: ContextVar[torch.Tensor | None] = ContextVar("personavec_prompt_lengths", default=None)


@contextmanager
def sequence_layout(prompt_lengths: torch.Tensor) -> Iterator[None]:
    """Declare, for cache-free forwards in this block, where each row's prompt ends (right padding)."""
    token = _LAYOUT.set(prompt_lengths)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def _past_length(hidden: torch.Tensor, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> int:
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is None:  # GPT-2 style blocks get the cache positionally: block(hidden, cache, mask, ...)
        cache = next((a for a in args[1:] if hasattr(a, "get_seq_length")), None)
    if cache is not None:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, tuple) and cache and isinstance(cache[0], torch.Tensor):
            return int(cache[0].shape[-2])
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return int(mask.shape[-1] - hidden.shape[1])
    return 0


def _step_mask(positions: Positions, hidden: torch.Tensor, past: int) -> torch.Tensor | bool | None:
    """[batch, seq, 1] weights for this forward step, None for 'every position', False for 'none' (both
    known from shapes alone, so the hook needs no device sync to skip a step)."""
    batch, seq = hidden.shape[:2]
    if isinstance(positions, RowPositions):
        return positions.mask(hidden, past)
    if isinstance(positions, torch.Tensor):
        if past or positions.shape != (batch, seq):
            raise SteeringError(f"a positions mask of shape {tuple(positions.shape)} does not fit a forward of "
                                f"shape ({batch}, {seq}) with {past} cached tokens; masks are for cache-free forwards")
        return positions.to(hidden.device, hidden.dtype)[..., None]
    if positions == "all":
        return None
    layout = _LAYOUT.get()
    if layout is not None and past == 0 and layout.shape[0] == batch:
        cols = torch.arange(seq, device=hidden.device)[None, :]
        plen = layout.to(hidden.device)[:, None]
        keep = cols < plen if positions == "prompt" else cols >= plen - 1
        return keep.to(hidden.dtype)[..., None]
    if positions == "prompt":
        return None if past == 0 else False
    if past:  # response: every generated token
        return None
    mask = torch.zeros(batch, seq, 1, dtype=hidden.dtype, device=hidden.device)
    mask[:, -1] = 1  # response, prefill: the last prompt position predicts the first response token
    return mask


def _check_positions(positions: Positions) -> None:
    if isinstance(positions, RowPositions):
        return
    if isinstance(positions, torch.Tensor):
        if positions.dim() != 2:
            raise SteeringError("a positions mask must have shape [batch, seq]")
    elif positions not in STEER_POSITIONS:
        raise SteeringError(f"unknown positions '{positions}'; choose one of {', '.join(STEER_POSITIONS)}")


def intervene(model: Model, transforms: Mapping[int, Transform], positions: Positions = "all") -> Handle:
    """Add `transforms[L](h)` to the output h of layer L at `positions` during every forward pass."""
    _check_positions(positions)
    for layer in transforms:
        check_layer(layer, model.n_layers)
    # This forward's position mask: None (all), False (none) or {device: mask}, one copy per block device.
    state: dict[str, Any] = {"mask": None}

    def track(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = _step_mask(positions, hidden, _past_length(hidden, kwargs, args))
        state["mask"] = {mask.device: mask} if isinstance(mask, torch.Tensor) else mask

    def make_hook(fn: Transform) -> Callable[..., Any]:
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            masks = state["mask"]
            if masks is False:
                return output
            hidden = block_output(output)
            delta = fn(hidden)
            if delta.device != hidden.device:
                delta = delta.to(hidden.device)
            if masks is None:
                return replace_block_output(output, hidden + delta)
            mask = masks.get(hidden.device)
            if mask is None:  # a block on another device than block 0: copy once per forward
                mask = masks[hidden.device] = next(iter(masks.values())).to(hidden.device)
            return replace_block_output(output, hidden + delta * mask)
        return hook

    handle = Handle()
    handle.hooks.append(model.layers[0].register_forward_pre_hook(track, with_kwargs=True))
    for layer, fn in sorted(transforms.items()):
        handle.hooks.append(model.layers[layer - 1].register_forward_hook(make_hook(fn)))
    return handle


def check_coef(coef: float) -> float:
    if not isinstance(coef, int | float) or not math.isfinite(coef):
        raise SteeringError(f"coefficient must be a finite number, got {coef!r}")
    return float(coef)


def _as_vector(model: Model, layer: int, vector: torch.Tensor) -> torch.Tensor:
    """The vector in the model's dtype on the device of block L-1 (the block whose output it changes)."""
    check_layer(layer, model.n_layers)
    if vector.shape != (model.hidden_size,):
        raise SteeringError(f"vector for layer {layer} has shape {tuple(vector.shape)}, the model's hidden size is "
                            f"{model.hidden_size}")
    return vector.to(module_device(model.layers[layer - 1]) or model.device, model.dtype)


Term = tuple[int, float, torch.Tensor]  # (layer, coef, vector in the dtype and on the device it will run in)


def scaled_terms(terms: Sequence[Term]) -> list[torch.Tensor]:
    """coef × vector for each term, computed once in the vector's own dtype (the dtype it will run in) and
    refused with a SteeringError where it does not fit there. A float64-finite coefficient can still overflow
    a float32 or bfloat16 product, or make its squared norm overflow: the next norm layer squares the hidden
    state (in float32 at least), every later layer then reads inf or NaN and the model answers nothing. One
    host sync for all terms (setup only; the hooks never check)."""
    products = [check_coef(coef) * vector for _, coef, vector in terms]
    if not products:
        return products
    first = products[0].device
    fits = torch.stack([_fits(p).to(first) for p in products])
    if not bool(fits.all()):
        layer, coef, vector = terms[int((~fits).nonzero()[0])]
        raise _overflow_error(layer, coef, vector)
    return products


def _fits(product: torch.Tensor) -> torch.Tensor:
    """Whether the sum of squares a norm layer takes of `product` is finite (so is every element then)."""
    wide = torch.promote_types(product.dtype, torch.float32)
    return torch.isfinite(product.to(wide).pow(2).sum())


def _overflow_error(layer: int, coef: float, vector: torch.Tensor) -> SteeringError:
    """The one-line refusal, with the largest coefficient magnitude that fits this vector."""
    name = str(vector.dtype).removeprefix("torch.")
    v = vector.detach().double()
    if not bool(torch.isfinite(v).all()):
        return SteeringError(f"the vector at layer {layer} holds NaN or infinite values in {name}; steer with a "
                             "finite vector")
    wide = torch.promote_types(vector.dtype, torch.float32)
    limit = min(torch.finfo(wide).max ** 0.5 / float(v.norm()), torch.finfo(vector.dtype).max / float(v.abs().max()))
    return SteeringError(f"coefficient {coef:g} at layer {layer} overflows {name} (coef × vector would leave the "
                         f"model answering nothing); use a smaller coefficient, below about {limit:.2g} in magnitude")


def steering_terms(model: Model, vectors: Mapping[int, torch.Tensor], coef: float) -> dict[int, torch.Tensor]:
    """{L: coef × vectors[L]}: what `steer` adds, in the model's dtype on block L-1's device, refused where it
    would overflow (see `scaled_terms`). Callers that steer later call it to fail before doing any work."""
    placed = [(layer, coef, _as_vector(model, layer, v)) for layer, v in vectors.items()]
    return dict(zip(vectors, scaled_terms(placed), strict=True))


def _placed(t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`t` on the device and in the dtype of the hidden state it meets. Vectors are placed on their block's
    device up front, so this copies only where a block's device could not be known in advance (once each)."""
    copies = {(t.device, t.dtype): t}

    def get(h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in copies:
            copies[key] = t.to(h.device, h.dtype)
        return copies[key]

    return get


def steer(model: Model, vectors: Mapping[int, torch.Tensor], coef: float = 1.0,
          positions: Positions = "response") -> Handle:
    """Add coef × vectors[L] to the output of each layer L. Use as `with steer(...):` or keep the handle."""
    c = check_coef(coef)
    if c == 0.0:  # an exact no-op, not a different code path: no hooks at all
        _check_positions(positions)
        for layer in vectors:
            check_layer(layer, model.n_layers)
        return Handle()

    terms = steering_terms(model, vectors, c)
    return intervene(model, {layer: _placed(term) for layer, term in terms.items()}, positions)


def ablate(model: Model, directions: Mapping[int, torch.Tensor], positions: Positions = "all") -> Handle:
    """Project each direction out of layer L's output: h − (h·u)u with u = direction/|direction|."""
    units = {}
    for layer, v in directions.items():
        u = _as_vector(model, layer, v).float()
        norm = u.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise SteeringError(f"cannot ablate a zero or non-finite direction at layer {layer}")
        units[layer] = (u / norm).to(model.dtype)

    def project_out(u: torch.Tensor) -> Transform:
        place = _placed(u)

        def fn(h: torch.Tensor) -> torch.Tensor:
            unit = place(h)
            return -(h @ unit)[..., None] * unit
        return fn

    return intervene(model, {layer: project_out(u) for layer, u in units.items()}, positions)


RowTerm = tuple[int, torch.Tensor, float, str]  # (layer, vector, coef, positions): one steering term of one row


class RowSteering:
    """Per-row steering terms of one batch, prepared once: for each layer and each term slot at that layer,
    the rows' products coef × vector[L] (model dtype, on block L-1's device; zeros for rows without such a
    term) stacked into one [batch, 1, hidden] tensor, with the rows' positions. `attach()` puts the hooks on
    (one `intervene` per layer and slot, slots in each row's order) for as many forwards as the batch keeps
    its rows; `select` keeps some rows without recomputing anything.

    `rows[i]` lists row i's terms as (layer, vector, coef, positions); coefficient-0 terms are dropped, as
    `steer` drops them. A row alone in a batch of one computes exactly what `steer` with its terms (entered
    in order) computes: the same products, added one term at a time in the same order, times a 0/1 mask."""

    def __init__(self, model: Model, rows: Sequence[Sequence[RowTerm]]) -> None:
        self.model = model
        self.n_rows = len(rows)
        steered: list[tuple[int, int, str]] = []  # (row, layer, positions) of each nonzero term
        placed: list[Term] = []
        for i, terms in enumerate(rows):
            for layer, vector, coef, positions in terms:
                c = check_coef(coef)
                _check_positions(positions)
                v = _as_vector(model, layer, vector)
                if c != 0.0:
                    steered.append((i, layer, positions))
                    placed.append((layer, c, v))
        per_row: list[dict[int, list[tuple[torch.Tensor, str]]]] = [{} for _ in rows]
        for (i, layer, positions), product in zip(steered, scaled_terms(placed), strict=True):
            per_row[i].setdefault(layer, []).append((product, positions))
        self.plan: list[tuple[int, torch.Tensor, RowPositions]] = []
        for layer in sorted({ly for r in per_row for ly in r}):
            for slot in range(max(len(r.get(layer, ())) for r in per_row)):
                entries = [r[layer][slot] if slot < len(r.get(layer, ())) else None for r in per_row]
                ref = next(e[0] for e in entries if e is not None)
                zero = torch.zeros_like(ref)
                delta = torch.stack([zero if e is None else e[0] for e in entries])[:, None, :]
                self.plan.append((layer, delta, RowPositions(tuple(None if e is None else e[1] for e in entries))))

    @classmethod
    def _from_plan(cls, model: Model, n_rows: int, plan: list[tuple[int, torch.Tensor, RowPositions]]) -> RowSteering:
        out = cls.__new__(cls)
        out.model, out.n_rows, out.plan = model, n_rows, plan
        return out

    @property
    def is_noop(self) -> bool:
        return not self.plan

    def select(self, rows: Sequence[int]) -> RowSteering:
        """The same steering for a batch that keeps only `rows` (in that order)."""
        plan = []
        for layer, delta, pos in self.plan:
            kept = tuple(pos.rows[i] for i in rows)
            if any(p is not None for p in kept):
                index = torch.tensor(list(rows), dtype=torch.long, device=delta.device)
                plan.append((layer, delta.index_select(0, index), RowPositions(kept)))
        return RowSteering._from_plan(self.model, len(rows), plan)

    def attach(self) -> Handle:
        """Put the hooks on; the returned handle (a context manager) takes them off."""
        handle = Handle()
        try:
            for layer, delta, pos in self.plan:
                handle.hooks.extend(intervene(self.model, {layer: _placed(delta)}, pos).hooks)
        except BaseException:
            handle.remove()
            raise
        return handle


def steer_rows(model: Model, rows: Sequence[Sequence[RowTerm]]) -> Handle:
    """Steer each row of a batch with its own terms (layer, vector, coef, positions); see `RowSteering`.
    A row with no terms computes exactly what it computes unsteered."""
    return RowSteering(model, rows).attach()
