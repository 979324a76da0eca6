"""The three presets of `personavec reproduce`: what a CI check, a two-core CPU and a 7–8B model on a GPU can
afford. Each is a plain `ReproduceSettings` value; any field can be overridden (`settings.with_overrides`)."""

from __future__ import annotations

from dataclasses import replace

from ..errors import PersonavecError
from .settings import (
    CapabilityStage,
    ExtractStage,
    FinetuneStage,
    MonitorStage,
    ReproduceSettings,
    ScreenStage,
    SweepStage,
    flatten,
)

#: CI: the embedded model, one trait, the smallest budgets that still give every stage an interval.
SMOKE = ReproduceSettings(
    preset="smoke", traits=("evil",),
    extract=ExtractStage(n_questions=2, n_pairs=2, rollouts=1, max_new_tokens=12),
    # one cell: nothing to choose between. c = 1, not 4: this tiny extraction's vector is ~3× the issue-12 vector's
    # norm at layer 18, and at c = 4 neutral-text perplexity rises ~100× (the rise rule keeps nothing above 1.5×)
    sweep=SweepStage(layers=(18,), coefs=(1.0,), n_select=2, n_report=3, max_new_tokens=6, random_seeds=(0,),
                     selection_controls=True, coherence_min=0.0),
    capability=CapabilityStage(n_texts=3, n_quiz=6),
    monitor=MonitorStage(n_questions=1, conditions=("graded",), shots=(), rollouts=1, max_new_tokens=6),
    # the vaccine's two kinds of method (one trained, one steered at inference), one setting each
    finetune=FinetuneStage(sets=("normal", "II"), seeds=(0,), batch_size=4, max_length=96, max_steps=1,
                           max_rows=16, n_questions=2, vaccine=("infer", "prevent"), preventative_coefs=(1.0,),
                           infer_coefs=(1.0,)),
    # (d) wired end to end: one-step finetunes on the top and random 4 of the 12 screened chats
    screen=ScreenStage(sharegpt_n=12, sharegpt_max_chars=800, sharegpt_top=3, sharegpt_finetune_k=4,
                       sharegpt_finetune_sets=("top", "random")),
)

#: Two CPU cores, about an hour (the committed run, experiments/out/reproduce_cpu: 60 min 59 s): three traits,
#: half-size budgets.
CPU = ReproduceSettings(
    preset="cpu", traits=("evil", "sycophantic", "hallucinating"),
    extract=ExtractStage(n_questions=10, n_pairs=None, rollouts=1, max_new_tokens=32),
    # c = 1 beside issue 12's 2 and 4: a vector from 10 questions can be longer than the committed ones, and the
    # rise rule keeps only cells within 1.5× the unsteered perplexity
    sweep=SweepStage(layers=(10, 14, 18, 22), coefs=(1.0, 2.0, 4.0), n_select=10, n_report=10, max_new_tokens=16,
                     random_seeds=(0, 1, 2), selection_controls=False),
    capability=CapabilityStage(n_texts=None, n_quiz=None),
    monitor=MonitorStage(n_questions=10, conditions=("graded", "many_shot"), shots=(0, 5, 10), rollouts=1,
                         max_new_tokens=16),
    # three sets so that (a) and (b) order something; 80 rows each (issue 13's sets have 300; 160 gave II − normal
    # ≈ +1 nats/token in the previous committed run, so 80 keeps a large effect); the vaccine on evil only, its two
    # cheapest methods (a whole comparison for three traits is hours on two cores)
    finetune=FinetuneStage(sets=("normal", "mix050", "II"), seeds=(0, 1), epochs=2.0, max_rows=80,
                           n_questions=None, vaccine=("infer", "prevent"), vaccine_traits=("evil",),
                           preventative_coefs=(1.0, 2.0), infer_coefs=(1.0, 2.0, 4.0),
                           vaccine_controls=False),  # the random-direction controls: +2 finetunes, past the hour
    # no ShareGPT finetunes: 3 traits × 3 sets × 2 seeds would add about 45 minutes (issue 13 (d) is the
    # experiment's committed run: experiments/out/finetune_sharegpt)
    screen=ScreenStage(sharegpt_n=2000, sharegpt_finetune_k=0),
)

#: The paper's settings for 7–8B chat models (Chen et al. 2025): 5 pairs × 20 questions × 10 rollouts, a 0–100
#: judge, coefficients up to 2.5 around layer 20, LoRA rank 32 α 64 at lr 1e-5, preventative up to 5.
PAPER = ReproduceSettings(
    preset="paper", traits=("evil", "sycophantic", "hallucinating"), requires_judge=True,
    extract=ExtractStage(n_questions=None, n_pairs=None, rollouts=10, max_new_tokens=512),
    sweep=SweepStage(layers=(12, 16, 20, 24), coefs=(0.5, 1.0, 1.5, 2.0, 2.5), n_select=None, n_report=None,
                     max_new_tokens=256, random_seeds=(0, 1, 2), selection_controls=True),
    capability=CapabilityStage(n_texts=None, n_quiz=None, lm_eval_tasks=("mmlu",)),
    monitor=MonitorStage(n_questions=None, conditions=("graded", "many_shot"), shots=(0, 5, 10, 15, 20),
                         rollouts=10, max_new_tokens=256),
    finetune=FinetuneStage(sets=("normal", "I", "II", "mix050"), seeds=(0, 1, 2), rank=32, alpha=64, lr=1e-5,
                           epochs=1.0, max_length=512, float32=False, preventative_coefs=(1.0, 2.5, 5.0),
                           infer_coefs=(0.5, 1.0, 1.5, 2.0, 2.5)),
    screen=ScreenStage(sharegpt_n=10_000, sharegpt_finetune_k=500),  # issue 13 (d): top / random / bottom 500
)

PRESETS = {p.preset: p for p in (SMOKE, CPU, PAPER)}


def preset(name: str) -> ReproduceSettings:
    """The named preset; an unknown name is a one-line error."""
    if name not in PRESETS:
        raise PersonavecError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name])


def show(settings: ReproduceSettings) -> list[str]:
    """One `key = value` line per setting (tuples as comma lists, None as none), in declaration order."""
    def fmt(v: object) -> str:
        if isinstance(v, tuple):
            return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) or "(empty)"
        return "none" if v is None else str(v)

    return [f"{key} = {fmt(value)}" for key, value in flatten(settings).items()]
