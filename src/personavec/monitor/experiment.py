"""The monitoring experiment end to end: check the inputs, build the prompts, read every prompt ×
question point (resumably, a chunk at a time), summarize and write the results."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..chat import encode_chat, encode_response
from ..engines import engine_record, engine_scope, run_settings
from ..errors import VectorError
from ..generation import generate_ids
from ..judges import Judge, JudgeItem, make_judge
from ..layers import check_layer
from ..progress import Progress, no_progress
from ..projection import directions
from ..runs import Records, chunk_seed, open_run, pending_chunks
from ..stats import mean
from ..traits import LoadedTrait, load_trait
from ..vectors import PersonaVector
from .prompts import PromptSpec, check_graded, plan_prompts, shot_examples
from .readings import authored_ids, prompt_readings, reference_ids
from .results import MonitorSummary, summarize, write_outputs
from .settings import MonitorSettings

if TYPE_CHECKING:
    import torch

    from ..engines import Engine
    from ..models import Model


@dataclass(frozen=True)
class MonitorJob:
    """One monitoring run's checked inputs, shared by its phases."""

    model: Model
    trait: LoadedTrait
    vector: PersonaVector
    judge: Judge
    settings: MonitorSettings
    layer: int  # where the projection is read
    identity: dict[str, Any]  # the run folder's settings, also stored in the results
    folder: Path | None


@dataclass(frozen=True)
class Continuations:
    """What every prompt of a question is scored on besides its own answers: the judge-free reference
    answers ({question: {"positive"/"negative": ids}}) and the trait file's authored references
    ({question: (with-trait ids, without-trait ids)}); and the directions read at every layer."""

    references: dict[int, dict[str, list[int]]]
    authored: dict[int, tuple[list[list[int]], list[list[int]]]]
    directions: dict[str, tuple[int, torch.Tensor]]


def monitor_eval(model: Model, trait: str | Path | LoadedTrait, vector: PersonaVector, *,
                 judge: Judge | str | None = None, settings: MonitorSettings | None = None, layer: int | None = None,
                 run_dir: str | Path | None = None, allow_mismatch: bool = False, chunk: int = 16,
                 engine: Engine | str | None = None, progress: Progress = no_progress) -> MonitorSummary:
    """Run the monitoring experiment; returns its results (also results.json in the run folder).

    `layer`: where the projection is read (default: the vector's chosen layer). With `run_dir`, every point
    is stored as it finishes and a rerun resumes. `engine` ("hf", "vllm" or an engine object) samples the
    shot examples, reference answers and answers; every reading is taken on the Hugging Face model."""
    job = _prepare(model, trait, vector, judge=judge, settings=settings, layer=layer, run_dir=run_dir,
                   allow_mismatch=allow_mismatch, engine=engine)
    with engine_scope(model, engine) as eng:
        shots = shot_examples(model, job.trait, job.judge, job.settings, job.folder, progress, eng)
        points = _points(job, shots, chunk, eng, progress)
    result = summarize(points, layer=job.layer, judge=job.judge, identity=job.identity, shots=shots,
                       n_layers=model.n_layers, engine=engine_record(engine))
    if job.folder is not None:
        write_outputs(job.folder, points, result)
    return result


def _prepare(model: Model, trait: str | Path | LoadedTrait, vector: PersonaVector, *, judge: Judge | str | None,
             settings: MonitorSettings | None, layer: int | None, run_dir: str | Path | None,
             allow_mismatch: bool, engine: Engine | str | None) -> MonitorJob:
    """Everything that can be refused is refused before any answer is sampled; then the run folder opens."""
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
    return MonitorJob(model, loaded, vector, the_judge, s, read_layer, identity, folder)


def _continuations(job: MonitorJob, engine: Engine, progress: Progress) -> Continuations:
    n_layers = job.model.n_layers
    refs = reference_ids(job.model, job.trait, job.settings, job.folder, progress, engine)
    authored = authored_ids(job.model, job.trait)
    dirs = directions({f"L{ly}": job.vector for ly in range(1, n_layers + 1)},
                      {f"L{ly}": ly for ly in range(1, n_layers + 1)})
    return Continuations(refs, authored, dirs)


def _points(job: MonitorJob, shots: list[dict[str, Any]], chunk: int, engine: Engine,
            progress: Progress) -> list[dict[str, Any]]:
    """Every prompt × question point of the plan, the finished ones read back from the run folder."""
    plan = plan_prompts(job.trait, job.settings, shots)
    conts = _continuations(job, engine, progress)
    done = Records(job.folder / "points.jsonl" if job.folder else None)
    progress("points", sum(p.key in done for p in plan), len(plan))
    for position, part in pending_chunks(plan, done, chunk):
        prompts = [encode_chat(job.model.tokenizer, p.messages) for p in part]
        texts, scores = _answers(job, part, prompts, chunk_seed(job.settings.seed, position), engine, progress)
        k = job.settings.rollouts
        done.add([_point(job, conts, p, prompt, texts[i * k:(i + 1) * k], scores[i * k:(i + 1) * k])
                  for i, (p, prompt) in enumerate(zip(part, prompts, strict=True))])
        progress("points", position + len(part), len(plan))
    return [done[p.key] for p in plan]


def _answers(job: MonitorJob, part: list[PromptSpec], prompts: list[list[int]], seed: int, engine: Engine,
             progress: Progress) -> tuple[list[str], list[float | None]]:
    """`rollouts` sampled answers per prompt (prompt-major) and the judge's score of each."""
    s, tok = job.settings, job.model.tokenizer
    outs = generate_ids(job.model, [pr for pr in prompts for _ in range(s.rollouts)], max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature, seed=seed, progress=progress, task="answers", engine=engine)
    texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    items = [JudgeItem(p.question, texts[i * s.rollouts + r], p.messages[0]["content"]
                       if p.condition == "graded" else None) for i, p in enumerate(part) for r in range(s.rollouts)]
    return texts, job.judge.score_batch(items, job.trait.trait.rubric, progress=progress)


def _point(job: MonitorJob, conts: Continuations, p: PromptSpec, prompt: list[int], texts: list[str],
           scores: list[float | None]) -> dict[str, Any]:
    """One prompt × question: its readings, its answers' scores, and the likelihood-gap measures."""
    s, tok = job.settings, job.model.tokenizer
    ref = conts.references.get(p.question_idx, {})
    answers = [encode_response(tok, t) for t in texts]
    with_t, without_t = conts.authored.get(p.question_idx, ([], []))
    continuations = [ref.get("positive", []), ref.get("negative", []), *answers, *with_t, *without_t]
    profile, lps, projs = prompt_readings(job.model, prompt, continuations, conts.directions, f"L{job.layer}")
    lp_pos, lp_neg = (lps[0], lps[1]) if s.judge_free else (None, None)
    a = 2 + s.rollouts
    lp_w, lp_wo = mean(lps[a:a + len(with_t)]), mean(lps[a + len(with_t):])
    projs = projs[:a]
    return {"key": p.key, "condition": p.condition, "level": p.level, "label": p.label,
            "question_idx": p.question_idx, "question": p.question, "prompt_tokens": len(prompt),
            "projection": profile[job.layer - 1], "profile": profile, "answers": texts,
            "trait_scores": scores, "trait_score": mean(scores), "response_projections": projs[2:],
            "response_projection": mean(projs[2:]), "lp_positive": lp_pos, "lp_negative": lp_neg,
            "judge_free": None if lp_pos is None or lp_neg is None else lp_pos - lp_neg,
            "reference": None if lp_w is None or lp_wo is None else lp_w - lp_wo}
