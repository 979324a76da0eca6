"""Batched chat generation: left padding, length-sorted batches, seeded sampling, progress.

`engine` chooses who generates: "hf" (the default: Hugging Face `generate` on `model`, the exact reference;
steering hooks active on the model apply), "vllm" (a `personavec.engines.vllm_engine.VllmEngine` built for
`model` on first use and kept in `model.extra`), or an engine object from `personavec.engines.make_engine`.
With the vLLM engine, steering must be passed as `steering=` (a `personavec.engines.Steering`, or one per
conversation): hooks on the Hugging Face model do not reach vLLM's workers, and generating with them active is
refused rather than silently unsteered."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .chat import Message, batches_by_length, encode_chat, pad_batch
from .layers import block_hooks
from .progress import Progress, no_progress

if TYPE_CHECKING:
    from .engines import Engine, SteeringArg
    from .models import Model


def _stop_ids(model: Model) -> list[int]:
    ids: set[int] = set()
    eos = model.hf.generation_config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    return sorted(ids)


def _steering_hooks_on(model: Model) -> bool:
    """Whether personavec steering hooks (from `steer`, `intervene`, `ablate`) are on the model's blocks."""
    return any(getattr(h, "__module__", None) == "personavec.steering" for h in block_hooks(model.layers))


def resolve_engine(model: Model, engine: Engine | str | None, **options: Any) -> Engine:
    """The engine object for `engine` ("hf", "vllm", None = "hf", or an engine object as it is). A "vllm"
    engine is built once per model (loading takes a while) and kept in `model.extra`; `close_engines(model)`
    stops it."""
    from .engines import make_engine

    if engine is None or isinstance(engine, str):
        name = engine or "hf"
        if name == "hf":
            return make_engine(model, "hf", **options)
        key = f"engine:{name}"
        if key not in model.extra:
            model.extra[key] = make_engine(model, name, **options)
        cached: Engine = model.extra[key]
        return cached
    return engine


def close_engines(model: Model) -> None:
    """Stop the engines `resolve_engine` built and kept for this model (their worker processes)."""
    for key in [k for k in model.extra if k.startswith("engine:")]:
        model.extra.pop(key).close()


def generate_ids(model: Model, prompts: list[list[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
                 progress: Progress = no_progress, task: str = "generate", engine: Engine | str | None = None,
                 steering: SteeringArg = None) -> list[list[int]]:
    """Generate continuations of token-id prompts; returns the new token ids (without end tokens).

    Batches are length-sorted and left-padded; each batch is seeded with `seed` + its index, so a rerun
    with the same inputs samples the same answers. `engine` and `steering`: see the module docstring (greedy
    answers agree across engines; sampled ones are seeded per engine and differ between them)."""
    if (engine is None or engine == "hf") and steering is None:
        return _hf_generate_ids(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, batch_size=batch_size, progress=progress, task=task)
    chosen = resolve_engine(model, engine)
    if chosen.name != "hf" and _steering_hooks_on(model):
        from .engines import EngineError

        raise EngineError(f"steering hooks are active on the Hugging Face model, and the {chosen.name} engine "
                          "cannot see them; pass steering=Steering.from_vector(...) instead of `with vec.steer(...)`")
    return chosen.generate_ids(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed, batch_size=batch_size, progress=progress, task=task, steering=steering)


def _hf_generate_ids(model: Model, prompts: list[list[int]], *, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
                     progress: Progress = no_progress, task: str = "generate") -> list[list[int]]:
    """The Hugging Face engine: `model.hf.generate` on length-sorted, left-padded batches."""
    from transformers import GenerationConfig

    stops = _stop_ids(model)
    pad_id = model.tokenizer.pad_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None,
                              top_p=top_p if temperature > 0 else None, top_k=None,
                              eos_token_id=stops, pad_token_id=pad_id)
    results: list[list[int]] = [[] for _ in prompts]
    groups = batches_by_length([len(p) for p in prompts], max_tokens=batch_size * 512, max_batch=batch_size)
    done = 0
    progress(task, 0, len(prompts))
    for b, group in enumerate(groups):
        ids, mask = pad_batch([prompts[i] for i in group], pad_id, side="left", device=model.device)
        torch.manual_seed(seed + b)
        with torch.no_grad():
            out = model.hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        new = out[:, ids.shape[1]:].tolist()
        for row, i in zip(new, group, strict=True):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            results[i] = row[:cut]
        done += len(group)
        progress(task, done, len(prompts))
    return results


def generate(model: Model, conversations: list[list[Message]], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
             progress: Progress = no_progress, task: str = "generate", engine: Engine | str | None = None,
             steering: SteeringArg = None) -> list[str]:
    """Answer each conversation (a list of chat messages); returns the decoded assistant replies.
    `engine` and `steering`: see the module docstring."""
    prompts = [encode_chat(model.tokenizer, conv) for conv in conversations]
    outs = generate_ids(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, batch_size=batch_size, progress=progress, task=task,
                        engine=engine, steering=steering)
    return [model.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
