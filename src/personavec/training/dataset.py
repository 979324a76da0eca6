"""Chat finetuning data: read JSONL or Parquet rows of `messages`, skip and count bad rows, and tokenize
with labels on assistant tokens only.

Labels come from the assistant-token mask, never from pad ids: many tokenizers use the end-of-sequence
token as padding (SmolLM2's <|im_end|> is both), and masking "every pad id" would also mask the real
end-of-turn token the model must learn to emit."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..chat import encode_chat
from ..errors import PersonavecError

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label value PyTorch's cross-entropy skips


@dataclass
class DatasetSummary:
    """How many rows were read, kept, and skipped for which reason."""

    path: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    assistant_tokens: int = 0

    def line(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return (f"{self.path}: {self.kept} of {self.total} rows kept ({self.assistant_tokens} assistant tokens)"
                + (f"; skipped {why}" if why else ""))


def read_rows(path: str | Path) -> list[Any]:
    """The raw rows of a JSONL or Parquet file; an unparsable JSONL line becomes None (counted later)."""
    p = Path(path)
    if not p.is_file():
        raise PersonavecError(f"dataset '{p}' does not exist; pass a JSONL or Parquet file of {{\"messages\": [...]}} rows")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_table(p).to_pylist())
        except Exception as exc:
            raise PersonavecError(f"'{p}' is not a readable Parquet file ({type(exc).__name__})") from None
    rows: list[Any] = []
    with p.open("rb") as fh:  # bytes: a line that is not UTF-8 is one unreadable row, not a failed run
        for line in fh:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                rows.append(None)
    return rows


def problem(row: Any) -> str | None:
    """Why a row cannot be trained on, or None if it can."""
    if not isinstance(row, dict):
        return "unreadable rows"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "rows without messages"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "malformed messages"
        if m.get("role") not in ROLES:
            return "unknown roles"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "rows without an assistant turn"
    return None


def tokenize(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]] | None:
    """input_ids and labels (IGNORE outside assistant turns), or None if the template is not prefix-stable.

    Each assistant turn's tokens are those that rendering the conversation up to and including that turn
    adds after rendering it up to the turn's generation prompt; they include the end-of-turn token."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = encode_chat(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(encode_chat(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        upto = encode_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if upto != ids[: len(upto)]:
            return None
        labels[start:len(upto)] = upto[start:]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def load_dataset(path: str | Path, tokenizer: Any, max_length: int = 512) -> tuple[list[dict[str, list[int]]],
                                                                                   DatasetSummary]:
    """Tokenized examples and a summary of what was skipped; an empty result is a one-line error."""
    rows = read_rows(path)
    summary = DatasetSummary(path=str(path), total=len(rows))
    reasons: Counter[str] = Counter()
    examples = []
    for row in rows:
        why = problem(row)
        ex = None if why else tokenize(tokenizer, row["messages"], max_length)
        if ex is None and why is None:
            why = "rows the chat template cannot split into turns"
        elif ex is not None and not any(t != IGNORE for t in ex["labels"]):
            why, ex = "rows whose assistant tokens fall beyond --max-length", None
        if ex is None:
            reasons[why or "?"] += 1
            continue
        examples.append(ex)
        summary.assistant_tokens += sum(t != IGNORE for t in ex["labels"])
    summary.kept = len(examples)
    summary.skipped = dict(reasons)
    if not examples:
        raise PersonavecError(f"no trainable rows in {summary.line()}; each row needs "
                              '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}')
    return examples, summary


def collate(pad_id: int) -> Any:
    """A collator that right-pads input_ids with `pad_id` and labels with IGNORE (never with pad ids)."""

    def fn(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return fn
