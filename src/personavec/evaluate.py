"""Trait evaluation of a (possibly steered) model on a trait's held-out evaluation questions.

Per condition (layer, coefficient) the model answers the evaluation questions; the answers are scored
by the judge with the model UNSTEERED (a judge must not be steered); and a judge-free measure is always
computed: the steered model's per-token log-likelihood of held-out trait-positive minus trait-negative
reference answers (produced once per run under the trait's positive and negative system prompts and
stored in the run folder). Judges without a coherence score get a judge-free fluency proxy instead.

Run folder (identified by model, trait, judge, vector and settings, not by the list of conditions, so a
grid can be extended and only the new cells are computed): manifest.json, reference.jsonl, answers.jsonl (one row per answer), judge_free.jsonl (one
row per condition and question), cells.jsonl + cells.csv (one summary row per condition). Finished
conditions are never recomputed."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .capture import Sample
from .chat import encode_chat, encode_response, messages_for
from .errors import PersonavecError
from .generation import generate_ids
from .io import append_jsonl, read_jsonl, write_text
from .judges import Judge, JudgeItem, make_judge
from .likelihood import response_logprobs
from .progress import Progress, no_progress
from .runs import open_run
from .steering import STEER_POSITIONS, check_coef
from .traits import LoadedTrait, load_trait

if TYPE_CHECKING:
    from .models import Model
    from .vectors import PersonaVector

CSV_FIELDS = ["layer", "coef", "n", "trait_mean", "trait_se", "coherence_mean", "coherence_se", "judge_free_mean",
              "judge_free_se", "perplexity", "quiz_accuracy"]


@dataclass(frozen=True)
class Condition:
    """A steering condition: layer None or coef 0 means the unsteered model."""

    layer: int | None
    coef: float

    @property
    def steered(self) -> bool:
        return self.layer is not None and self.coef != 0

    @property
    def cell(self) -> str:
        return f"L{self.layer}_c{self.coef:+g}" if self.steered else "base"


@dataclass(frozen=True)
class EvalSettings:
    n_questions: int | None = 10  # evaluation questions answered per condition (None = all)
    rollouts: int = 1
    max_new_tokens: int = 48
    temperature: float = 0.0  # greedy by default: one answer per question is then a fair sample
    seed: int = 0
    positions: str = "response"
    n_reference: int | None = None  # questions with reference answers for the judge-free measure (None = all)
    capability: bool = False  # also measure perplexity and quiz accuracy under each condition

    def validate(self) -> None:
        if (self.n_questions is not None and self.n_questions < 1) or self.rollouts < 1 or self.max_new_tokens < 1:
            raise PersonavecError("--n-questions, --rollouts and --max-new-tokens must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise PersonavecError(f"--temperature must be a finite number ≥ 0, got {self.temperature}")
        if self.positions not in STEER_POSITIONS:
            raise PersonavecError(f"--positions must be one of {', '.join(STEER_POSITIONS)}")


def mean_se(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None, len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs)), len(xs)


def reference_answers(model: Model, trait: LoadedTrait, settings: EvalSettings, folder: Path | None,
                      progress: Progress = no_progress) -> list[dict[str, Any]]:
    """One trait-positive and one trait-negative answer per evaluation question, from the unsteered model
    under the positive / negative prompt of pair (question index mod number of pairs). Cached in the run."""
    path = folder / "reference.jsonl" if folder else None
    if path is not None and path.exists():
        return read_jsonl(path)
    t = trait.trait
    questions = t.evaluation_questions[: settings.n_reference]
    plan = [(i, side, t.pairs[i % len(t.pairs)]) for i in range(len(questions)) for side in ("positive", "negative")]
    prompts = [encode_chat(model.tokenizer, messages_for(questions[i], getattr(pair, side))) for i, side, pair in plan]
    outs = generate_ids(model, prompts, max_new_tokens=settings.max_new_tokens, temperature=1.0,
                        seed=settings.seed + 104729, progress=progress, task="references")
    rows = [{"question_idx": i, "question": questions[i], "side": side,
             "answer": model.tokenizer.decode(o, skip_special_tokens=True).strip()}
            for (i, side, _), o in zip(plan, outs, strict=True)]
    if path is not None:
        append_jsonl(path, rows)
    return rows


def judge_free_measure(model: Model, references: list[dict[str, Any]],
                       progress: Progress = no_progress) -> list[dict[str, Any]]:
    """Per question: log p(positive reference) − log p(negative reference), per token, no system prompt,
    under whatever steering is active."""
    tok = model.tokenizer
    by_q: dict[int, dict[str, str]] = {}
    for r in references:
        by_q.setdefault(r["question_idx"], {"question": r["question"]})[r["side"]] = r["answer"]
    qs = [q for q in sorted(by_q) if by_q[q].get("positive") and by_q[q].get("negative")]
    samples = [Sample(encode_chat(tok, messages_for(by_q[q]["question"])), encode_response(tok, by_q[q][side]))
               for q in qs for side in ("positive", "negative")]
    lps = response_logprobs(model, samples, progress=progress, task="judge-free")
    rows = []
    for k, q in enumerate(qs):
        pos, neg = lps[2 * k], lps[2 * k + 1]
        rows.append({"question_idx": q, "lp_positive": pos, "lp_negative": neg,
                     "judge_free": None if pos is None or neg is None else pos - neg})
    return rows


def fluency(model: Model, items: Sequence[JudgeItem], progress: Progress = no_progress) -> list[float | None]:
    """Judge-free coherence proxy on a 0–100 scale: 100 × the unsteered model's geometric-mean token
    probability of the answer (given the question), times the answer's share of distinct tokens, which
    penalizes the loops that strong steering produces. Comparable only within one model."""
    tok = model.tokenizer
    samples = [Sample(encode_chat(tok, messages_for(it.question)), encode_response(tok, it.answer)) for it in items]
    lps = response_logprobs(model, samples, progress=progress, task="fluency")
    out: list[float | None] = []
    for s, lp in zip(samples, lps, strict=True):
        out.append(None if lp is None else 100 * math.exp(lp) * len(set(s.response)) / len(s.response))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_cells_csv(path: Path, cells: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for c in cells:
        w.writerow({k: _fmt(c.get(k)) for k in CSV_FIELDS})
    write_text(path, buf.getvalue())


def evaluate(model: Model, trait: str | Path | LoadedTrait, *, vector: PersonaVector | None = None,
             conditions: Sequence[Condition] = (Condition(None, 0.0),), judge: Judge | str | None = None,
             settings: EvalSettings | None = None, run_dir: str | Path | None = None, kind: str = "eval",
             extra_settings: dict[str, Any] | None = None, allow_mismatch: bool = False,
             progress: Progress = no_progress) -> list[dict[str, Any]]:
    """Evaluate each condition; returns one summary dict per condition (the rows of cells.csv).

    With `run_dir`, every answer and score is stored and finished conditions are skipped on a rerun."""
    loaded = trait if isinstance(trait, LoadedTrait) else load_trait(trait)
    s = settings or EvalSettings()
    s.validate()
    if any(c.steered for c in conditions):
        if vector is None:
            raise PersonavecError("steered conditions need a vector (--vector)")
        vector.check_model(model, allow_mismatch)
    for c in conditions:
        check_coef(c.coef)
    the_judge = judge if isinstance(judge, Judge) else make_judge(judge, model, loaded.trait)
    if hasattr(the_judge, "check"):
        the_judge.check()
    folder = None
    if run_dir is not None:
        folder = open_run(run_dir, kind, {
            "model_id": model.model_id, "fingerprint": model.fingerprint, "trait": loaded.trait.name,
            "trait_sha256": loaded.sha256, "judge": the_judge.name,
            "vector_digest": None if vector is None else vector.digest(),
            **asdict(s), **(extra_settings or {})})
    done: dict[str, dict[str, Any]] = {r["cell"]: r for r in read_jsonl(folder / "cells.jsonl")} if folder else {}
    refs = reference_answers(model, loaded, s, folder, progress)
    questions = loaded.trait.evaluation_questions[: s.n_questions]
    plan = [(q, r) for q in range(len(questions)) for r in range(s.rollouts)]
    prompts = [encode_chat(model.tokenizer, messages_for(questions[q])) for q, _ in plan]
    summaries: list[dict[str, Any]] = []
    unique = list(dict.fromkeys(conditions))
    for n, cond in enumerate(unique):
        progress("conditions", n, len(unique))
        if cond.cell in done:
            summaries.append({**done[cond.cell], "layer": cond.layer, "coef": cond.coef})
            continue
        summary, answers, jf = _evaluate_condition(model, loaded, vector, cond, the_judge, refs, prompts, plan,
                                                   questions, s, allow_mismatch, progress)
        summaries.append(summary)
        if folder:
            append_jsonl(folder / "answers.jsonl", answers)
            append_jsonl(folder / "judge_free.jsonl", jf)
            append_jsonl(folder / "cells.jsonl", [summary])
            write_cells_csv(folder / "cells.csv", _expand(summaries, conditions))
    progress("conditions", len(unique), len(unique))
    result = _expand(summaries, conditions)
    if folder:
        write_cells_csv(folder / "cells.csv", result)
    return result


def _expand(summaries: list[dict[str, Any]], conditions: Sequence[Condition]) -> list[dict[str, Any]]:
    """One row per requested condition; the shared unsteered cell is repeated with each layer's label."""
    by_cell = {s["cell"]: s for s in summaries}
    rows = []
    for c in conditions:
        if c.cell in by_cell:
            rows.append({**by_cell[c.cell], "layer": c.layer, "coef": c.coef})
    return rows


def _evaluate_condition(model: Model, loaded: LoadedTrait, vector: PersonaVector | None, cond: Condition,
                        judge: Judge, refs: list[dict[str, Any]], prompts: list[list[int]],
                        plan: list[tuple[int, int]], questions: list[str], s: EvalSettings,
                        allow_mismatch: bool, progress: Progress) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                             list[dict[str, Any]]]:
    steering: Any = nullcontext()
    if cond.steered and vector is not None:
        steering = vector.steer(model, layer=cond.layer, coef=cond.coef, positions=s.positions,
                                allow_mismatch=allow_mismatch)
    capability: dict[str, float] = {}
    with steering:
        outs = generate_ids(model, prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            seed=s.seed, progress=progress, task=f"answers {cond.cell}")
        jf = judge_free_measure(model, refs, progress)
        if s.capability:
            from .capability import capability as measure_capability

            capability = measure_capability(model, progress=progress)
    texts = [model.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    items = [JudgeItem(questions[q], a) for (q, _), a in zip(plan, texts, strict=True)]
    scores = judge.score_batch(items, loaded.trait.rubric, progress=progress)  # unsteered from here on
    coherence = judge.coherence_batch(items, progress) if judge.scores_coherence else fluency(model, items, progress)
    answers = [{"cell": cond.cell, "layer": cond.layer, "coef": cond.coef, "question_idx": q, "rollout": r,
                "question": questions[q], "answer": a, "trait_score": sc, "coherence": co}
               for (q, r), a, sc, co in zip(plan, texts, scores, coherence, strict=True)]
    jf_rows = [{"cell": cond.cell, "layer": cond.layer, "coef": cond.coef, **row} for row in jf]
    tm, tse, n = mean_se(scores)
    cm, cse, _ = mean_se(coherence)
    jm, jse, _ = mean_se([r["judge_free"] for r in jf])
    summary = {"cell": cond.cell, "layer": cond.layer, "coef": cond.coef, "n": n, "trait_mean": tm, "trait_se": tse,
               "coherence_mean": cm, "coherence_se": cse, "judge_free_mean": jm, "judge_free_se": jse,
               "perplexity": capability.get("perplexity"), "quiz_accuracy": capability.get("quiz_accuracy"),
               "coherence_source": judge.name if judge.scores_coherence else "fluency"}
    return summary, answers, jf_rows
