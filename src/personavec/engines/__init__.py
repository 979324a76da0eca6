"""Generation engines: the Hugging Face engine (the exact reference) and the optional vLLM engine (throughput).

Both take token-id prompts (or chat conversations) and the same settings, and return the same result: one list
of new token ids per prompt (without end tokens), or the decoded replies. Steering is passed explicitly as a
`Steering` (the same vectors, coefficient and positions as `personavec.steer`), per request when wanted:

    from personavec.engines import Steering, make_engine
    engine = make_engine(model, "vllm", tensor_parallel_size=2)     # or "hf"
    spec = Steering.from_vector(vec, model, layer=18, coef=-4.0)      # layer L = output of decoder block L
    replies = engine.generate(conversations, max_new_tokens=64, steering=spec)
    engine.close()

The vLLM engine starts worker processes: scripts that use it need an `if __name__ == "__main__":` guard.

The commands (`--engine`, `--tensor-parallel-size`) check the choice before loading the model (`check_engine`)
and use one engine for all their generation (`open_engine`: built on first use, closed at the end); the
library functions behind them take `engine=` (a name, opened and closed within the call, or an engine object,
left open for the caller) and record it (`engine_record`, `run_settings`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..errors import PersonavecError, SteeringError
from ..progress import Progress, no_progress

if TYPE_CHECKING:
    from ..chat import Message
    from ..models import Model
    from ..vectors import PersonaVector

ENGINES = ("hf", "vllm")


class EngineError(PersonavecError):
    """An engine cannot be built or cannot run this request (missing package, steering it cannot see)."""


@dataclass(frozen=True, eq=False)
class Steering:
    """What `personavec.steer` adds, as data an engine can carry: coef × vectors[L] at the output of layer L
    (L = output of decoder block L, 1..n_layers; block L-1 gets the hook) at `positions` ("all", "prompt",
    "response"). Compared by identity: requests that share one object share one set of hooks."""

    vectors: Mapping[int, torch.Tensor] = field(default_factory=dict)
    coef: float = 1.0
    positions: str = "response"

    @classmethod
    def from_vector(cls, vector: PersonaVector, model: Model, layer: int | Sequence[int] | str | None = None,
                    coef: float = 1.0, positions: str = "response", position: str = "response",
                    allow_mismatch: bool = False) -> Steering:
        """The steering `vector.steer(model, layer, coef, positions, position)` would apply (same layer rules:
        default self.layer, a list, or "all" for incremental vectors at every layer)."""
        from ..steering import check_coef, steering_terms

        vectors = vector.layer_vectors(model, layer, position, allow_mismatch)
        steering_terms(model, vectors, coef)  # a coefficient that overflows the model's dtype fails here
        return cls(vectors=vectors, coef=check_coef(coef), positions=positions)

    def check(self, n_layers: int, hidden_size: int) -> None:
        from ..layers import check_layer
        from ..steering import STEER_POSITIONS, check_coef

        check_coef(self.coef)
        if self.positions not in STEER_POSITIONS:
            raise SteeringError(f"unknown positions '{self.positions}'; choose one of {', '.join(STEER_POSITIONS)} "
                                "(engines take named positions, not masks)")
        for layer, v in self.vectors.items():
            check_layer(layer, n_layers)
            if tuple(v.shape) != (hidden_size,):
                raise SteeringError(f"vector for layer {layer} has shape {tuple(v.shape)}, the model's hidden size "
                                    f"is {hidden_size}")

    @property
    def is_noop(self) -> bool:
        return self.coef == 0.0 or not self.vectors


SteeringArg = Steering | Sequence[Steering | None] | None


def per_request(steering: SteeringArg, n: int) -> list[Steering | None]:
    """One Steering (or None) per request: a single spec applies to all, a list must have one entry each."""
    if steering is None or isinstance(steering, Steering):
        return [steering] * n
    specs = list(steering)
    if len(specs) != n:
        raise SteeringError(f"got {len(specs)} steering entries for {n} requests; pass one per request or a single one")
    return specs


@runtime_checkable
class Engine(Protocol):
    """What `generation.generate` needs from an engine."""

    name: str

    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                     task: str = "generate", steering: SteeringArg = None) -> list[list[int]]: ...

    def generate(self, conversations: list[list[Message]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                 task: str = "generate", steering: SteeringArg = None) -> list[str]: ...

    def close(self) -> None: ...


class HFEngine:
    """The Hugging Face `generate` engine: the exact reference. Steering hooks are put on the model for the
    requests that share a Steering and taken off afterwards; hooks already on the model apply to every request."""

    name = "hf"

    def __init__(self, model: Model) -> None:
        self.model = model

    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                     task: str = "generate", steering: SteeringArg = None) -> list[list[int]]:
        from ..generation import _hf_generate_ids as generate_ids
        from ..steering import steer

        specs = per_request(steering, len(prompts))
        groups: dict[int, list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(id(spec), []).append(i)
        results: list[list[int]] = [[] for _ in prompts]
        for members in groups.values():
            spec = specs[members[0]]
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                      "seed": seed, "batch_size": batch_size,
                                      "progress": progress if len(groups) == 1 else no_progress, "task": task}
            if spec is None or spec.is_noop:
                if spec is not None:
                    spec.check(self.model.n_layers, self.model.hidden_size)
                outs = generate_ids(self.model, [prompts[i] for i in members], **kwargs)
            else:
                spec.check(self.model.n_layers, self.model.hidden_size)
                with steer(self.model, spec.vectors, coef=spec.coef, positions=spec.positions):
                    outs = generate_ids(self.model, [prompts[i] for i in members], **kwargs)
            for i, o in zip(members, outs, strict=True):
                results[i] = o
        return results

    def generate(self, conversations: list[list[Message]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                 task: str = "generate", steering: SteeringArg = None) -> list[str]:
        from ..chat import encode_chat

        prompts = [encode_chat(self.model.tokenizer, conv) for conv in conversations]
        outs = self.generate_ids(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, batch_size=batch_size, progress=progress, task=task, steering=steering)
        return [self.model.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""


def make_engine(model: Model, name: str = "hf", **options: Any) -> Engine:
    """An engine for `model`: "hf" (Hugging Face generate, the reference) or "vllm" (`VllmEngine.for_model`,
    options such as tensor_parallel_size, enforce_eager, max_model_len go to it)."""
    if name == "hf":
        if options:
            raise EngineError(f"the hf engine takes no options (got {', '.join(sorted(options))})")
        return HFEngine(model)
    if name == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine.for_model(model, **options)
    raise EngineError(f"unknown engine '{name}'; choose one of {', '.join(ENGINES)}")


def check_engine(name: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None
                 ) -> dict[str, Any]:
    """The `make_engine` options for an engine a user named, checked before any model is loaded, so a wrong
    name, a missing vllm package or a vLLM-only option given to the hf engine fails in one line first.
    `gpu_memory_utilization`: the share of each GPU vLLM may take (None = vLLM's default, 0.9); with
    `--engine vllm` the Hugging Face copy of the model is on the GPU too, so leave room for it."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine '{name}'; choose one of {', '.join(ENGINES)}")
    if tensor_parallel_size < 1:
        raise EngineError(f"--tensor-parallel-size must be at least 1, got {tensor_parallel_size}")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise EngineError(f"--gpu-memory-utilization is a share of each GPU's memory in (0, 1], got "
                          f"{gpu_memory_utilization:g}")
    if name == "hf":
        if tensor_parallel_size != 1:
            raise EngineError("--tensor-parallel-size applies to the vllm engine; the hf engine runs the model as "
                              "loaded (split it over devices with --device-map)")
        if gpu_memory_utilization is not None:
            raise EngineError("--gpu-memory-utilization applies to the vllm engine; the hf engine takes the memory "
                              "the loaded model needs")
        return {}
    from .vllm_engine import require_vllm

    require_vllm()
    options: dict[str, Any] = {"tensor_parallel_size": tensor_parallel_size}
    if gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = gpu_memory_utilization
    return options


class LazyEngine:
    """An engine built on its first generate call: a command that turns out to generate nothing (a resumed
    run whose answers are stored, fast-mode screening) never pays for vLLM's start. `close()` stops it."""

    def __init__(self, model: Model, name: str = "hf", **options: Any) -> None:
        self.model = model
        self.name = name
        self.options = options
        self._engine: Engine | None = None

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.options.get("tensor_parallel_size", 1))

    def _built(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.model, self.name, **self.options)
        return self._engine

    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                     task: str = "generate", steering: SteeringArg = None) -> list[list[int]]:
        return self._built().generate_ids(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_p=top_p, seed=seed, batch_size=batch_size, progress=progress,
                                          task=task, steering=steering)

    def generate(self, conversations: list[list[Message]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                 task: str = "generate", steering: SteeringArg = None) -> list[str]:
        return self._built().generate(conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed, batch_size=batch_size, progress=progress,
                                      task=task, steering=steering)

    def close(self) -> None:
        """Stop the engine if it was built (idempotent)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()


@contextmanager
def open_engine(model: Model, name: str = "hf", tensor_parallel_size: int = 1,
                gpu_memory_utilization: float | None = None) -> Iterator[Engine]:
    """The engine one command or library call uses for all its generation: checked now, built on first use,
    closed on leaving (vLLM's worker processes end with it)."""
    engine = LazyEngine(model, name, **check_engine(name, tensor_parallel_size, gpu_memory_utilization))
    try:
        yield engine
    finally:
        engine.close()


@contextmanager
def engine_scope(model: Model, engine: Engine | str | None) -> Iterator[Engine]:
    """`engine` as an engine object for one library call: a name (None = "hf") is opened here and closed at the
    end; an engine object belongs to the caller and stays open (one engine across many calls)."""
    if engine is None or isinstance(engine, str):
        with open_engine(model, engine or "hf") as opened:
            yield opened
    else:
        yield engine


def engine_record(engine: Engine | str | None) -> dict[str, Any]:
    """{"name", "tensor_parallel_size"}: which engine generated, for vector metadata and run summaries."""
    if engine is None or isinstance(engine, str):
        return {"name": engine or "hf", "tensor_parallel_size": 1}
    return {"name": engine.name, "tensor_parallel_size": int(getattr(engine, "tensor_parallel_size", 1))}


def run_settings(engine: Engine | str | None) -> dict[str, Any]:
    """The engine's entry in a run folder's settings: {"engine": engine_record} for any engine but hf, and
    nothing for hf (the reference), so folders made before engines existed still resume. Sampled answers
    differ between engines, so a run folder never mixes them."""
    record = engine_record(engine)
    return {} if record["name"] == "hf" else {"engine": record}


__all__ = ["ENGINES", "Engine", "EngineError", "HFEngine", "LazyEngine", "Steering", "SteeringArg", "check_engine",
           "engine_record", "engine_scope", "make_engine", "open_engine", "per_request", "run_settings"]
