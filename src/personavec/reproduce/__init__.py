"""`personavec reproduce`: the paper's main experiments for any chat model as one resumable pipeline and one
self-contained report (issue 17). Stages: extract → sweep (reference measure, random and cross-trait
controls, chosen on one half of the evaluation questions, reported on the other) → capability at the
chosen setting → monitoring → finetuning and ΔP screening on the authored sets of `data` (skipped without
them) → the top-flagged real ShareGPT conversations (needs the sharegpt extra). Not run yet: the vaccine
comparison, the finetunes on ShareGPT sets and MMLU; the report says so.

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
