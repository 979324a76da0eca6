"""What is read for one monitored prompt: one forward with the KV cache gives the last prompt token's
projections, and each continuation (reference answers, sampled answers) is scored on a copy of that cache."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..chat import encode_response
from ..evaluate import EvalSettings, reference_answers
from ..models import cache_kwarg, last_logits_kwargs
from ..progress import Progress
from ..projection import watch
from ..traits import LoadedTrait
from .settings import MonitorSettings

if TYPE_CHECKING:
    from ..engines import Engine
    from ..models import Model


def prompt_readings(model: Model, prompt: list[int], continuations: Sequence[list[int]],
                    profile_dirs: dict[str, tuple[int, torch.Tensor]], main: str
                    ) -> tuple[list[float], list[float | None], list[float | None]]:
    """One forward over the prompt with the KV cache, then each continuation on a copy of that cache.

    Returns (last-prompt-token projection on every direction of `profile_dirs`, mean log-probability per
    token of each continuation, response-mean projection of each continuation on direction `main`)."""
    from transformers import DynamicCache

    key = cache_kwarg(model.hf)
    main_dir = {main: profile_dirs[main]}
    cache = DynamicCache()
    with torch.no_grad():
        with watch(model, profile_dirs) as rec:
            out = model.hf(input_ids=torch.tensor([prompt], device=model.device), use_cache=True,
                           **{key: cache}, **last_logits_kwargs(model.hf))
        profile = [float(x) for x in rec.steps[0][0, -1]]
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        lps: list[float | None] = []
        projs: list[float | None] = []
        for cont in continuations:
            if not cont:
                lps.append(None)
                projs.append(None)
                continue
            with watch(model, main_dir) as cr:  # a copy: the prompt's cache is reused by every continuation
                logits = model.hf(input_ids=torch.tensor([cont], device=model.device), use_cache=True,
                                  **{key: copy.deepcopy(cache)}).logits[0].float()
            steps = torch.cat([first[None], torch.log_softmax(logits[:-1], dim=-1)])
            target = torch.tensor(cont, device=steps.device)
            lps.append(float(steps.gather(1, target[:, None]).mean()))
            projs.append(float(cr.steps[0][0, :, 0].mean()))
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
