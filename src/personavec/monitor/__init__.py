"""The monitoring experiment (the paper's Table 2): does the projection of the last prompt token onto a
persona vector predict, before any token is generated, how strongly the answer will express the trait?

Prompts, each combined with every evaluation question (never an extraction question):
  * graded: the trait file's `graded_prompts` as system prompts, from most discouraging to most encouraging;
  * many-shot: 0, 5, 10, 15, 20 example dialogues that express the trait before the question (no system
    prompt). The examples are the model's own answers to the trait's EXTRACTION questions under the
    positive system prompt of pair (example index mod number of pairs), sampled once per run, scored by the
    judge and ranked most trait-expressing first; the k-shot prompt holds the first k.
For each prompt × question:
  * projection: the last prompt token's activation at the vector's layer onto the unit vector (and, as a
    diagnostic, at every layer);
  * trait score: the judge's mean score over `rollouts` sampled answers (contrast judge by default), plus
    each answer's response-mean projection;
  * reference measure (when the trait file has authored references; the headline measure then): mean
    log p(with-trait reference | prompt) − mean log p(without-trait reference | prompt), per token. The
    references were written independently of the prompt pairs and of the graded prompts;
  * judge-free measure (prompted): the same gap for answers the model wrote under the trait's positive /
    negative system prompts (evaluate.reference_answers, made without the monitored prompt).
The prompt is run once with the KV cache: its last position gives the projections, and the references
and answers are then scored as continuations of that cache.

Results: Pearson r overall and within each condition for every measure (per point, over per-level means,
and within levels: both variables centred on their level's mean, so prompt identity alone cannot drive it),
a threshold on the projection calibrated to separate answers the judge scores at or above its neutral point from those below (fitted on even-indexed questions, checked on odd ones, then refitted on
all), and the `meta["monitor"]` block the server reads to flag requests.

Run folder (resumable; finished points are never recomputed): manifest.json, shots.jsonl,
reference.jsonl, points.jsonl, results.json, results.csv (one row per prompt × question), monitor.png.

Modules: settings (MonitorSettings), prompts (graded and many-shot plans), readings (one cached forward per
prompt), experiment (`monitor_eval`), results (correlations, summary, files), calibration (thresholds,
`store_calibration`); the generic statistics live in `personavec.stats`."""

from ..stats import balanced_accuracy, best_threshold
from .calibration import Calibration, calibrate, store_calibration
from .experiment import monitor_eval
from .prompts import PromptSpec, check_graded, plan_prompts, shot_examples
from .readings import prompt_readings
from .results import CSV_FIELDS, Level, MonitorSummary, levels, summarize, within_levels, write_outputs
from .settings import CONDITIONS, MonitorSettings

__all__ = ["CONDITIONS", "CSV_FIELDS", "Calibration", "Level", "MonitorSettings", "MonitorSummary", "PromptSpec",
           "balanced_accuracy", "best_threshold", "calibrate", "check_graded", "levels", "monitor_eval", "plan_prompts", "prompt_readings",
           "shot_examples", "store_calibration", "summarize", "within_levels", "write_outputs"]
