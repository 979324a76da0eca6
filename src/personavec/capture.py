"""Activation capture: `read` is the one primitive that reads block outputs (read-only forward hooks,
removed on exit, with an optional early stop after the deepest layer needed); on it stand the per-sample
reductions of the residual stream at chosen layers (`iter_reductions`, `capture_means`), computed inside
the hooks so that no [batch, tokens, hidden] tensor outlives its layer, with the forward pass stopped right
after the last layer needed (the LM head never runs), and also `projection.watch` and the trainer's
projection penalty.

Cache-free capture forwards declare each row's prompt length (`steering.sequence_layout`), so steering that
is active meanwhile ("prompt" / "response" positions) acts on the same tokens as during generation.

Layer numbering: 0 = embedding output (input of block 0), L = output of decoder block L-1."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .chat import batches_by_length, pad_batch
from .errors import LayerError
from .layers import block_output
from .progress import Progress, no_progress
from .steering import sequence_layout

if TYPE_CHECKING:
    from .models import Model

#: Reductions of a (prompt, response) sample: mean over response tokens, mean over prompt tokens,
#: the last prompt token (whose projection predicts the answer), mean over all tokens.
POSITIONS = ("response", "prompt", "last_prompt", "all")


@dataclass(frozen=True)
class Sample:
    """Token ids of a rendered chat prompt (system + user + generation prompt) and of the answer."""

    prompt: list[int]
    response: list[int]


class _Stop(Exception):
    """Raised by `read`'s hook on the deepest layer to end a forward pass early. It carries a token of the
    reading that raised it, so a reading nested in another only ever ends its own forward; a fresh instance
    per stop (never one kept in the hook's closure) lets the forward's frames and activations go at once."""


Reader = Callable[[int, torch.Tensor], None]  # (layer, hidden [batch, seq, hidden]) -> None


@contextmanager
def read(model: Model, layers: Iterable[int], fn: Reader, *, stop_after: bool = False) -> Iterator[None]:
    """THE way to read block outputs: call `fn(layer, hidden)` with the output of every layer in `layers`
    (0 = embedding output, the input of block 0; L = output of block L-1) in each forward pass run inside
    the block. `hidden` is the block's own tensor (on its block's device, in the model's dtype, with its
    autograd graph): detach it to keep it past the step, or reduce it in `fn`. Nothing in the model's
    computation changes; the hooks are removed on exit, even after an error.

    `stop_after=True` ends each forward right after the deepest layer was read (later blocks and the LM
    head never run) and swallows that stop on exit, so the block should hold exactly one forward pass:
    `with read(model, layers, fn, stop_after=True): model.hf(...)`."""
    wanted = sorted(set(layers))
    n = model.n_layers
    if not wanted or wanted[0] < 0 or wanted[-1] > n:
        raise LayerError(f"read layers must lie in 0..{n} (0 = embeddings), got {wanted}")
    last = wanted[-1]
    token = object()

    def call(layer: int, hidden: torch.Tensor) -> None:
        fn(layer, hidden)
        if stop_after and layer == last:
            raise _Stop(token)

    handles = []
    try:
        if wanted[0] == 0:
            handles.append(model.layers[0].register_forward_pre_hook(
                lambda _m, args, kwargs: call(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        for layer in wanted:
            if layer > 0:
                handles.append(model.layers[layer - 1].register_forward_hook(
                    lambda _m, _a, out, layer=layer: call(layer, block_output(out))))
        yield
    except _Stop as exc:
        if not exc.args or exc.args[0] is not token:
            raise
    finally:
        for h in handles:
            h.remove()


def _masks(samples: Sequence[Sample], width: int, device: torch.device) -> dict[str, torch.Tensor]:
    plen = torch.tensor([len(s.prompt) for s in samples], device=device)
    total = plen + torch.tensor([len(s.response) for s in samples], device=device)
    pos = torch.arange(width, device=device)[None, :]
    prompt = (pos < plen[:, None]).float()
    response = ((pos >= plen[:, None]) & (pos < total[:, None])).float()
    return {"prompt": prompt, "response": response, "all": prompt + response,
            "last_prompt": (plen - 1).long()}


def _reduce(hidden: torch.Tensor, position: str, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    h = hidden.float()
    if position == "last_prompt":
        return h[torch.arange(h.shape[0], device=h.device), masks["last_prompt"]]
    mask = masks[position]
    return torch.einsum("bt,bth->bh", mask, h) / mask.sum(1, keepdim=True).clamp_min(1.0)


def iter_reductions(model: Model, samples: Sequence[Sample], *, layers: Sequence[int] | None = None,
                    positions: Sequence[str] = ("response",), batch_size: int = 16,
                    max_tokens: int = 16384, progress: Progress = no_progress,
                    task: str = "capture") -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield (sample indices, {position: [batch, len(layers), hidden] float32}) batch by batch.

    Batches are length-sorted and right-padded (positions come from the lengths, never from raw
    indices); the forward pass is no-grad, without KV cache, and stops after max(layers). Blocks may live
    on different devices (a `device_map`): each reduces where it runs, results gather on `model.device`."""
    n = model.n_layers
    wanted = sorted(set(range(n + 1) if layers is None else layers))
    if not wanted or wanted[0] < 0 or wanted[-1] > n:
        raise LayerError(f"capture layers must lie in 0..{n} (0 = embeddings), got {list(layers or [])}")
    bad = [p for p in positions if p not in POSITIONS]
    if bad:
        raise ValueError(f"unknown positions {bad}; choose from {POSITIONS}")
    slot = {layer: k for k, layer in enumerate(wanted)}
    lengths = [len(s.prompt) + len(s.response) for s in samples]
    groups = batches_by_length(lengths, max_tokens=max_tokens, max_batch=batch_size)
    state: dict[str, Any] = {}

    def record(layer: int, hidden: torch.Tensor) -> None:
        masks = state["masks"].get(hidden.device)
        if masks is None:  # a block on another device: copy the masks there once per batch
            first = next(iter(state["masks"].values()))
            masks = state["masks"][hidden.device] = {k: v.to(hidden.device) for k, v in first.items()}
        for p in positions:
            out = state["out"][p]
            out[:, slot[layer]] = _reduce(hidden, p, masks).to(out.device)

    done = 0
    progress(task, 0, len(samples))
    for group in groups:
        batch = [samples[i] for i in group]
        ids, mask = pad_batch([s.prompt + s.response for s in batch], model.tokenizer.pad_token_id,
                              side="right", device=model.device)
        state["masks"] = {ids.device: _masks(batch, ids.shape[1], ids.device)}
        state["out"] = {p: torch.zeros(len(batch), len(wanted), model.hidden_size, device=ids.device)
                        for p in positions}
        # The layout makes active steering hooks see which positions are prompt and which response.
        plen = torch.tensor([len(s.prompt) for s in batch])
        with torch.no_grad(), sequence_layout(plen), read(model, wanted, record, stop_after=True):
            model.hf(input_ids=ids, attention_mask=mask, use_cache=False)
        yield group, state["out"]
        done += len(group)
        progress(task, done, len(samples))


def capture_means(model: Model, samples: Sequence[Sample], *, layers: Sequence[int] | None = None,
                  positions: Sequence[str] = ("response", "prompt", "last_prompt"), batch_size: int = 16,
                  max_tokens: int = 16384, progress: Progress = no_progress,
                  task: str = "capture") -> dict[str, torch.Tensor]:
    """Mean over samples of each per-sample reduction: {position: [len(layers), hidden]} (all layers
    0..n_layers by default). Running sums in float64: memory does not grow with the sample count."""
    if not samples:
        raise ValueError("capture_means needs at least one sample")
    sums: dict[str, torch.Tensor] = {}
    for _, out in iter_reductions(model, samples, layers=layers, positions=positions, batch_size=batch_size,
                                  max_tokens=max_tokens, progress=progress, task=task):
        for p, t in out.items():
            s = t.double().sum(0)
            sums[p] = sums[p] + s if p in sums else s
    return {p: (s / len(samples)).float().cpu() for p, s in sums.items()}
