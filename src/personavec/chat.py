"""Chat-template rendering and padded batches of token ids."""

from __future__ import annotations

from typing import Any

import torch

Message = dict[str, str]


def _fold_system(messages: list[Message]) -> list[Message]:
    """For templates that reject a system role (e.g. Gemma): prepend it to the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    return rest


def encode_chat(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template."""
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=True)
    except Exception as exc:  # jinja TemplateError: the template forbids the system role
        if "system" not in str(exc).lower():
            raise
        out = tokenizer.apply_chat_template(_fold_system(messages), add_generation_prompt=add_generation_prompt,
                                            tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return [int(t) for t in out]


def messages_for(question: str, system: str | None = None) -> list[Message]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Token ids of an assistant response, as a continuation after the generation prompt."""
    return [int(t) for t in tokenizer.encode(response, add_special_tokens=False)]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right",
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for sequences of different lengths, padded on `side`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def batches_by_length(lengths: list[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Group indices, longest first, so each batch's padded size stays under `max_tokens`.

    Sorting by length keeps padding small; longest first makes an out-of-memory error happen at once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= max_batch or width * (len(cur) + 1) > max_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out
