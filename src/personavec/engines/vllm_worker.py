"""The part of the vLLM engine that runs inside vLLM's worker processes: steering hooks on the decoder blocks.

vLLM mixes `SteeringWorkerExtension` into its worker class (`LLM(worker_extension_cls=...)`); the engine calls its
methods by name through `LLM.collective_rpc`, so every worker (one per tensor-parallel rank) gets the same calls.
Nothing here is pickled code: the RPCs carry names, layer numbers and lists of floats.

How a step is steered. vLLM runs all scheduled requests as one flat batch of tokens ([tokens, hidden], requests
one after another, prefill chunks and decode tokens mixed). A forward pre-hook builds a per-token weight for each vector set in use: the request's coefficient where its `positions` rule
holds, 0 elsewhere (a pre-hook on the whole model, so it runs once per forward on every worker). It reads the model runner's own bookkeeping for the step: the batch's request ids, each
request's `SamplingParams.extra_args["personavec"]` ({"key", "coef", "positions"}), its prompt length, the
query start offsets and the number of tokens already computed (so absolute positions are known for chunked
prefills and decode steps alike). A forward hook on block L-1 then adds Σ_k weight_k × vector_k[L] to the block's
output (layer L = output of block L, personavec's numbering). Positions follow `personavec.steering` exactly:
  all       every token;
  prompt    prompt tokens (absolute position < prompt length), i.e. nothing once decoding starts;
  response  the last prompt token and every generated token (position >= prompt length - 1).

vLLM's Llama-style blocks return (hidden, residual) and add them inside the next block's norm; the vector is
added to `hidden`, so the residual stream (their sum) carries it as in the Hugging Face hook.

Why eager mode (`enforce_eager=True`): with CUDA graphs the forward is captured once and replayed as recorded
kernels, so Python hooks never run at replay (steering silently vanishes); with torch.compile (vLLM's default,
also on CPU, where it traces once and drops guards) the hooks present at trace time are baked into the graph with
that step's Python decisions, and hooks added later are never seen. Eager mode runs the modules' Python
`forward` every step, so the hooks run every step and see every batch.

Tensor parallelism needs nothing more: every rank holds the whole residual stream after each block and adds the
same vector. Not supported: speculative decoding (draft tokens would be steered as if accepted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..layers import block_output, find_layers, replace_block_output

EXTRA_KEY = "personavec"


class _State:
    """What one worker keeps: the hooks, the vector sets by key and the current forward's weights."""

    def __init__(self, runner: Any, layers: torch.nn.ModuleList) -> None:
        self.runner = runner
        self.layers = layers
        self.handles: list[Any] = []
        self.sets: dict[str, dict[int, torch.Tensor]] = {}  # key -> layer -> vector (model dtype, device)
        self.plan: dict[str, torch.Tensor] | None = None  # key -> [tokens] weights for this forward
        self.device = next((p.device for p in layers.parameters()), torch.device("cpu"))
        self.dtype = next((p.dtype for p in layers.parameters() if p.is_floating_point()), torch.float32)


def _weights(state: _State) -> dict[str, torch.Tensor] | None:
    """Per-token weights (coef × positions rule) of each vector set the batch's requests ask for."""
    runner = state.runner
    batch = runner.input_batch
    n = int(batch.num_reqs)
    if n == 0:
        return None
    starts = runner.query_start_loc.np[: n + 1]
    computed = batch.num_computed_tokens_cpu[:n]
    plan: dict[str, torch.Tensor] = {}
    total = int(starts[n])
    for i, req_id in enumerate(batch.req_ids[:n]):
        req = runner.requests.get(req_id)
        params = getattr(req, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        spec = extra.get(EXTRA_KEY)
        if not spec:
            continue
        key, coef, rule = str(spec["key"]), float(spec["coef"]), str(spec["positions"])
        if key not in state.sets:
            raise RuntimeError(f"personavec: request {req_id} names vector set {key!r}, which this worker lacks")
        lo, hi = int(starts[i]), int(starts[i + 1])
        if hi <= lo:
            continue
        pos = torch.arange(int(computed[i]), int(computed[i]) + hi - lo)
        plen = int(req.num_prompt_tokens)
        if rule == "all":
            keep = torch.ones(hi - lo, dtype=torch.bool)
        elif rule == "prompt":
            keep = pos < plen
        elif rule == "response":
            keep = pos >= plen - 1
        else:
            raise RuntimeError(f"personavec: unknown positions rule {rule!r}")
        if key not in plan:
            plan[key] = torch.zeros(total, dtype=torch.float32)
        plan[key][lo:hi] = keep.to(torch.float32) * coef
    if not plan:
        return None
    return {k: w.to(state.device, state.dtype, non_blocking=True) for k, w in plan.items()}


def _make_layer_hook(state: _State, layer: int) -> Callable[..., Any]:
    def hook(_module: Any, _args: Any, output: Any) -> Any:
        plan = state.plan
        if not plan:
            return output
        hidden = block_output(output)
        delta: torch.Tensor | None = None
        for key, weights in plan.items():
            vec = state.sets[key].get(layer)
            if vec is None:
                continue
            w = weights
            if w.shape[0] != hidden.shape[0]:  # padded forward: the padding rows get nothing
                w = torch.zeros(hidden.shape[0], dtype=weights.dtype, device=weights.device)
                w[: weights.shape[0]] = weights
            term = w[:, None] * vec.to(hidden.dtype)
            delta = term if delta is None else delta + term
        if delta is None:
            return output
        return replace_block_output(output, hidden + delta)

    return hook


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class; methods are called by name with `LLM.collective_rpc`."""

    def _personavec_state(self) -> _State:
        state: _State | None = getattr(self, "_personavec", None)
        if state is None:
            raise RuntimeError("personavec: call personavec_install first")
        return state

    def personavec_install(self, layers_path: str | None = None) -> int:
        """Put the hooks on this worker's decoder blocks (once); returns the number of blocks."""
        state: _State | None = getattr(self, "_personavec", None)
        if state is not None:
            return len(state.layers)
        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        _path, layers = find_layers(model, layers_path)
        state = _State(runner, layers)

        def plan_hook(_module: Any, _args: Any) -> None:
            state.plan = _weights(state) if state.sets else None

        state.handles.append(model.register_forward_pre_hook(plan_hook))
        for i, block in enumerate(layers):
            state.handles.append(block.register_forward_hook(_make_layer_hook(state, i + 1)))
        self._personavec: _State | None = state
        return len(layers)

    def personavec_set(self, key: str, vectors: dict[int, list[float]]) -> None:
        """Store a vector set under `key`: layer L (output of block L-1) -> vector (floats)."""
        state = self._personavec_state()
        state.sets[key] = {int(layer): torch.tensor(v, dtype=torch.float32).to(state.device, state.dtype)
                           for layer, v in vectors.items()}

    def personavec_drop(self, key: str) -> None:
        self._personavec_state().sets.pop(key, None)

    def personavec_keys(self) -> list[str]:
        return sorted(self._personavec_state().sets)

    def personavec_uninstall(self) -> None:
        """Remove every hook and vector set; the model computes exactly what it did before."""
        state: _State | None = getattr(self, "_personavec", None)
        if state is None:
            return
        for h in state.handles:
            h.remove()
        self._personavec = None
