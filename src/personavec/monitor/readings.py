"""What is read for one monitored prompt: one forward with the KV cache gives the last prompt token's
projections, and the continuations (reference answers, sampled answers) are scored in batches on copies of
that cache, through the same cached step as `likelihood.response_logprobs`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..chat import encode_response
from ..evaluate import EvalSettings, reference_answers
from ..likelihood import Scorer, token_positions
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
    """One forward over the prompt with the KV cache, then the continuations in batches of `batch_size` on
    copies of that cache (`Scorer.continued`: right-padded, positions continuing from the prompt's length);
    the LM head runs only on the positions that predict continuation tokens.

    Returns (last-prompt-token projection on every direction of `profile_dirs`, mean log-probability per
    token of each continuation, response-mean projection of each continuation on direction `main`)."""
    scorer = Scorer(model, batch_size)
    main_dir = {main: profile_dirs[main]}
    lps: list[float | None] = [None] * len(continuations)
    projs: list[float | None] = [None] * len(continuations)
    kept = [k for k, c in enumerate(continuations) if c]
    with torch.no_grad():
        with watch(model, profile_dirs) as rec:
            states, cache = scorer.states(input_ids=torch.tensor([prompt], device=model.device), use_cache=True)
        profile = [float(x) for x in rec.steps[0][0, -1]]
        first = scorer.log_softmax(states[0, -1:])[0].cpu()  # predicts every continuation's first token
        mask = torch.ones(1, len(prompt), dtype=torch.long, device=model.device)
        for start in range(0, len(kept), batch_size):
            rows = kept[start:start + batch_size]
            conts = [continuations[k] for k in rows]
            with watch(model, main_dir) as cr:
                cont_states = scorer.continued(cache, torch.zeros(len(rows), dtype=torch.long), mask, conts,
                                               last_use=start + batch_size >= len(kept))
            # each later token is predicted by the continuation's own previous state
            r, c = token_positions([len(cont) - 1 for cont in conts], model.device)
            lp = torch.cat([first[[cont[0] for cont in conts]],
                            scorer.logprobs(cont_states[r, c], [t for cont in conts for t in cont[1:]]).cpu()])
            row_of = torch.cat([torch.arange(len(rows)), r.cpu()])
            sums = torch.zeros(len(rows)).index_add_(0, row_of, lp)
            for row, k in enumerate(rows):
                lps[k] = float(sums[row]) / len(conts[row])
                projs[k] = float(cr.steps[0][row, :len(conts[row]), 0].mean())
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
