"""Batched chat generation: left padding, length-sorted batches, seeded sampling, progress."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .chat import Message, batches_by_length, encode_chat, pad_batch
from .progress import Progress, no_progress

if TYPE_CHECKING:
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


def generate_ids(model: Model, prompts: list[list[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
                 progress: Progress = no_progress, task: str = "generate") -> list[list[int]]:
    """Generate continuations of token-id prompts; returns the new token ids (without end tokens).

    Batches are length-sorted and left-padded; each batch is seeded with `seed` + its index, so a rerun
    with the same inputs samples the same answers."""
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
             progress: Progress = no_progress, task: str = "generate") -> list[str]:
    """Answer each conversation (a list of chat messages); returns the decoded assistant replies."""
    prompts = [encode_chat(model.tokenizer, conv) for conv in conversations]
    outs = generate_ids(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, batch_size=batch_size, progress=progress, task=task)
    return [model.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
