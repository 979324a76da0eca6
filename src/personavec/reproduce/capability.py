"""Stage 3: capability at the chosen steering setting, item by item so that every figure has an interval:
perplexity of each shipped neutral text and the right/wrong answer of each quiz item, unsteered and
steered at the sweep's layer and +coefficient; with `capability.lm_eval_tasks` (the paper preset: mmlu) also
lm-evaluation-harness multiple-choice tasks, item by item, through `personavec.capability.lm_eval_tasks`.
Items are stored per condition (capability.items.jsonl, capability.lm_eval.jsonl) and reused on a rerun.

lm-eval scores with cache-free forwards over context + continuation that declare no prompt/response layout, so
its steered condition steers every position (positions="all"); perplexity and the quiz keep the generation
meaning (positions="response"). Without lm-eval, or without a task's data (MMLU: the cais/mmlu data set in the
Hugging Face cache, or a network), the tasks are skipped and the one-line reason is kept in the result
(`lm_eval_skipped`); perplexity and the quiz are measured all the same."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

from ..capability import neutral_texts, perplexity, quiz_accuracy, quiz_items
from ..capability.lm_eval_tasks import LmEvalUnavailable, LoadedTasks, load_tasks, run_tasks
from ..runs import Records
from ..vectors import PersonaVector
from .context import Context
from .extraction import ExtractionResult
from .records import Interval, interval
from .steering import SteeringResult

BASE = "unsteered"
LM_EVAL_BATCH = 8


@dataclass(frozen=True)
class Items:
    """Per-item capability of one condition."""

    perplexity: list[float]  # one per neutral text
    quiz: list[float]  # 1.0 right, 0.0 wrong, one per quiz item


@dataclass(frozen=True)
class LmEvalTask:
    """One lm-eval task at one trait's chosen setting: accuracy unsteered and steered (positions="all"), and the
    paired per-item change (steered − unsteered, items matched by subtask and document)."""

    task: str
    base: Interval
    steered: Interval
    change: Interval


@dataclass(frozen=True)
class CapabilityTrait:
    trait: str
    layer: int
    coef: float
    log_ppl_change: Interval  # per text: log(steered perplexity ÷ unsteered)
    quiz_base: Interval
    quiz_steered: Interval
    quiz_change: Interval  # per item: steered − unsteered (paired)
    steered: Items
    lm_eval: dict[str, LmEvalTask] = field(default_factory=dict)  # by task name; empty when not run or skipped

    @property
    def ppl_ratio(self) -> float | None:
        m = self.log_ppl_change.mean
        return None if m is None else math.exp(m)


@dataclass(frozen=True)
class CapabilityResult:
    base: Items
    traits: dict[str, CapabilityTrait]
    lm_eval_tasks: tuple[str, ...] = ()  # the lm-eval tasks asked for (capability.lm_eval_tasks)
    lm_eval_base: dict[str, Interval] = field(default_factory=dict)  # unsteered accuracy by task
    lm_eval_skipped: str = ""  # why the lm-eval tasks were not (all) measured; "" when they were or none asked


def measure_items(ctx: Context) -> Items:
    """The model as it runs now (steered by the caller or not), one text and one quiz item at a time."""
    c = ctx.settings.capability
    texts, quiz = neutral_texts()[: c.n_texts], quiz_items()[: c.n_quiz]
    ppl = [perplexity(ctx.model, [t]) for t in texts]
    ctx.progress("capability items", len(texts), len(texts) + len(quiz))
    right = [quiz_accuracy(ctx.model, [q]) for q in quiz]
    ctx.progress("capability items", len(texts) + len(quiz), len(texts) + len(quiz))
    return Items(ppl, right)


class LmEvalItems:
    """lm-eval per-item correctness by condition, stored in capability.lm_eval.jsonl (one row per condition and
    task); the tasks are loaded once, on the first condition that needs them, and a failed load is remembered
    (the skip reason) so that the other conditions do not try again."""

    def __init__(self, ctx: Context) -> None:
        c = ctx.settings.capability
        self.ctx, self.names, self.include, self.limit = ctx, tuple(c.lm_eval_tasks), c.lm_eval_include, \
            c.lm_eval_limit
        self.done = Records(ctx.folder / "capability.lm_eval.jsonl")
        self.loaded: LoadedTasks | None = None
        self.skipped = ""

    def __call__(self, key: str, vec: PersonaVector | None, layer: int, coef: float
                 ) -> dict[str, dict[str, float]] | None:
        """{task: {item id: 1.0 right / 0.0 wrong}} of one condition; None when skipped."""
        if not self.names:
            return None
        if any(f"{key}|{t}" not in self.done for t in self.names):
            if self.skipped:
                return None
            try:
                if self.loaded is None:
                    self.loaded = load_tasks(self.names, include_path=self.include)
                # every position: lm-eval's forwards declare no prompt/response layout (see the module docstring)
                hooks = nullcontext() if vec is None else vec.steer(self.ctx.model, layer=layer, coef=coef,
                                                                     positions="all")
                with hooks:
                    got = run_tasks(self.ctx.model, self.loaded, limit=self.limit, batch_size=LM_EVAL_BATCH,
                                    progress=self.ctx.progress)
            except LmEvalUnavailable as exc:
                self.skipped = str(exc)
                return None
            self.done.add([{"key": f"{key}|{t}", "condition": key, "task": t, "limit": self.limit,
                            "items": got.tasks[t].item_ids, "correct": got.tasks[t].correct,
                            "lm_eval_version": got.lm_eval_version} for t in self.names])
        return {t: dict(zip(self.done[f"{key}|{t}"]["items"], self.done[f"{key}|{t}"]["correct"], strict=True))
                for t in self.names}


def lm_eval_task(task: str, base: dict[str, float], steered: dict[str, float]) -> LmEvalTask:
    """Accuracies and the paired change over the items both conditions scored."""
    ids = [i for i in base if i in steered]
    return LmEvalTask(task=task, base=interval([base[i] for i in ids]), steered=interval([steered[i] for i in ids]),
                      change=interval([steered[i] - base[i] for i in ids]))


def run_capability(ctx: Context) -> CapabilityResult:
    steering = ctx.result("sweep", SteeringResult)
    vectors = ctx.result("extract", ExtractionResult)
    done = Records(ctx.folder / "capability.items.jsonl")
    lm_items = LmEvalItems(ctx)

    def items(key: str, vec: PersonaVector | None, layer: int, coef: float) -> Items:
        if key not in done:
            if vec is None:
                got = measure_items(ctx)
            else:
                with vec.steer(ctx.model, layer=layer, coef=coef):
                    got = measure_items(ctx)
            done.add([{"key": key, "perplexity": got.perplexity, "quiz": got.quiz}])
        row = done[key]
        return Items(row["perplexity"], row["quiz"])

    base = items(BASE, None, 0, 0.0)
    base_lm = lm_items(BASE, None, 0, 0.0)
    out = {}
    for name, st in steering.traits.items():
        vec = PersonaVector.load(vectors.path(ctx.folder, name))
        key = f"{name}:L{st.layer}_c{st.coef:+g}"
        it = items(key, vec, st.layer, st.coef)
        steered_lm = lm_items(key, vec, st.layer, st.coef) if base_lm is not None else None
        out[name] = CapabilityTrait(
            trait=name, layer=st.layer, coef=st.coef,
            log_ppl_change=interval([math.log(a / b) for a, b in zip(it.perplexity, base.perplexity, strict=True)]),
            quiz_base=interval(base.quiz), quiz_steered=interval(it.quiz),
            quiz_change=interval([a - b for a, b in zip(it.quiz, base.quiz, strict=True)]), steered=it,
            lm_eval={} if base_lm is None or steered_lm is None else
            {t: lm_eval_task(t, base_lm[t], steered_lm[t]) for t in lm_items.names})
    return CapabilityResult(base, out, lm_eval_tasks=lm_items.names,
                            lm_eval_base={} if base_lm is None else {t: interval(list(v.values()))
                                                                     for t, v in base_lm.items()},
                            lm_eval_skipped=lm_items.skipped)
