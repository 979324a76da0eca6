"""LoRA finetuning with training-time interventions (preventative steering, CAFT, projection penalty)
and the finetuning shift. One concept per module: dataset (rows, masking), interventions (hooks and
their callback), shift (the measure), trainer (the Trainer, callbacks, the run folder), adapter (loading)."""

from __future__ import annotations

from .adapter import adapter_base, attach_adapter, load_finetuned
from .dataset import DatasetSummary, load_dataset
from .interventions import InterventionCallback, Interventions
from .shift import finetuning_shift
from .trainer import TrainResult, TrainSettings, train

__all__ = ["DatasetSummary", "InterventionCallback", "Interventions", "TrainResult", "TrainSettings",
           "adapter_base", "attach_adapter", "finetuning_shift", "load_dataset", "load_finetuned", "train"]
