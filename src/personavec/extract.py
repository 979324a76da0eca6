"""The extraction pipeline: rollouts under contrastive system prompts → judge → filter → capture →
mean(positive) − mean(negative) at every layer and for every capture position.

`extract` runs named phases over one `ExtractJob`: rollouts, judging, filtering, capture, vector assembly.

With a run folder, every rollout and score is appended as it is produced, so an interrupted run resumes
without redoing finished work; keys (side/pair/question/rollout) identify rows, never file positions."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .capture import Sample, capture_means
from .chat import encode_chat, encode_response, messages_for
from .engines import engine_record, engine_scope, run_settings
from .errors import PersonavecError
from .generation import generate_ids
from .judges import Judge, JudgeItem, make_judge
from .progress import Progress, no_progress
from .runs import Records, chunk_seed, open_run, pending_chunks
from .traits import LoadedTrait, load_trait
from .vectors import LAYER_CONVENTION, PersonaVector, now_iso

if TYPE_CHECKING:
    import torch

    from .engines import Engine
    from .models import Model

CAPTURE_POSITIONS = ("response", "prompt", "last_prompt")


@dataclass(frozen=True)
class ExtractSettings:
    """Defaults finish on the embedded model in a few minutes on two CPU cores."""

    n_questions: int | None = None  # None = all extraction questions
    n_pairs: int | None = None  # None = all prompt pairs
    rollouts: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    threshold: float | None = None  # None = the judge's neutral threshold
    coherence_min: float = 50.0  # applies only to judges that score coherence
    seed: int = 0

    def validate(self) -> None:
        for name in ("n_questions", "n_pairs"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise PersonavecError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.rollouts < 1 or self.max_new_tokens < 1:
            raise PersonavecError("--rollouts and --max-new-tokens must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise PersonavecError(f"--temperature must be a finite number ≥ 0, got {self.temperature}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise PersonavecError(f"--threshold must be finite, got {self.threshold}")


@dataclass(frozen=True)
class Rollout:
    key: str
    side: str  # "pos" | "neg"
    pair: int
    question: int
    rollout: int
    system: str
    question_text: str


def plan_rollouts(trait: LoadedTrait, s: ExtractSettings) -> list[Rollout]:
    t = trait.trait
    questions = t.extraction_questions[: s.n_questions]
    pairs = t.pairs[: s.n_pairs]
    plan = []
    for side in ("pos", "neg"):
        for p, pair in enumerate(pairs):
            system = pair.positive if side == "pos" else pair.negative
            for q, question in enumerate(questions):
                for r in range(s.rollouts):
                    plan.append(Rollout(f"{side}/{p}/{q}/{r}", side, p, q, r, system, question))
    return plan


def _offset(progress: Progress, task: str, base: int, total: int) -> Progress:
    return lambda _t, done, _n: progress(task, base + done, total)


@dataclass(frozen=True)
class ExtractJob:
    """One extraction's checked inputs, shared by every phase: the judge is resolved (and reachable), the
    threshold fixed, the run folder open and the rollouts planned."""

    model: Model
    trait: LoadedTrait
    settings: ExtractSettings
    judge: Judge
    threshold: float
    folder: Path | None
    plan: list[Rollout]
    batch_size: int

    def records(self, name: str) -> Records:
        """A phase's records: in the run folder when there is one (then a rerun resumes), else in memory."""
        return Records(self.folder / name if self.folder else None)


@dataclass(frozen=True)
class Kept:
    """The rollouts that passed the filter, as capture samples per side, and how many there were per side."""

    samples: dict[str, list[Sample]]
    totals: dict[str, int]


def extract(model: Model, trait: str | Path | LoadedTrait, *, judge: Judge | str | None = None,
            settings: ExtractSettings | None = None, run_dir: str | Path | None = None, batch_size: int = 32,
            engine: Engine | str | None = None, progress: Progress = no_progress, **overrides: Any) -> PersonaVector:
    """Extract a persona vector. `trait`: a built-in name or a trait file. `judge`: a Judge, a judge spec
    string ("contrast", "openai:MODEL", "local"), or None for the judge-free contrast scorer. `engine`
    generates the rollouts ("hf", "vllm" or an engine object; see `personavec.engines`); capture stays on
    the Hugging Face model. Keyword overrides set ExtractSettings fields, e.g. extract(model, "evil", n_questions=5)."""
    job = _prepare(model, trait, judge=judge, settings=settings, run_dir=run_dir, batch_size=batch_size,
                   engine=engine, overrides=overrides)
    rollouts = _rollouts(job, engine, progress)
    scores = _judge(job, rollouts, progress)
    kept = _filter(job, rollouts, scores)
    return _assemble(job, kept, _capture(job, kept, progress), engine)


def _prepare(model: Model, trait: str | Path | LoadedTrait, *, judge: Judge | str | None,
            settings: ExtractSettings | None, run_dir: str | Path | None, batch_size: int,
            engine: Engine | str | None, overrides: dict[str, Any]) -> ExtractJob:
    """Settings checked, judge made (an unreachable judge fails before rollouts are paid for), run folder
    opened (refused when it belongs to other settings) and the rollouts planned."""
    loaded = trait if isinstance(trait, LoadedTrait) else load_trait(trait)
    s = settings or ExtractSettings()
    if overrides:
        s = ExtractSettings(**{**asdict(s), **overrides})
    s.validate()
    the_judge = judge if isinstance(judge, Judge) else make_judge(judge, model, loaded.trait)
    threshold = the_judge.threshold if s.threshold is None else s.threshold
    if hasattr(the_judge, "check"):
        the_judge.check()
    folder = None
    if run_dir is not None:
        folder = open_run(run_dir, "extract", {
            "model_id": model.model_id, "fingerprint": model.fingerprint, "trait": loaded.trait.name,
            "trait_sha256": loaded.sha256, "judge": the_judge.name, **asdict(s), **run_settings(engine)})
    return ExtractJob(model, loaded, s, the_judge, threshold, folder, plan_rollouts(loaded, s), batch_size)


def _rollouts(job: ExtractJob, engine: Engine | str | None, progress: Progress) -> Records:
    """Every planned rollout's response, in chunks that are checkpointed as they finish."""
    tok, s, plan = job.model.tokenizer, job.settings, job.plan
    rollouts = job.records("rollouts.jsonl")
    with engine_scope(job.model, engine) as eng:
        for position, part in pending_chunks(plan, rollouts, job.batch_size * 2):
            prompts = [encode_chat(tok, messages_for(r.question_text, r.system)) for r in part]
            outs = generate_ids(job.model, prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                seed=chunk_seed(s.seed, position), batch_size=job.batch_size,
                                progress=_offset(progress, "rollouts", position, len(plan)), engine=eng)
            rollouts.add([{**asdict(r), "response": tok.decode(o, skip_special_tokens=True).strip()}
                          for r, o in zip(part, outs, strict=True)])
    progress("rollouts", len(plan), len(plan))
    return rollouts


def _judge(job: ExtractJob, rollouts: Records, progress: Progress) -> Records:
    """The judge's trait score of every rollout (and coherence where the judge has it), checkpointed."""
    plan = job.plan
    scores = job.records("scores.jsonl")
    for position, part in pending_chunks(plan, scores, job.batch_size * 4):
        items = [JudgeItem(r.question_text, rollouts[r.key]["response"], r.system) for r in part]
        trait_scores = job.judge.score_batch(items, job.trait.trait.rubric,
                                             progress=_offset(progress, "judge", position, len(plan)))
        coherence = (job.judge.coherence_batch(items) if job.judge.scores_coherence
                     else [None] * len(items))
        scores.add([{"key": r.key, "score": sc, "coherence": co}
                    for r, sc, co in zip(part, trait_scores, coherence, strict=True)])
    progress("judge", len(plan), len(plan))
    return scores


def _filter(job: ExtractJob, rollouts: Records, scores: Records) -> Kept:
    """By key, never by row position: positive kept at/above the threshold, negative below, coherent where
    scored. Refused when a side keeps nothing (no difference of means to take)."""
    tok = job.model.tokenizer
    kept = Kept({"pos": [], "neg": []}, {"pos": 0, "neg": 0})
    for r in job.plan:
        kept.totals[r.side] += 1
        row, sc = rollouts[r.key], scores[r.key]
        score, coh = sc["score"], sc["coherence"]
        if score is None or not row["response"]:
            continue
        if coh is not None and coh < job.settings.coherence_min:
            continue
        if (r.side == "pos") != (score >= job.threshold):
            continue
        response = encode_response(tok, row["response"])
        kept.samples[r.side].append(Sample(encode_chat(tok, messages_for(r.question_text, r.system)), response))
    for side, name in (("pos", "positive"), ("neg", "negative")):
        if not kept.samples[side]:
            raise PersonavecError(f"no {name} rollout passed the filter (threshold {job.threshold} with judge "
                                  f"{job.judge.name}); raise --rollouts or --n-questions, or change --threshold")
    return kept


def _capture(job: ExtractJob, kept: Kept, progress: Progress) -> dict[str, torch.Tensor]:
    """Running means of the kept samples at every layer and position; their difference per position."""
    means = {side: capture_means(job.model, kept.samples[side], positions=CAPTURE_POSITIONS,
                                 batch_size=job.batch_size // 2 or 1, progress=progress, task=f"capture {side}")
             for side in ("pos", "neg")}
    return {p: means["pos"][p] - means["neg"][p] for p in CAPTURE_POSITIONS}


def _assemble(job: ExtractJob, kept: Kept, tensors: dict[str, torch.Tensor],
              engine: Engine | str | None) -> PersonaVector:
    """The vector with its provenance (saved into the run folder when there is one)."""
    model, loaded = job.model, job.trait
    meta = {
        "model_id": model.model_id, "fingerprint": model.fingerprint, "hidden_size": model.hidden_size,
        "n_layers": model.n_layers, "layer_convention": LAYER_CONVENTION, "positions": list(CAPTURE_POSITIONS),
        "trait": loaded.trait.name, "trait_sha256": loaded.sha256, "trait_source": loaded.source,
        "judge": job.judge.name, "threshold": job.threshold, "coherence_min": job.settings.coherence_min,
        "counts": {"positive_kept": len(kept.samples["pos"]), "negative_kept": len(kept.samples["neg"]),
                   "positive_total": kept.totals["pos"], "negative_total": kept.totals["neg"]},
        "settings": asdict(job.settings), "engine": engine_record(engine), "version": __version__,
        "created": now_iso(), "run_dir": str(job.folder) if job.folder else None,
    }
    vector = PersonaVector(tensors=tensors, meta=meta)
    if job.folder:
        vector.save(job.folder / "vector.pv.safetensors")
    return vector
