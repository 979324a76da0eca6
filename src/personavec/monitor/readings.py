"""What is read for one monitored prompt: one forward with the KV cache gives the last prompt token's
projections, and the continuations (reference answers, sampled answers) are scored in batches on copies of
that cache."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..chat import encode_response, pad_batch
from ..evaluate import EvalSettings, reference_answers
from ..models import cache_kwarg, last_logits_kwargs, output_cache
from ..progress import Progress
from ..projection import watch
from ..traits import LoadedTrait
from .settings import MonitorSettings

if TYPE_CHECKING:
    from ..engines import Engine
    from ..models import Model


def prompt_readings(model: Model, prompt: list[int], continuations: Sequence[list[int]],
                    profile_dirs: dict[str, tuple[int, torch.Tensor]], main: str, *, batch_size: int = 8
                    ) -> tuple[list[float], list[float | None], list[float | None]]:
    """One forward over the prompt with the KV cache, then the continuations in batches on copies of that cache
    (right-padded, positions continuing from the prompt's length).

    Returns (last-prompt-token projection on every direction of `profile_dirs`, mean log-probability per
    token of each continuation, response-mean projection of each continuation on direction `main`)."""
    key = cache_kwarg(model.hf)
    main_dir = {main: profile_dirs[main]}
    device, n_prompt = model.device, len(prompt)
    lps: list[float | None] = [None] * len(continuations)
    projs: list[float | None] = [None] * len(continuations)
    kept = [k for k, c in enumerate(continuations) if c]
    with torch.no_grad():
        with watch(model, profile_dirs) as rec:
            out = model.hf(input_ids=torch.tensor([prompt], device=device), use_cache=True,
                           **last_logits_kwargs(model.hf))
        profile = [float(x) for x in rec.steps[0][0, -1]]
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        cache = output_cache(out)
        for start in range(0, len(kept), batch_size):
            rows = kept[start:start + batch_size]
            ids, mask = pad_batch([continuations[k] for k in rows], model.tokenizer.pad_token_id, side="right",
                                  device=device)
            copied = copy.deepcopy(cache)  # the prompt's cache is reused by every batch
            copied.batch_select_indices(torch.zeros(len(rows), dtype=torch.long))
            positions = n_prompt + torch.arange(ids.shape[1], device=device)[None, :].expand(len(rows), -1)
            with watch(model, main_dir) as cr:
                logits = model.hf(input_ids=ids, position_ids=positions, use_cache=True, **{key: copied},
                                  attention_mask=torch.cat([mask.new_ones(len(rows), n_prompt), mask], dim=1)
                                  ).logits.float()
            for row, k in enumerate(rows):
                cont = continuations[k]
                steps = torch.cat([first[None], torch.log_softmax(logits[row, :len(cont) - 1], dim=-1)])
                lps[k] = float(steps.gather(1, torch.tensor(cont, device=steps.device)[:, None]).mean())
                projs[k] = float(cr.steps[0][row, :len(cont), 0].mean())
    return profile, lps, projs


def reference_ids(model: Model, loaded: LoadedTrait, s: MonitorSettings, folder: Path | None,
                  progress: Progress, engine: Engine) -> dict[int, dict[str, list[int]]]:
    """{question index: {"positive": ids, "negative": ids}} of the reference answers."""
    if not s.judge_free:
        return {}
    refs = reference_answers(model, loaded, EvalSettings(n_reference=s.n_questions, max_new_tokens=s.max_new_tokens,
                                                         seed=s.seed), folder, progress, engine)
    out: dict[int, dict[str, list[int]]] = {}
    for r in refs:
        out.setdefault(r["question_idx"], {})[r["side"]] = encode_response(model.tokenizer, r["answer"])
    return out


def authored_ids(model: Model, loaded: LoadedTrait) -> dict[int, tuple[list[list[int]], list[list[int]]]]:
    """{question index: (with-trait token ids, without-trait token ids)} of the trait file's references."""
    out = {}
    for q in range(len(loaded.trait.evaluation_questions)):
        ref = loaded.trait.reference_for(q)
        if ref is not None:
            out[q] = ([encode_response(model.tokenizer, a) for a in ref.with_trait],
                      [encode_response(model.tokenizer, a) for a in ref.without_trait])
    return out
