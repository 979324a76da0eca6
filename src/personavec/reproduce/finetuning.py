"""Stage 5: finetuning on authored data the vector never saw (issue 13), and the vaccine comparison on the II set
(`vaccine`).

Per trait, before any training: each set's mean ΔP (`personavec.screen.screen`, fast mode, at the sweep's
layer), the screening prediction. Then per set × seed: a LoRA finetune (`personavec.training.train`) of a
float32 copy of the model, merged and measured: the reference measure per evaluation question, perplexity and
quiz accuracy, and the finetuning shift (mean last-prompt activation minus the base model's, on the unit vector
at the layer) beside the same shift on the random directions (the control). Reported: each set's measure over
seeds, II − normal paired by seed, and r of (a) the shift and (b) the dataset's ΔP with the trait change over
the finetunes (t intervals over seeds, bootstrap intervals of r, as the experiment). Then, for the traits of
`finetune.vaccine_traits`, each method of `finetune.vaccine` on the II set (see `vaccine`). This is the
measurement of experiments/finetune_authored.py (`Bench`) as library code."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..capability import neutral_texts, perplexity, quiz_accuracy, quiz_items
from ..controls import random_like
from ..errors import PersonavecError
from ..evaluate import question_indices
from ..io import write_text
from ..models import Model
from ..progress import Progress, no_progress
from ..reference import reference_measure
from ..runs import Records
from ..screen import screen
from ..textfiles import read_user_text
from ..training import TrainSettings, attach_adapter, train
from ..training.shift import eval_prompts, last_prompt_means, project
from ..traits import LoadedTrait
from ..vectors import PersonaVector
from .context import Context, NotRun
from .extraction import ExtractionResult
from .manifest import SKIPPED
from .records import Correlation, Interval, correlation, t_interval
from .settings import FinetuneStage
from .steering import SteeringResult
from .vaccine import (
    II,
    NORMAL,
    Scored,
    VaccineMethod,
    choose,
    conditions,
    control_of,
    direction,
    inference_coef,
    interventions_for,
)
from .vaccine import summarize as summarize_method

BASE = "base"
ADAPTER_DONE = ("adapter_model.safetensors", "train_summary.json")


@dataclass(frozen=True)
class Measured:
    """One model (the base, or one finetune) measured after training."""

    set: str
    seed: int | None
    reference: float
    reference_per_question: list[float]
    questions: list[int]
    shift: float
    shift_random: list[float]
    perplexity: float
    quiz: float
    seconds: float
    condition: str = "plain"  # a vaccine condition of the II set ('prevent:1', 'caft', 'infer:2', ...)

    def scored(self) -> Scored:
        return Scored(self.condition, self.seed, dict(zip(self.questions, self.reference_per_question, strict=True)),
                      self.perplexity, self.quiz)


@dataclass(frozen=True)
class FinetuneTrait:
    trait: str
    layer: int
    dataset_delta_p: dict[str, float]  # mean ΔP of each set before training (fast mode)
    base: Measured
    runs: list[Measured]
    change: dict[str, Interval]  # per set: reference − base, t interval over seeds
    ii_minus_normal: Interval | None  # paired by seed, t interval
    r_shift: Correlation  # (a) over the finetunes, bootstrap interval
    r_delta_p: Correlation  # (b) over the finetunes, bootstrap interval
    vaccine: dict[str, VaccineMethod] = field(default_factory=dict)  # per method, on the II set
    vaccine_runs: list[Measured] = field(default_factory=list)  # every vaccine finetune, grid included
    vaccine_questions: tuple[list[int], list[int]] = ([], [])  # (selection half, report half)


@dataclass(frozen=True)
class FinetuneResult:
    traits: dict[str, FinetuneTrait]


def training_copy(model: Model, float32: bool) -> Model:
    """A private copy to train from (training injects adapters), in float32 when asked (bf16 LoRA on a CPU
    barely moves). The whole Model is copied at once, so its `layers` are the copy's blocks, where the capture
    hooks must go."""
    copied = copy.deepcopy(dataclasses.replace(model, extra={}))
    if float32:
        copied.hf.float()
    return copied


def rows_of(data: Path, out: Path, max_rows: int | None) -> Path:
    """The set to train on: `data` itself, or its first `max_rows` rows copied into the run folder."""
    if max_rows is None:
        return data
    lines = [ln for ln in read_user_text(data, "authored set").split("\n") if ln.strip()][:max_rows]
    target = out / data.name
    if not target.exists():
        write_text(target, "\n".join(lines) + "\n")
    return target


class Bench:
    """The base model (a private training copy), one trait's vector at a layer and what every finetune is
    compared with. Needs no run folder: experiments can use it as it is."""

    def __init__(self, model: Model, trait: LoadedTrait, vec: PersonaVector, layer: int, *,
                 random_seeds: Sequence[int] = (0, 1, 2), n_questions: int | None = None,
                 n_texts: int | None = None, n_quiz: int | None = None, float32: bool = True,
                 progress: Progress = no_progress) -> None:
        self.trait, self.vec, self.layer, self.progress = trait, vec, layer, progress
        self.n_texts, self.n_quiz = n_texts, n_quiz
        self.base = training_copy(model, float32)
        self.randoms = [random_like(vec, s) for s in random_seeds]
        self.questions = list(range(len(trait.trait.evaluation_questions)))[:n_questions]
        self.prompts = eval_prompts(self.base, trait, n_questions)
        self.base_means = last_prompt_means(self.base, self.prompts)
        self._steered: tuple[Path, Model] | None = None  # the merged adapter inference-time conditions share

    def measure(self, model: Model, name: str, seed: int | None, started: float, condition: str = "plain"
                ) -> Measured:
        """Everything the stage records of a model; an 'infer:C' condition is measured steered by −C × v on
        the responses, except its finetuning shift: that is a property of the weights, read unsteered."""
        coef = inference_coef(condition)
        means = last_prompt_means(model, self.prompts)
        steer = direction(condition, self.vec)
        hooks = steer.steer(model, layer=self.layer, coef=coef, allow_mismatch=True) if coef else nullcontext()
        with hooks:
            ref = reference_measure(model, self.trait.trait, self.questions)
            if ref.mean is None:
                raise PersonavecError(f"no reference answer of trait '{self.trait.trait.name}' could be scored")
            ppl = perplexity(model, neutral_texts()[: self.n_texts])
            quiz = quiz_accuracy(model, quiz_items()[: self.n_quiz])
        return Measured(
            set=name, seed=seed, reference=ref.mean, reference_per_question=ref.gaps,
            questions=[g.question_idx for g in ref.questions],
            shift=float(project(means, self.base_means, self.vec)[self.layer] or 0.0),
            shift_random=[float(project(means, self.base_means, r)[self.layer] or 0.0) for r in self.randoms],
            perplexity=ppl, quiz=quiz, seconds=round(time.time() - started, 1), condition=condition)

    def release(self) -> None:
        """Drop the shared merged copy of the inference-time conditions."""
        self._steered = None

    def finetune(self, data: Path, out: Path, settings: TrainSettings, condition: str = "plain") -> Model:
        """Train (or resume, or reuse a finished adapter in `out`) under the condition's interventions and return
        the merged model. Inference-time conditions steer an adapter that is already trained: consecutive ones
        on the same adapter share one merged copy (a model's worth of memory, freed before any training)."""
        shared = inference_coef(condition) != 0
        if shared and self._steered is not None and self._steered[0] == out:
            return self._steered[1]
        self._steered = None
        if not all((out / name).exists() for name in ADAPTER_DONE):
            train(copy.deepcopy(self.base), data, out, settings, interventions_for(condition, self.vec, self.layer),
                  allow_mismatch=True, progress=self.progress)
        model = attach_adapter(copy.deepcopy(self.base), out, merge=True, allow_mismatch=True)
        if shared:
            self._steered = (out, model)
        return model


def train_settings(f: FinetuneStage, seed: int) -> TrainSettings:
    return TrainSettings(rank=f.rank, alpha=f.alpha, rslora=True, lr=f.lr, epochs=f.epochs, batch_size=f.batch_size,
                         max_length=f.max_length, max_steps=f.max_steps, save_steps=1000, seed=seed)


def _measured(row: dict[str, Any]) -> Measured:
    return Measured(**{f.name: row[f.name] for f in dataclasses.fields(Measured) if f.name in row})


def paired_difference(runs: Sequence[Measured], a: str, b: str) -> Interval | None:
    """Set `a`'s reference measure minus set `b`'s, paired by seed, with a t interval (None: no seed has both)."""
    by = {(r.set, r.seed): r.reference for r in runs}
    diffs = [by[(a, seed)] - by[(b, seed)] for (n, seed) in by if n == a and (b, seed) in by]
    return t_interval(diffs) if diffs else None


def summarize(name: str, layer: int, dps: dict[str, float], base: Measured, runs: Sequence[Measured]
              ) -> FinetuneTrait:
    """Change over the base per set, II − normal paired by seed, and the (a) / (b) correlations."""
    sets = list(dict.fromkeys(r.set for r in runs))
    change = {s: t_interval([r.reference - base.reference for r in runs if r.set == s]) for s in sets}
    delta = [r.reference - base.reference for r in runs]
    return FinetuneTrait(
        trait=name, layer=layer, dataset_delta_p=dps, base=base, runs=list(runs), change=change,
        ii_minus_normal=paired_difference(runs, II, NORMAL),
        r_shift=correlation([r.shift for r in runs], delta, bootstrap=True),
        r_delta_p=correlation([dps[r.set] for r in runs], delta, bootstrap=True))


def missing_sets(ctx: Context, data: Path, sets: Sequence[str]) -> NotRun | None:
    """The stage's skip record when `data` lacks one of the sets it needs for some trait, else None."""
    missing = [f"{t}/{s}.jsonl" for t in ctx.traits for s in sets if not (data / t / f"{s}.jsonl").is_file()]
    return NotRun(SKIPPED, f"--data {data} lacks {', '.join(missing[:3])}") if missing else None


def trait_inputs(ctx: Context, stage: str) -> Iterator[tuple[str, int, PersonaVector, Path]]:
    """(trait, the sweep's layer, the extracted vector, the stage's work folder) for each trait of the run."""
    vectors = ctx.result("extract", ExtractionResult)
    steering = ctx.result("sweep", SteeringResult)
    for name in ctx.traits:
        work = ctx.stage_dir(stage, name)
        work.mkdir(parents=True, exist_ok=True)
        yield name, steering.traits[name].layer, PersonaVector.load(vectors.path(ctx.folder, name)), work


def run_finetuning(ctx: Context) -> FinetuneResult | NotRun:
    f, data = ctx.settings.finetune, ctx.settings.data
    if data is None:
        return NotRun(SKIPPED, "no --data folder of authored finetuning sets (<trait>/<set>.jsonl; "
                               "experiments/data/finetune_authored is not in the wheel)")
    lacking = missing_sets(ctx, Path(data), f.sets)
    if lacking:
        return lacking
    out = {}
    for name, layer, vec, work in trait_inputs(ctx, "finetune"):
        sets = {s: rows_of(Path(data) / name / f"{s}.jsonl", work, f.max_rows) for s in f.sets}
        dps = {s: float(screen(ctx.model, p, [vec], work / f"{s}.dp.csv", fast=True, layer=layer, histograms=False,
                               cache=work / "base-answers.sqlite", progress=ctx.progress).summary.traits[vec.trait].delta_p["mean"])
               for s, p in sets.items()}
        bench = bench_for(ctx, name, vec, layer)
        done = Records(work / "runs.jsonl")
        base, runs = plain_runs(bench, f, sets, work, done)
        trait = summarize(name, layer, dps, base, runs)
        if f.vaccine and name in (f.vaccine_traits or ctx.traits):
            trait = run_vaccine(bench, trait, f, sets[II], work, done)
        out[name] = trait
    return FinetuneResult(out)


def bench_for(ctx: Context, name: str, vec: PersonaVector, layer: int) -> Bench:
    """The trait's bench with the run's settings (the finetune and sharegpt stages measure alike)."""
    f, c = ctx.settings.finetune, ctx.settings.capability
    return Bench(ctx.model, ctx.traits[name], vec, layer, random_seeds=ctx.settings.sweep.random_seeds,
                 n_questions=f.n_questions, n_texts=c.n_texts, n_quiz=c.n_quiz, float32=f.float32,
                 progress=ctx.progress)


def stage_records(ctx: Context, name: str, layer: int, work: Path) -> Records:
    """The finetunes recorded in `work`, with the base model's measurement taken from the finetune stage when it
    measured the same trait at the same layer (same bench settings: the same values), so no stage measures the
    base model twice."""
    done = Records(work / "runs.jsonl")
    earlier = ctx.results.get("finetune")
    if BASE not in done and isinstance(earlier, FinetuneResult) and name in earlier.traits \
            and earlier.traits[name].layer == layer:
        done.add([{"key": BASE, **dataclasses.asdict(earlier.traits[name].base)}])
    return done


def plain_runs(bench: Bench, f: FinetuneStage, sets: dict[str, Path], work: Path, done: Records
               ) -> tuple[Measured, list[Measured]]:
    """The base model measured and one plain finetune per set × seed (each recorded in `done` as it finishes, so
    a rerun trains only what is missing); the runs in set order, then seed order."""
    if BASE not in done:
        done.add([{"key": BASE, **dataclasses.asdict(bench.measure(bench.base, BASE, None, time.time()))}])
    runs = [recorded(bench, done, f"{s}:{seed}", path, work / f"{s}_s{seed}", train_settings(f, seed), s, seed)
            for s, path in sets.items() for seed in f.seeds]
    return _measured(done[BASE]), runs


def recorded(bench: Bench, done: Records, key: str, data: Path, folder: Path, settings: TrainSettings, name: str,
             seed: int, condition: str = "plain") -> Measured:
    """The finetune recorded under `key`, trained (or its adapter in `folder` reused) and measured first when
    `done` lacks it: every finetune of the stage goes through here, so a rerun repeats none."""
    if key not in done:
        t0 = time.time()
        model = bench.finetune(data, folder, settings, condition)
        done.add([{"key": key, **dataclasses.asdict(bench.measure(model, name, seed, t0, condition))}])
    return _measured(done[key])


def grid_of(f: FinetuneStage, method: str) -> list[str]:
    values = {"prevent": f.preventative_coefs, "penalty": f.penalty_weights, "infer": f.infer_coefs}.get(method, ())
    return conditions(method, values)


def run_vaccine(bench: Bench, trait: FinetuneTrait, f: FinetuneStage, data: Path, work: Path, done: Records
                ) -> FinetuneTrait:
    """Each method of `f.vaccine` on the II set: its grid at the first seed, the condition chosen on the first
    half of the questions at the other seeds (`vaccine` module); returns `trait` with the comparison added."""
    seeds = list(f.seeds)
    plain = {r.seed: r.scored() for r in trait.runs if r.set == II and r.seed is not None}
    normal = {r.seed: r.scored() for r in trait.runs if r.set == NORMAL and r.seed is not None}
    questions = sorted(plain[seeds[0]].per_question)  # halves as everywhere else (`evaluate.question_indices`)
    select, report = ([questions[k] for k in question_indices(len(questions), half)] for half in ("first", "second"))

    def run(condition: str, seed: int) -> Measured:  # inference-time conditions measure the plain II adapter
        tag = "" if inference_coef(condition) else "_" + condition.replace(":", "")
        return recorded(bench, done, f"{II}:{condition}:{seed}", data, work / f"{II}{tag}_s{seed}",
                        train_settings(f, seed), II, seed, condition)

    methods, measured = {}, []
    for method in f.vaccine:
        grid = [run(c, seeds[0]) for c in grid_of(f, method)]
        chosen = choose([g.scored() for g in grid], normal[seeds[0]], plain[seeds[0]], select, f.vaccine_ppl_cap)
        at_seeds = [next(g for g in grid if g.condition == chosen)] + [run(chosen, s) for s in seeds[1:]]
        controls = [run(control_of(chosen), s) for s in seeds] if f.vaccine_controls else []
        measured += grid + at_seeds[1:] + controls
        methods[method] = summarize_method(method, [g.scored() for g in grid], [m.scored() for m in at_seeds],
                                           normal, plain, select, report, [c.scored() for c in controls])
    bench.release()
    return dataclasses.replace(trait, vaccine=methods, vaccine_runs=measured, vaccine_questions=(select, report))
