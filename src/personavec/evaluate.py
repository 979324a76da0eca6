"""Trait evaluation of a (possibly steered) model on a trait's held-out evaluation questions.

Per condition (layer, coefficient, and which vector: the trait's own or a control) the model answers the
evaluation questions and its trait level is measured. The measure (`measure` in every cell and manifest):

- `reference` (the default when the trait file has authored references): the steered model's per-token
  log-likelihood of the authored trait-expressing minus non-trait answers, per question (see
  `personavec.reference`). Independent of the prompt pairs that built the vector.
- a judge (`contrast`, `local`, `openai:…`): the judge scores each generated answer with the model
  UNSTEERED. `contrast` is built from the trait's own prompt pairs, so it says how "prompt-like" an answer is
  and cannot test the vector on its own; with a judge, a `prompted` judge-free measure is also computed
  (likelihood of answers the model wrote under the trait's positive / negative prompts, stored in the run).
Judges without a coherence score get a judge-free fluency proxy instead. With the reference measure,
`generate=False` skips the answers altogether (no answers.jsonl rows, no coherence): the measure reads the
authored references under the same steering, so its values are those of a run that generates.

Controls (`controls`: a seeded random direction and other traits' vectors, each at the trait vector's
per-layer norm) run the same steered conditions; their cells carry `control` = the control's name.

Run folder (identified by model, trait, measure, vector and settings, not by the list of conditions, so a
grid can be extended and only the new cells are computed): manifest.json, reference.jsonl (prompted only),
answers.jsonl (one row per answer), measure.jsonl (one row per condition and question: the per-question
values behind every mean), cells.jsonl + cells.csv (one summary row per condition). Finished conditions are
never recomputed."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .capture import Sample
from .chat import encode_chat, encode_response, messages_for
from .engines import Steering, engine_scope, run_settings
from .errors import PersonavecError
from .generation import generate_ids
from .io import append_jsonl, read_jsonl, write_jsonl, write_text
from .judges import Judge, JudgeItem, make_judge
from .likelihood import response_logprobs
from .progress import Progress, no_progress
from .reference import NAME as REFERENCE
from .reference import reference_measure
from .runs import Records, open_run
from .stats import mean_se
from .steering import STEER_POSITIONS, check_coef, steer
from .traits import LoadedTrait, Trait, load_trait

if TYPE_CHECKING:
    from .engines import Engine
    from .models import Model
    from .vectors import PersonaVector

__all__ = ["CSV_FIELDS", "HALVES", "Cell", "Condition", "EvalSettings", "evaluate", "mean_se", "question_indices",
           "resolve_measure"]

CSV_FIELDS = ["control", "measure", "layer", "coef", "n", "trait_mean", "trait_se", "coherence_mean", "coherence_se", "judge_free_mean",
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
    half: str = "all"  # which evaluation questions: all, first (choose settings here) or second (report here)
    generate: bool = True  # False: reference measure only, no answers and no coherence (nothing reads them)

    def validate(self) -> None:
        if (self.n_questions is not None and self.n_questions < 1) or self.rollouts < 1 or self.max_new_tokens < 1:
            raise PersonavecError("--n-questions, --rollouts and --max-new-tokens must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise PersonavecError(f"--temperature must be a finite number ≥ 0, got {self.temperature}")
        if self.positions not in STEER_POSITIONS:
            raise PersonavecError(f"--positions must be one of {', '.join(STEER_POSITIONS)}")
        if self.half not in HALVES:
            raise PersonavecError(f"--half must be one of {', '.join(HALVES)}, got '{self.half}'")


HALVES = ("all", "first", "second")


@dataclass(frozen=True)
class Cell:
    """One condition's summary over the evaluation questions: a line of cells.jsonl, a row of cells.csv.
    `trait_*` is the trait measure (`measure`); `judge_free_*` the prompted measure beside a judge (None
    with the reference measure); `perplexity` and `quiz_accuracy` only with `capability`."""

    layer: int | None
    coef: float
    n: int
    trait_mean: float | None
    trait_se: float | None
    coherence_mean: float | None
    coherence_se: float | None
    judge_free_mean: float | None
    judge_free_se: float | None
    perplexity: float | None
    quiz_accuracy: float | None
    coherence_source: str  # the judge's name, "fluency" for the judge-free proxy, "none" without answers
    cell: str  # the key in the run folder (see `_cell`)
    control: str | None  # the control's name; None for the trait's own vector
    measure: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> Cell:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def question_indices(n_questions: int, half: str = "all", limit: int | None = None) -> list[int]:
    """Evaluation-question indices of a half (first = 0..n/2−1, second = the rest), then the first `limit`.
    Settings chosen on the first half and reported on the second never see the same question twice."""
    mid = (n_questions + 1) // 2
    idx = {"all": range(n_questions), "first": range(mid), "second": range(mid, n_questions)}[half]
    return list(idx)[:limit]


def resolve_measure(trait: Trait, judge: Judge | str | None) -> str:
    """'reference' when asked for, or by default (judge None / 'auto') when the trait has references;
    otherwise the judge's name (default 'contrast')."""
    name = judge.name if isinstance(judge, Judge) else judge
    if name == REFERENCE or (name in (None, "auto") and trait.references):
        if not trait.references:
            raise PersonavecError(f"trait '{trait.name}' has no references; the reference measure needs a "
                                  "references section in the trait file (or use --judge contrast)")
        return REFERENCE
    return "contrast" if name in (None, "auto") else str(name)


def reference_answers(model: Model, trait: LoadedTrait, settings: EvalSettings, folder: Path | None,
                      progress: Progress = no_progress, engine: Engine | str | None = None) -> list[dict[str, Any]]:
    """One trait-positive and one trait-negative answer per evaluation question, from the unsteered model
    under the positive / negative prompt of pair (question index mod number of pairs), generated by `engine`.
    Cached in the run."""
    path = folder / "reference.jsonl" if folder else None
    t = trait.trait
    questions = t.evaluation_questions[: settings.n_reference]
    plan = [(i, side, t.pairs[i % len(t.pairs)]) for i in range(len(questions)) for side in ("positive", "negative")]
    if path is not None and path.exists():
        cached = read_jsonl(path)
        if len(cached) == len(plan):  # else written by an interrupted run: generate them again
            return cached
    prompts = [encode_chat(model.tokenizer, messages_for(questions[i], getattr(pair, side))) for i, side, pair in plan]
    outs = generate_ids(model, prompts, max_new_tokens=settings.max_new_tokens, temperature=1.0,
                        seed=settings.seed + 104729, progress=progress, task="references", engine=engine)
    rows = [{"question_idx": i, "question": questions[i], "side": side,
             "answer": model.tokenizer.decode(o, skip_special_tokens=True).strip()}
            for (i, side, _), o in zip(plan, outs, strict=True)]
    if path is not None:
        write_jsonl(path, rows)  # whole or not at all
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


def write_cells_csv(path: Path, cells: Sequence[Cell]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for c in cells:
        w.writerow({k: _fmt(getattr(c, k)) for k in CSV_FIELDS})
    write_text(path, buf.getvalue())


def evaluate(model: Model, trait: str | Path | LoadedTrait, *, vector: PersonaVector | None = None,
             conditions: Sequence[Condition] = (Condition(None, 0.0),), judge: Judge | str | None = None,
             settings: EvalSettings | None = None, run_dir: str | Path | None = None, kind: str = "eval",
             extra_settings: dict[str, Any] | None = None, allow_mismatch: bool = False,
             controls: Mapping[str, PersonaVector] | None = None, engine: Engine | str | None = None,
             progress: Progress = no_progress) -> list[Cell]:
    """Evaluate each condition (for the vector and for each control); returns one `Cell` per condition
    (the rows of cells.csv). `judge` None or 'auto' means the reference measure when the trait
    has references, else the contrast judge. `engine` ("hf", "vllm" or an engine object) generates the
    answers, steered per condition; the measures are read from the Hugging Face model.

    With `run_dir`, every answer and score is stored and finished conditions are skipped on a rerun."""
    loaded = trait if isinstance(trait, LoadedTrait) else load_trait(trait)
    s = settings or EvalSettings()
    s.validate()
    ctrl = dict(controls or {})
    if any(c.steered for c in conditions) or ctrl:
        if vector is None:
            raise PersonavecError("steered conditions and controls need a vector (--vector)")
        vector.check_model(model, allow_mismatch)
    for c in conditions:
        check_coef(c.coef)
        if c.steered and vector is not None:  # a coefficient that overflows the model's dtype fails before any cell
            Steering.from_vector(vector, model, layer=c.layer, coef=c.coef, allow_mismatch=allow_mismatch)
    measure = resolve_measure(loaded.trait, judge)
    if not s.generate and measure != REFERENCE:
        raise PersonavecError(f"the {measure} judge scores generated answers, so generate=False (--no-generate) "
                              "needs the reference measure")
    the_judge: Judge | None = None
    if measure != REFERENCE:
        the_judge = judge if isinstance(judge, Judge) else make_judge(measure, model, loaded.trait)
        if hasattr(the_judge, "check"):
            the_judge.check()
    folder = None
    if run_dir is not None:
        identity = asdict(s)
        if s.generate:  # run folders written before `generate` existed have no such key: they stay resumable
            del identity["generate"]
        folder = open_run(run_dir, kind, {
            "model_id": model.model_id, "fingerprint": model.fingerprint, "trait": loaded.trait.name,
            "trait_sha256": loaded.sha256, "judge": measure, "measure": measure,
            "vector_digest": None if vector is None else vector.digest(),
            "controls": {k: v.digest() for k, v in ctrl.items()}, **identity, **(extra_settings or {}),
            **run_settings(engine)})
    with engine_scope(model, engine) as eng:
        return _evaluate_all(model, loaded, vector, conditions, ctrl, the_judge, measure, s, folder,
                             allow_mismatch, eng, progress)


def _evaluate_all(model: Model, loaded: LoadedTrait, vector: PersonaVector | None, conditions: Sequence[Condition],
                  ctrl: Mapping[str, PersonaVector], the_judge: Judge | None, measure: str, s: EvalSettings,
                  folder: Path | None, allow_mismatch: bool, engine: Engine,
                  progress: Progress) -> list[Cell]:
    """The conditions `evaluate` has not finished in `folder` (all of them without one), then every row."""
    stored = Records(folder / "cells.jsonl" if folder else None, key="cell")  # finished conditions' summaries
    done = dict(stored.rows)  # those of earlier runs (a repeated "base" cell is evaluated again, as before)
    refs = reference_answers(model, loaded, s, folder, progress, engine) if the_judge is not None else []
    q_idx = question_indices(len(loaded.trait.evaluation_questions), s.half, s.n_questions)
    plan = [(q, r) for q in q_idx for r in range(s.rollouts)]
    prompts = [encode_chat(model.tokenizer, messages_for(loaded.trait.evaluation_questions[q])) for q, _ in plan]
    runs: list[tuple[str | None, PersonaVector | None, Condition]] = [(None, vector, c)
                                                                      for c in dict.fromkeys(conditions)]
    runs += [(name, v, c) for name, v in ctrl.items() for c in dict.fromkeys(conditions) if c.steered]
    summaries: list[Cell] = []
    for n, (name, vec, cond) in enumerate(runs):
        progress("conditions", n, len(runs))
        cell = _cell(name, cond)
        if cell in done:
            summaries.append(replace(Cell.from_json(done[cell]), layer=cond.layer, coef=cond.coef))
            continue
        summary, answers, per_q = _evaluate_condition(model, loaded, vec, cond, name, the_judge, measure, refs,
                                                      prompts, plan, q_idx, s, allow_mismatch, engine, progress)
        summaries.append(summary)
        if folder:
            append_jsonl(folder / "answers.jsonl", answers)
            append_jsonl(folder / "measure.jsonl", per_q)
        stored.add([summary.to_json()])  # last: the cell counts as finished only once its answers are stored
        if folder:
            write_cells_csv(folder / "cells.csv", _expand(summaries, conditions, ctrl))
    progress("conditions", len(runs), len(runs))
    result = _expand(summaries, conditions, ctrl)
    if folder:
        write_cells_csv(folder / "cells.csv", result)
    return result


def _cell(control: str | None, cond: Condition) -> str:
    """A cell's key in the run folder: the condition's, prefixed by the control's name for control rows."""
    return cond.cell if control is None else f"{control}:{cond.cell}"


def _expand(summaries: list[Cell], conditions: Sequence[Condition],
            controls: Mapping[str, PersonaVector]) -> list[Cell]:
    """One row per requested condition and vector; the shared unsteered cell is repeated with each layer's
    label (for the trait's own rows only: a control's coefficient 0 is that same cell)."""
    by_cell = {s.cell: s for s in summaries}
    rows = []
    for name in [None, *controls]:
        for c in conditions:
            key = _cell(name if c.steered else None, c)
            if key in by_cell and (name is None or c.steered):
                rows.append(replace(by_cell[key], layer=c.layer, coef=c.coef, control=name))
    return rows


def _evaluate_condition(model: Model, loaded: LoadedTrait, vector: PersonaVector | None, cond: Condition,
                        control: str | None, judge: Judge | None, measure: str, refs: list[dict[str, Any]],
                        prompts: list[list[int]], plan: list[tuple[int, int]], q_idx: list[int], s: EvalSettings,
                        allow_mismatch: bool, engine: Engine,
                        progress: Progress) -> tuple[Cell, list[dict[str, Any]], list[dict[str, Any]]]:
    """The condition's cell, its answer rows (answers.jsonl) and its per-question rows (measure.jsonl)."""
    spec = None
    if cond.steered and vector is not None:
        spec = Steering.from_vector(vector, model, layer=cond.layer, coef=cond.coef, positions=s.positions,
                                    allow_mismatch=allow_mismatch)
    capability: dict[str, float] = {}
    questions = loaded.trait.evaluation_questions
    per_q: list[dict[str, Any]] = []
    # the engine steers its own generation (hooks on the Hugging Face model would not reach vLLM's workers);
    # the measures then read the Hugging Face model under the same steering. generate=False (the reference
    # measure only, see `evaluate`): no answers, so no answer rows and no coherence either
    answered = plan if s.generate else []
    outs = generate_ids(model, prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        seed=s.seed, progress=progress, task=f"answers {cond.cell}", engine=engine,
                        steering=spec) if answered else []
    hooks: Any = nullcontext() if spec is None else steer(model, spec.vectors, coef=spec.coef,
                                                           positions=spec.positions)
    with hooks:
        if judge is None:
            ref = reference_measure(model, loaded.trait, q_idx, progress=progress)
            per_q = [{"question_idx": g.question_idx, "lp_with_trait": g.with_trait,
                      "lp_without_trait": g.without_trait, "value": g.gap} for g in ref.questions]
        else:
            jf = judge_free_measure(model, refs, progress)
            per_q = [{"question_idx": r["question_idx"], "lp_positive": r["lp_positive"],
                      "lp_negative": r["lp_negative"], "value": r["judge_free"]} for r in jf]
        if s.capability:
            from .capability import capability as measure_capability

            capability = measure_capability(model, progress=progress)
    texts = [model.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    items = [JudgeItem(questions[q], a) for (q, _), a in zip(answered, texts, strict=True)]
    # unsteered from here on
    scores: list[float | None] = (judge.score_batch(items, loaded.trait.rubric, progress=progress) if judge
                                  else [None] * len(items))
    coherence = (judge.coherence_batch(items, progress) if judge is not None and judge.scores_coherence
                 else fluency(model, items, progress) if items else [])
    key = _cell(control, cond)
    tag = {"cell": key, "control": control, "measure": measure}
    answers = [{"layer": cond.layer, "coef": cond.coef, "question_idx": q, "rollout": r,
                "question": questions[q], "answer": a, "trait_score": sc, "coherence": co, **tag}
               for (q, r), a, sc, co in zip(answered, texts, scores, coherence, strict=True)]
    per_q = [{"layer": cond.layer, "coef": cond.coef, **row, **tag} for row in per_q]
    values = [r["value"] for r in per_q]
    if judge is None:  # the reference measure is the trait measure, per question
        tm, tse, n = mean_se(values)
        jm = jse = None
    else:
        tm, tse, n = mean_se(scores)
        jm, jse, _ = mean_se(values)
    cm, cse, _ = mean_se(coherence)
    summary = Cell(layer=cond.layer, coef=cond.coef, n=n, trait_mean=tm, trait_se=tse, coherence_mean=cm,
                   coherence_se=cse, judge_free_mean=jm, judge_free_se=jse,
                   perplexity=capability.get("perplexity"), quiz_accuracy=capability.get("quiz_accuracy"),
                   coherence_source=(judge.name if judge is not None and judge.scores_coherence
                                     else "fluency" if s.generate else "none"),
                   cell=key, control=control, measure=measure)
    return summary, answers, per_q
