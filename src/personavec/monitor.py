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
reference.jsonl, points.jsonl, results.json, results.csv (one row per prompt × question), monitor.png."""

from __future__ import annotations

import copy
import csv
import io
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .chat import Message, encode_chat, encode_response, messages_for
from .engines import engine_record, engine_scope, run_settings
from .errors import PersonavecError, TraitError, VectorError
from .evaluate import EvalSettings, reference_answers
from .generation import generate_ids
from .io import append_jsonl, atomic_path, read_jsonl, write_json, write_text
from .judges import Judge, JudgeItem, make_judge
from .layers import check_layer
from .models import cache_kwarg, last_logits_kwargs
from .progress import Progress, no_progress
from .projection import directions, watch
from .runs import Records, chunk_seed, open_run, pending_chunks, settings_hash
from .stats import centre, mean, pearson
from .traits import LoadedTrait, load_trait
from .vectors import PersonaVector, now_iso

if TYPE_CHECKING:
    from .engines import Engine
    from .models import Model

CONDITIONS = ("graded", "many_shot")
CSV_FIELDS = ["condition", "level", "question_idx", "prompt_tokens", "projection", "reference", "trait_score",
              "judge_free",
              "response_projection", "n_answers", "label", "question"]


@dataclass(frozen=True)
class MonitorSettings:
    n_questions: int | None = 10  # evaluation questions per prompt (None = all)
    rollouts: int = 1  # sampled answers per prompt × question
    max_new_tokens: int = 32  # per answer and per reference answer
    temperature: float = 1.0  # answers are samples, as in the paper; 0 = greedy (then rollouts must be 1)
    shots: tuple[int, ...] = (0, 5, 10, 15, 20)
    shot_tokens: int = 40  # tokens per many-shot example answer
    conditions: tuple[str, ...] = CONDITIONS
    judge_free: bool = True
    seed: int = 0

    def validate(self) -> None:
        if (self.n_questions is not None and self.n_questions < 1) or self.rollouts < 1 or self.max_new_tokens < 1:
            raise PersonavecError("--n-questions, --rollouts and --max-new-tokens must be at least 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise PersonavecError(f"--temperature must be a finite number ≥ 0, got {self.temperature}")
        if self.temperature == 0 and self.rollouts > 1:
            raise PersonavecError("greedy answers (--temperature 0) are all the same; use --rollouts 1")
        if not self.conditions or any(c not in CONDITIONS for c in self.conditions):
            raise PersonavecError(f"conditions must be among {', '.join(CONDITIONS)}")
        if "many_shot" in self.conditions and (not self.shots or any(k < 0 for k in self.shots)):
            raise PersonavecError("--shots must be numbers of examples ≥ 0, e.g. 0,5,10,15,20")
        if self.shot_tokens < 1:
            raise PersonavecError("--shot-tokens must be at least 1")


@dataclass(frozen=True)
class PromptSpec:
    """One monitored prompt: a condition, its level (graded index or number of shots) and the messages."""

    key: str
    condition: str
    level: int
    label: str
    question_idx: int
    question: str
    messages: list[Message]


# ---- statistics ------------------------------------------------------------------------------------------
def balanced_accuracy(values: Sequence[float], labels: Sequence[bool], threshold: float) -> float | None:
    """Mean of the true-positive and true-negative rates of the rule `value ≥ threshold`."""
    pos = [v for v, lab in zip(values, labels, strict=True) if lab]
    neg = [v for v, lab in zip(values, labels, strict=True) if not lab]
    if not pos or not neg:
        return None
    return 0.5 * (sum(v >= threshold for v in pos) / len(pos) + sum(v < threshold for v in neg) / len(neg))


def best_threshold(values: Sequence[float], labels: Sequence[bool]) -> tuple[float | None, float | None]:
    """The cut `value ≥ t` with the best balanced accuracy (midpoints between sorted values; the middle
    one of equally good cuts), or (None, None) when only one class is present."""
    if len(set(labels)) < 2:
        return None, None
    xs = sorted(set(values))
    cuts = [xs[0] - 1.0] + [(a + b) / 2 for a, b in itertools.pairwise(xs)] + [xs[-1] + 1.0]
    scored = [(balanced_accuracy(values, labels, t) or 0.0, t) for t in cuts]
    top = max(s for s, _ in scored)
    best = [t for s, t in scored if s >= top - 1e-12]
    return best[len(best) // 2], top


def calibrate(rows: Sequence[dict[str, Any]], values: Callable[[dict[str, Any]], list[float | None]],
              neutral: float) -> dict[str, Any]:
    """Threshold on a projection (`values(row)`: one per answer of the row) separating answers scored ≥
    `neutral` from the rest: fitted on even-indexed questions and checked on odd ones (held-out balanced
    accuracy), then refitted on every answer (the stored threshold)."""
    def answers(keep: Callable[[int], bool]) -> tuple[list[float], list[bool]]:
        vals, labs = [], []
        for r in rows:
            if not keep(r["question_idx"]):
                continue
            for v, s in zip(values(r), r["trait_scores"], strict=True):
                if v is not None and s is not None and math.isfinite(v):
                    vals.append(float(v))
                    labs.append(s >= neutral)
        return vals, labs

    vals, labs = answers(lambda q: True)
    threshold, acc = best_threshold(vals, labs)
    fit_v, fit_l = answers(lambda q: q % 2 == 0)
    test_v, test_l = answers(lambda q: q % 2 == 1)
    fit_t, _ = best_threshold(fit_v, fit_l)
    held = None if fit_t is None else balanced_accuracy(test_v, test_l, fit_t)
    return {"threshold": threshold, "balanced_accuracy": acc, "heldout_balanced_accuracy": held,
            "heldout_threshold": fit_t, "n_answers": len(vals), "n_expressing": sum(labs)}


# ---- prompts -----------------------------------------------------------------------------------------------
def shot_examples(model: Model, loaded: LoadedTrait, judge: Judge, s: MonitorSettings, folder: Path | None,
                  progress: Progress = no_progress, engine: Engine | str | None = None) -> list[dict[str, Any]]:
    """max(shots) example dialogues from EXTRACTION questions answered under positive system prompts,
    ranked by the judge's trait score (highest first). Cached in the run folder."""
    n = max(s.shots) if "many_shot" in s.conditions else 0
    path = folder / "shots.jsonl" if folder else None
    rows = read_jsonl(path) if path is not None else []
    if len(rows) < n:
        t = loaded.trait
        qs, pairs = t.extraction_questions, t.pairs
        plan = [(j, qs[j % len(qs)], pairs[(j + j // len(qs)) % len(pairs)].positive) for j in range(len(rows), n)]
        prompts = [encode_chat(model.tokenizer, messages_for(q, system)) for _, q, system in plan]
        outs = generate_ids(model, prompts, max_new_tokens=s.shot_tokens, temperature=1.0, seed=s.seed + 15485863,
                            progress=progress, task="shot examples", engine=engine)
        texts = [model.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
        scores = judge.score_batch([JudgeItem(q, a, system) for (_, q, system), a in zip(plan, texts, strict=True)],
                                   t.rubric, progress=progress)
        new = [{"index": j, "question": q, "system": system, "answer": a, "score": sc}
               for (j, q, system), a, sc in zip(plan, texts, scores, strict=True)]
        if path is not None:
            append_jsonl(path, new)
        rows += new
    usable = [r for r in rows[:n] if r["answer"]]
    return sorted(usable, key=lambda r: (r["score"] is None, -(r["score"] or 0.0), r["index"]))


def check_graded(loaded: LoadedTrait, s: MonitorSettings) -> None:
    if "graded" in s.conditions and len(loaded.trait.graded_prompts) < 2:
        raise TraitError(f"trait '{loaded.trait.name}' has no graded_prompts (at least 2 system prompts, most "
                         "discouraging first); add them to the trait file or run only the many_shot condition")


def plan_prompts(loaded: LoadedTrait, s: MonitorSettings, shots: Sequence[dict[str, Any]]) -> list[PromptSpec]:
    t = loaded.trait
    questions = t.evaluation_questions[: s.n_questions]
    plan: list[PromptSpec] = []
    check_graded(loaded, s)
    if "graded" in s.conditions:
        for level, system in enumerate(t.graded_prompts):
            for q, question in enumerate(questions):
                plan.append(PromptSpec(f"graded/{level}/{q}", "graded", level, system, q, question,
                                       messages_for(question, system)))
    if "many_shot" in s.conditions:
        for k in sorted(set(s.shots)):
            if k > len(shots):
                raise PersonavecError(f"only {len(shots)} non-empty shot examples for {k} shots; lower --shots")
            context: list[Message] = []
            for ex in shots[:k]:
                context += [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["answer"]}]
            for q, question in enumerate(questions):
                plan.append(PromptSpec(f"many_shot/{k}/{q}", "many_shot", k, f"{k} shots", q, question,
                                       context + messages_for(question)))
    return plan


# ---- readings ----------------------------------------------------------------------------------------------
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


def _references(model: Model, loaded: LoadedTrait, s: MonitorSettings, folder: Path | None,
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


def _authored(model: Model, loaded: LoadedTrait) -> dict[int, tuple[list[list[int]], list[list[int]]]]:
    """{question index: (with-trait token ids, without-trait token ids)} of the trait file's references."""
    out = {}
    for q in range(len(loaded.trait.evaluation_questions)):
        ref = loaded.trait.reference_for(q)
        if ref is not None:
            out[q] = ([encode_response(model.tokenizer, a) for a in ref.with_trait],
                      [encode_response(model.tokenizer, a) for a in ref.without_trait])
    return out


def within_levels(points: Sequence[dict[str, Any]], measure: str) -> float | None:
    """Pearson r after centring projection and measure on their (condition, level) means: what the
    projection says about a question beyond which prompt it was asked under."""
    pts = [p for p in points if p.get(measure) is not None and p.get("projection") is not None]
    level = [(p["condition"], p["level"]) for p in pts]
    return pearson(centre([p["projection"] for p in pts], level), centre([p[measure] for p in pts], level))


# ---- the experiment ----------------------------------------------------------------------------------------
def monitor_eval(model: Model, trait: str | Path | LoadedTrait, vector: PersonaVector, *,
                 judge: Judge | str | None = None, settings: MonitorSettings | None = None, layer: int | None = None,
                 run_dir: str | Path | None = None, allow_mismatch: bool = False, chunk: int = 16,
                 engine: Engine | str | None = None, progress: Progress = no_progress) -> dict[str, Any]:
    """Run the monitoring experiment; returns the results dict (also results.json in the run folder).

    `layer`: where the projection is read (default: the vector's chosen layer). With `run_dir`, every point
    is stored as it finishes and a rerun resumes. `engine` ("hf", "vllm" or an engine object) samples the
    shot examples, reference answers and answers; every reading is taken on the Hugging Face model."""
    loaded = trait if isinstance(trait, LoadedTrait) else load_trait(trait)
    s = settings or MonitorSettings()
    s.validate()
    check_graded(loaded, s)
    vector.check_model(model, allow_mismatch)
    read_layer = check_layer(vector.layer if layer is None else layer, model.n_layers)
    if vector.meta.get("trait") not in (None, loaded.trait.name):
        raise VectorError(f"the vector is for trait '{vector.meta['trait']}', not '{loaded.trait.name}'; "
                          "pass the matching --trait")
    the_judge = judge if isinstance(judge, Judge) else make_judge(judge, model, loaded.trait)
    if hasattr(the_judge, "check"):
        the_judge.check()
    identity = {"model_id": model.model_id, "fingerprint": model.fingerprint, "trait": loaded.trait.name,
                "trait_sha256": loaded.sha256, "judge": the_judge.name, "vector_digest": vector.digest(),
                "layer": read_layer, **asdict(s), **run_settings(engine)}
    folder = open_run(run_dir, "monitor", identity) if run_dir is not None else None
    with engine_scope(model, engine) as eng:
        shots = shot_examples(model, loaded, the_judge, s, folder, progress, eng)
        points = _points(model, loaded, vector, the_judge, s, folder, read_layer, shots, chunk, eng, progress)
    result = summarize(points, layer=read_layer, judge=the_judge, identity=identity, shots=shots,
                       n_layers=model.n_layers)
    result["engine"] = engine_record(engine)
    if folder is not None:
        write_outputs(folder, points, result)
    return result


def _points(model: Model, loaded: LoadedTrait, vector: PersonaVector, the_judge: Judge, s: MonitorSettings,
            folder: Path | None, read_layer: int, shots: list[dict[str, Any]], chunk: int, engine: Engine,
            progress: Progress) -> list[dict[str, Any]]:
    """Every prompt × question point of the plan, the finished ones read back from the run folder."""
    tok = model.tokenizer
    plan = plan_prompts(loaded, s, shots)
    refs = _references(model, loaded, s, folder, progress, engine)
    authored = _authored(model, loaded)
    profile_dirs = directions({f"L{ly}": vector for ly in range(1, model.n_layers + 1)},
                              {f"L{ly}": ly for ly in range(1, model.n_layers + 1)})
    main = f"L{read_layer}"

    done = Records(folder / "points.jsonl" if folder else None)
    progress("points", sum(p.key in done for p in plan), len(plan))
    for position, part in pending_chunks(plan, done, chunk):
        prompts = [encode_chat(tok, p.messages) for p in part]
        outs = generate_ids(model, [pr for pr in prompts for _ in range(s.rollouts)], max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, seed=chunk_seed(s.seed, position), progress=progress,
                            task="answers", engine=engine)
        texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
        items = [JudgeItem(p.question, texts[i * s.rollouts + r], p.messages[0]["content"]
                           if p.condition == "graded" else None) for i, p in enumerate(part) for r in range(s.rollouts)]
        scores = the_judge.score_batch(items, loaded.trait.rubric, progress=progress)
        rows = []
        for i, (p, prompt) in enumerate(zip(part, prompts, strict=True)):
            ref = refs.get(p.question_idx, {})
            answers = [encode_response(tok, texts[i * s.rollouts + r]) for r in range(s.rollouts)]
            with_t, without_t = authored.get(p.question_idx, ([], []))
            conts = [ref.get("positive", []), ref.get("negative", []), *answers, *with_t, *without_t]
            profile, lps, projs = prompt_readings(model, prompt, conts, profile_dirs, main)
            lp_pos, lp_neg = (lps[0], lps[1]) if s.judge_free else (None, None)
            a = 2 + s.rollouts
            lp_w, lp_wo = mean(lps[a:a + len(with_t)]), mean(lps[a + len(with_t):])
            projs = projs[:a]
            sc = scores[i * s.rollouts:(i + 1) * s.rollouts]
            rows.append({"key": p.key, "condition": p.condition, "level": p.level, "label": p.label,
                         "question_idx": p.question_idx, "question": p.question, "prompt_tokens": len(prompt),
                         "projection": profile[read_layer - 1], "profile": profile,
                         "answers": [texts[i * s.rollouts + r] for r in range(s.rollouts)],
                         "trait_scores": sc, "trait_score": mean(sc), "response_projections": projs[2:],
                         "response_projection": mean(projs[2:]), "lp_positive": lp_pos, "lp_negative": lp_neg,
                         "judge_free": None if lp_pos is None or lp_neg is None else lp_pos - lp_neg,
                         "reference": None if lp_w is None or lp_wo is None else lp_w - lp_wo})
        done.add(rows)
        progress("points", position + len(part), len(plan))
    return [done[p.key] for p in plan]


def _scopes(points: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    scopes = {"overall": list(points)}
    for c in CONDITIONS:
        sub = [p for p in points if p["condition"] == c]
        if sub:
            scopes[c] = sub
    return scopes


def levels(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (condition, level) means: the points the paper's scatter plots average over questions."""
    out = []
    keys = list(dict.fromkeys((p["condition"], p["level"]) for p in points))
    for cond, level in keys:
        sub = [p for p in points if p["condition"] == cond and p["level"] == level]
        out.append({"condition": cond, "level": level, "label": sub[0]["label"], "n": len(sub),
                    "projection": mean([p["projection"] for p in sub]),
                    "trait_score": mean([p["trait_score"] for p in sub]),
                    "judge_free": mean([p["judge_free"] for p in sub]),
                    "reference": mean([p.get("reference") for p in sub]),
                    "response_projection": mean([p["response_projection"] for p in sub])})
    return out


def summarize(points: Sequence[dict[str, Any]], *, layer: int, judge: Judge, identity: dict[str, Any],
              shots: Sequence[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    measures = ("reference", "trait_score", "judge_free")
    lv = levels(points)
    r: dict[str, dict[str, float | None]] = {m: {} for m in measures}
    r_levels: dict[str, dict[str, float | None]] = {m: {} for m in measures}
    r_within: dict[str, dict[str, float | None]] = {m: {} for m in measures}
    for scope, sub in _scopes(points).items():
        sub_levels = [x for x in lv if scope == "overall" or x["condition"] == scope]
        for m in measures:
            r[m][scope] = pearson([p["projection"] for p in sub], [p.get(m) for p in sub])
            r_levels[m][scope] = pearson([x["projection"] for x in sub_levels], [x[m] for x in sub_levels])
            r_within[m][scope] = within_levels(sub, m)
    headline = "reference" if any(p.get("reference") is not None for p in points) else "trait_score"
    measure = "reference" if headline == "reference" else judge.name
    r_response = pearson([v for p in points for v in p["response_projections"]],
                         [s for p in points for s in p["trait_scores"]])
    profile = {m: {scope: [pearson([p["profile"][ly - 1] for p in sub], [p.get(m) for p in sub])
                           for ly in range(1, n_layers + 1)] for scope, sub in _scopes(points).items()}
               for m in measures}
    prompt_cal = calibrate(points, lambda p: [p["projection"]] * len(p["trait_scores"]), judge.threshold)
    response_cal = calibrate(points, lambda p: p["response_projections"], judge.threshold)
    monitor_meta = {"layer": layer, "position": "last_prompt", "vector_position": "response",
                    "threshold": prompt_cal["threshold"], "response_threshold": response_cal["threshold"],
                    "balanced_accuracy": prompt_cal["balanced_accuracy"],
                    "heldout_balanced_accuracy": prompt_cal["heldout_balanced_accuracy"],
                    "measure": measure, "r": r[headline]["overall"], "r_graded": r[headline].get("graded"),
                    "r_many_shot": r[headline].get("many_shot"), "r_judge": r["trait_score"]["overall"],
                    "r_judge_free": r["judge_free"]["overall"], "judge": judge.name,
                    "judge_threshold": judge.threshold, "n_answers": prompt_cal["n_answers"],
                    "trait_sha256": identity["trait_sha256"], "run": settings_hash(identity), "created": now_iso()}
    return {"trait": identity["trait"], "model_id": identity["model_id"], "fingerprint": identity["fingerprint"],
            "vector_digest": identity["vector_digest"], "layer": layer, "judge": judge.name,
            "judge_threshold": judge.threshold, "settings": identity, "n_points": len(points),
            "measure": measure, "pearson": r, "pearson_levels": r_levels, "pearson_within_levels": r_within,
            "pearson_response_projection": r_response,
            "levels": lv, "calibration": {"prompt": prompt_cal, "response": response_cal},
            "layer_profile": {"note": "diagnostic only: the reading layer was fixed before the run", **profile},
            "shots": {"n": len(shots), "expressing": sum(1 for x in shots if x["score"] is not None and x["score"] >= judge.threshold),
                      "source": "model answers to extraction questions under positive system prompts"},
            "monitor_meta": monitor_meta}


def write_outputs(folder: Path, points: Sequence[dict[str, Any]], result: dict[str, Any]) -> None:
    """results.json, results.csv (one row per prompt × question) and monitor.png, each written atomically."""
    from .report.monitor_plot import scatter_png

    write_json(folder / "results.json", result)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for p in points:
        w.writerow({**{k: ("" if p.get(k) is None else (f"{p[k]:.6g}" if isinstance(p[k], float) else p[k]))
                       for k in CSV_FIELDS}, "n_answers": len(p["answers"])})
    write_text(folder / "results.csv", buf.getvalue())
    with atomic_path(folder / "monitor.png") as tmp:
        tmp.write_bytes(scatter_png(points, result))


def store_calibration(vector_path: str | Path, result: dict[str, Any], out_path: str | Path | None = None) -> Path:
    """Write the result's meta["monitor"] block into a vector file (atomically; in place unless `out_path`).
    Refused when the file's directions are not the ones the experiment measured."""
    vec = PersonaVector.load(vector_path)
    if vec.digest() != result["vector_digest"]:
        raise VectorError(f"{vector_path} holds other directions than the monitored vector "
                          f"({vec.digest()} ≠ {result['vector_digest']}); rerun monitor-eval on it")
    return vec.with_meta(monitor=result["monitor_meta"]).save(out_path or vector_path)
