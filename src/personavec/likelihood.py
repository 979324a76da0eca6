"""Log-likelihood of responses given prompts, batched and padding-aware. The LM head runs only on the
positions that predict response tokens, so memory does not scale with vocabulary × prompt length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .capture import Sample
from .chat import batches_by_length, pad_batch
from .progress import Progress, no_progress
from .steering import sequence_layout

if TYPE_CHECKING:
    from .models import Model


def _decoder(hf: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack without the LM head (so the head runs only where needed), through the standard
    `get_decoder` accessor, which also sees through a PEFT wrapper (whose `base_model` is the LoRA wrapper of
    the whole causal LM); None when the model offers no such split."""
    get = getattr(hf, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        decoder = None
    if decoder is None and not hasattr(hf, "peft_config"):
        base = getattr(hf, "base_model", None)
        decoder = base if base is not hf else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not hf else None


def response_logprobs(model: Model, samples: Sequence[Sample], *, batch_size: int = 16,
                      max_tokens: int = 8192, progress: Progress = no_progress,
                      task: str = "likelihood") -> list[float | None]:
    """Mean per-token log-probability (nats) of each sample's response; None for an empty response.

    Active steering hooks apply, so this also measures a steered model."""
    out: list[float | None] = [None] * len(samples)
    todo = [i for i, s in enumerate(samples) if s.response and s.prompt]
    groups = batches_by_length([len(samples[i].prompt) + len(samples[i].response) for i in todo],
                               max_tokens=max_tokens, max_batch=batch_size)
    decoder = _decoder(model.hf)
    head = model.hf.get_output_embeddings()
    softcap = getattr(model.hf.config, "final_logit_softcapping", None)
    done = 0
    progress(task, 0, len(todo))
    for group in groups:
        batch = [samples[todo[g]] for g in group]
        ids, mask = pad_batch([s.prompt + s.response for s in batch], model.tokenizer.pad_token_id,
                              side="right", device=model.device)
        rows, cols, targets = [], [], []
        for b, s in enumerate(batch):
            start = len(s.prompt) - 1  # the position that predicts the first response token
            for k, tok in enumerate(s.response):
                rows.append(b)
                cols.append(start + k)
                targets.append(tok)
        r = torch.tensor(rows, device=model.device)
        c = torch.tensor(cols, device=model.device)
        plen = torch.tensor([len(s.prompt) for s in batch])
        with torch.no_grad(), sequence_layout(plen):
            if decoder is not None and head is not None:
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                logits = head(hidden[r, c]).float()
            else:
                logits = model.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits[r, c].float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets, device=model.device)[:, None])[:, 0]
        sums = torch.zeros(len(batch), device=model.device).index_add_(0, r, lp)
        for b, g in enumerate(group):
            out[todo[g]] = float(sums[b]) / len(batch[b].response)
        done += len(group)
        progress(task, done, len(todo))
    return out
