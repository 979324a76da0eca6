"""The settings of a `reproduce` run: one frozen dataclass per stage, grouped in `ReproduceSettings`.

Every value can be overridden by a dotted key (`sweep.layers=10,14`, `traits=evil,sycophantic`), parsed by the
field's declared type, so a preset is only a starting point and the manifest records what actually ran."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from ..errors import PersonavecError


@dataclass(frozen=True)
class ExtractStage:
    """Rollouts under the trait's prompt pairs (see `personavec.extract.ExtractSettings`)."""

    n_questions: int | None = 10  # extraction questions (None = all)
    n_pairs: int | None = None  # prompt pairs (None = all)
    rollouts: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0


#: The sweep stage's choice rules (see personavec.reproduce.steering).
RULES = ("rise", "sweep")


@dataclass(frozen=True)
class SweepStage:
    """Layer × coefficient sweep: chosen on the first half of the evaluation questions, reported on the second."""

    rule: str = "rise"  # "rise": experiments/steering_reference.py's rule; "sweep": `personavec sweep`'s rule

    layers: tuple[int, ...] | None = None  # None = `personavec.sweep.default_layers`
    coefs: tuple[float, ...] = (2.0, 4.0, 6.0)  # positive strengths; the report compares −c with +c
    n_select: int | None = 10  # questions of the first half used to choose (None = the whole half)
    n_report: int | None = 10  # questions of the second half reported on (None = the whole half)
    max_new_tokens: int = 16  # answers per cell where they are generated (rule "sweep": their fluency is its
    # coherence check; rule "rise" reads only the reference measure and generates answers for the report half)
    random_seeds: tuple[int, ...] = (0, 1, 2)  # random directions at the vector's per-layer norm
    selection_controls: bool = False  # also run the controls over the whole selection grid (curves per layer)
    coherence_min: float | None = None  # rule "sweep": fluency floor of a chosen cell (None = half the unsteered)
    ppl_ratio_max: float = 1.5  # rule "rise": neutral-text perplexity at ±c at most this many times the unsteered
    rise_vs_random: float = 3.0  # target: own rise at least this many times the largest random |rise|


@dataclass(frozen=True)
class CapabilityStage:
    """Capability at the chosen setting, per item so that intervals can be drawn."""

    n_texts: int | None = None  # shipped neutral texts for perplexity (None = all)
    n_quiz: int | None = None  # shipped quiz items (None = all)
    ppl_ratio_max: float = 1.5  # target: steered perplexity at most this many times the unsteered one
    # lm-evaluation-harness multiple-choice tasks (e.g. mmlu), unsteered and steered at every position; empty: not
    # run. Without lm-eval or the tasks' data (not cached, no network) they are skipped with the reason recorded
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str | None = None  # a folder of task YAMLs for local tasks (None: lm-eval's own tasks only)
    lm_eval_limit: int | None = None  # items per leaf task (for mmlu: per subject; None = all)
    lm_eval_drop_max: float = 0.05  # target: steered accuracy at most this much below the unsteered (paired mean)


@dataclass(frozen=True)
class MonitorStage:
    """The projection-vs-trait experiment (`personavec.monitor.monitor_eval`)."""

    n_questions: int | None = 10  # evaluation questions per prompt (None = all)
    conditions: tuple[str, ...] = ("graded", "many_shot")
    shots: tuple[int, ...] = (0, 5, 10)
    rollouts: int = 1
    max_new_tokens: int = 16
    r_target: float = 0.6  # target: r(projection, reference measure) over all points (issue 12)


#: The vaccine comparison's methods (see personavec.reproduce.vaccine), in the order they run.
VACCINE_METHODS = ("infer", "prevent", "caft", "penalty")


@dataclass(frozen=True)
class FinetuneStage:
    """LoRA finetunes on the authored sets of `--data` (float32 copies of the model), measured afterwards."""

    sets: tuple[str, ...] = ("normal", "II")
    seeds: tuple[int, ...] = (0, 1, 2)
    rank: int = 32
    alpha: int = 64
    lr: float = 3e-4
    epochs: float = 2.0
    batch_size: int = 8
    max_length: int = 192
    max_steps: int | None = None  # None = the epochs decide
    max_rows: int | None = None  # train on the first rows of each set only (None = all)
    n_questions: int | None = None  # evaluation questions for the reference measure and the shift (None = all)
    float32: bool = True  # train a float32 copy (bf16 LoRA on a CPU barely moves); False: the model's own dtype
    # the vaccine comparison on the II set (issue 13 (c); `personavec.reproduce.vaccine`); empty: not run
    vaccine: tuple[str, ...] = VACCINE_METHODS
    vaccine_traits: tuple[str, ...] | None = None  # the traits it runs for (None = all)
    preventative_coefs: tuple[float, ...] = (0.5, 1.0, 2.0)  # grid of prevent:C (+C × v while training)
    penalty_weights: tuple[float, ...] = (0.1, 1.0)  # grid of penalty:W (W × squared projection in the loss)
    infer_coefs: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # grid of infer:C (−C × v on the II finetune's answers)
    vaccine_ppl_cap: float = 1.05  # choice: perplexity at most this many times the plain II finetune's
    # each method's control: its chosen setting again with a random direction of the vector's norm, every seed
    vaccine_controls: bool = True
    removal_target: float = 0.5  # target: preventative steering removes at least this share of II − normal
    ppl_cost_max: float = 0.05  # ... at a perplexity cost of at most this share
    r_shift_target: float = 0.8  # (a) r(finetuning shift, trait change), issue 13
    r_delta_p_target: float = 0.7  # (b) r(dataset ΔP before training, trait change), issue 13


#: The ShareGPT finetuning sets: the K conversations of highest ΔP, K at random, the K of lowest ΔP.
SHAREGPT_SETS = ("top", "random", "bottom")


@dataclass(frozen=True)
class ScreenStage:
    """ΔP screening of the authored sets of `--data` (rows: finetune.max_rows), and of real ShareGPT chats."""

    auc_target: float = 0.85  # target: sample-level ROC AUC of ΔP, II rows vs normal rows
    sharegpt_n: int = 10_000  # English ShareGPT conversations screened (0: skip that stage)
    sharegpt_max_chars: int = 2000  # longer conversations are left out (a CPU screens short ones fast)
    sharegpt_top: int = 20  # top-flagged conversations shown per trait
    min_answer_tokens: int = 16  # shorter replies are not counted (their response mean is noise)
    # issue 13 (d): LoRA finetunes (finetune.* settings and seeds) on the top / random / bottom K conversations by
    # ΔP per trait, measured with the reference measure; 0: not run
    sharegpt_finetune_k: int = 0
    sharegpt_finetune_sets: tuple[str, ...] = SHAREGPT_SETS


@dataclass(frozen=True)
class ReproduceSettings:
    preset: str
    model: str | None = None  # hub id, folder or .gguf (None = the embedded model)
    traits: tuple[str, ...] = ("evil",)
    judge: str | None = None  # extraction filter and monitoring answers (None = the contrast judge)
    engine: str = "hf"
    seed: int = 0
    data: str | None = None  # folder of <trait>/<set>.jsonl authored finetuning sets (not in the wheel)
    requires_judge: bool = False  # the paper preset refuses to start without a judge
    extract: ExtractStage = field(default_factory=ExtractStage)
    sweep: SweepStage = field(default_factory=SweepStage)
    capability: CapabilityStage = field(default_factory=CapabilityStage)
    monitor: MonitorStage = field(default_factory=MonitorStage)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    screen: ScreenStage = field(default_factory=ScreenStage)

    def validate(self) -> None:
        if self.requires_judge and not self.judge:
            raise PersonavecError(f"the {self.preset} preset needs a judge: pass --judge openai:MODEL[@URL] "
                                  "(a 0–100 logprob judge) or --judge local:MODEL")
        if not self.traits:
            raise PersonavecError("name at least one trait (--traits evil,sycophantic)")
        if len(set(self.traits)) != len(self.traits):
            raise PersonavecError(f"--traits names a trait twice: {','.join(self.traits)}")
        if not self.sweep.coefs or any(c <= 0 for c in self.sweep.coefs):
            raise PersonavecError("sweep.coefs must be positive strengths (the report compares −c with +c)")
        if self.sweep.rule not in RULES:
            raise PersonavecError(f"unknown sweep.rule '{self.sweep.rule}'; choose one of {', '.join(RULES)}")
        if not self.sweep.random_seeds:
            raise PersonavecError("sweep.random_seeds needs at least one seed: the random direction is the control")
        if self.capability.lm_eval_limit is not None and self.capability.lm_eval_limit < 1:
            raise PersonavecError("capability.lm_eval_limit must be at least 1 item per task (or none: all)")
        if self.screen.sharegpt_finetune_k < 0 or not set(self.screen.sharegpt_finetune_sets) <= set(SHAREGPT_SETS) \
                or "top" not in self.screen.sharegpt_finetune_sets:
            raise PersonavecError("screen.sharegpt_finetune_k must be 0 (no finetunes) or more, and "
                                  f"screen.sharegpt_finetune_sets must include top and name only {', '.join(SHAREGPT_SETS)}")
        if self.screen.sharegpt_n < 0 or self.screen.sharegpt_top < 1:
            raise PersonavecError("screen.sharegpt_n must be 0 (skip) or more and screen.sharegpt_top at least 1")
        if self.finetune.vaccine:
            unknown = [m for m in self.finetune.vaccine if m not in VACCINE_METHODS]
            if unknown:
                raise PersonavecError(f"unknown finetune.vaccine method '{unknown[0]}'; choose from "
                                      f"{', '.join(VACCINE_METHODS)} (or leave it empty)")
            if not {"normal", "II"} <= set(self.finetune.sets):
                raise PersonavecError("finetune.vaccine compares with the normal and II finetunes: keep normal and II "
                                      "in finetune.sets (or set finetune.vaccine= to skip it)")
            stray = [t for t in self.finetune.vaccine_traits or () if t not in self.traits]
            if stray:
                raise PersonavecError(f"finetune.vaccine_traits names '{stray[0]}', which is not in --traits")
        for name in ("n_select", "n_report"):
            v = getattr(self.sweep, name)
            if v is not None and v < 2:
                raise PersonavecError(f"sweep.{name} must be at least 2 (an interval needs two questions)")


def flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf setting, in declaration order (what --show-preset prints)."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(text: str, kind: Any, key: str) -> Any:
    """`text` as a value of the annotated type `kind` (None/none/null for optional fields)."""
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null", "") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(text, inner, key)
    if origin is tuple:
        return tuple(_parse(part.strip(), args[0], key) for part in text.split(",") if part.strip())
    try:
        if kind is bool:
            if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.strip().lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise PersonavecError(f"--set {key}={text}: expected {getattr(kind, '__name__', kind)}") from None


#: What a preset is, not a setting of it: the paper preset's judge requirement is not switched off by --set.
LOCKED = ("preset", "requires_judge")


def with_overrides(settings: ReproduceSettings, pairs: typing.Iterable[str]) -> ReproduceSettings:
    """`settings` with each 'key=value' applied (dotted keys for stage settings); unknown keys refused."""
    known = flatten(settings)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep:
            raise PersonavecError(f"--set takes key=value, got '{pair}'")
        if key in LOCKED:
            raise PersonavecError(f"'{key}' belongs to the preset and cannot be set; choose another --preset")
        if key not in known:
            raise PersonavecError(f"unknown setting '{key}'; see personavec reproduce --show-preset "
                                  f"{settings.preset} for every key")
        settings = _set(settings, key.split("."), text, key)
    return settings


def _set(obj: Any, path: list[str], text: str, key: str) -> Any:
    name = path[0]
    if len(path) == 1:
        return replace(obj, **{name: _parse(text, _hints(type(obj))[name], key)})
    return replace(obj, **{name: _set(getattr(obj, name), path[1:], text, key)})


def as_dict(settings: ReproduceSettings) -> dict[str, Any]:
    """The settings as plain JSON data (tuples as lists), for the manifest."""
    return typing.cast(dict[str, Any], _plain(dataclasses.asdict(settings)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
