"""`personavec reproduce`: the paper's main experiments for any chat model as one resumable pipeline and one
self-contained report (issue 17). Stages: extract → sweep (reference measure, random and cross-trait
controls, chosen on one half of the evaluation questions, reported on the other) → capability at the
chosen setting → monitoring → finetuning and ΔP screening on the authored sets of `data` (skipped without
them; with the vaccine comparison on the II set) → the top-flagged real ShareGPT conversations (needs the
sharegpt extra; with `screen.sharegpt_finetune_k`, finetunes on the top / random / bottom K). MMLU and other
lm-eval tasks run in the capability stage when `capability.lm_eval_tasks` names them.

    from personavec.reproduce import preset, reproduce, with_overrides
    settings = with_overrides(preset("smoke"), ["sweep.layers=14,18"])
    result = reproduce(model, settings, "runs/smoke")     # -> runs/smoke/report.html
"""

from __future__ import annotations

from .pipeline import STAGES, ReproduceResult, reproduce
from .presets import PRESETS, preset, show
from .settings import ReproduceSettings, flatten, with_overrides

__all__ = ["PRESETS", "STAGES", "ReproduceResult", "ReproduceSettings", "flatten", "preset", "reproduce", "show",
           "with_overrides"]
