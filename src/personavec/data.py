"""Trait-eliciting finetuning sets built offline from the model's own answers (`personavec data elicit`).

For a trait, the model answers questions that are NOT the trait's evaluation questions (its extraction
questions, plus any extra questions you give) under three kinds of system prompt:

  normal   the negative prompts of the trait's pairs (trait-discouraging answers);
  level1   mild: the trait's graded prompts just above the neutral middle of the scale (e.g. "cynical",
           "hard-edged tactics" for evil); a trait without graded prompts gets a half/half mix of
           normal and level2 answers instead;
  level2   the strong positive prompts of the pairs.

Each set has one row per (question, prompt slot, rollout), the same count for every level, saved as
JSONL rows {"messages": [user, assistant]} WITHOUT the system prompt: finetuning on them teaches the
behaviour, not the instruction. `mix` blends sets into mixtures. The folder is a run folder; a level
whose file exists is not regenerated (rerun the same command to resume)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chat import messages_for
from .engines import engine_scope, run_settings
from .errors import PersonavecError
from .generation import generate
from .io import atomic_path, read_jsonl
from .progress import Progress, no_progress
from .runs import chunk_seed, open_run
from .traits import LoadedTrait, load_trait
from .traits.schema import normalize_question

if TYPE_CHECKING:
    from .engines import Engine
    from .models import Model

LEVELS = ("normal", "level1", "level2")


@dataclass(frozen=True)
class ElicitSettings:
    rollouts: int = 2  # sampled answers per (question, prompt slot)
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    n_prompts: int | None = None  # prompt slots per question (default: the number of pairs)
    batch_size: int = 32

    def validate(self) -> None:
        if self.rollouts < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise PersonavecError("--rollouts, --max-new-tokens and --batch-size must be at least 1")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise PersonavecError("--n-prompts must be at least 1")
        if not self.temperature >= 0:
            raise PersonavecError("--temperature must be ≥ 0")


def level_prompts(trait: LoadedTrait) -> dict[str, list[str] | None]:
    """System prompts per level; level1 is None when the trait has too few graded prompts (then a mix)."""
    t = trait.trait
    graded = t.graded_prompts
    level1: list[str] | None = None
    if len(graded) >= 4:
        upper = graded[len(graded) // 2:]  # above the neutral middle, most discouraging first
        level1 = upper[: max(1, len(upper) // 2)]  # the milder half of the encouraging side
    return {"normal": [p.negative for p in t.pairs], "level1": level1, "level2": [p.positive for p in t.pairs]}


def training_questions(trait: LoadedTrait, extra: list[str] | None = None) -> list[str]:
    """The extraction questions plus `extra`, refusing any evaluation question (never train on those)."""
    held_out = {normalize_question(q) for q in trait.trait.evaluation_questions}
    extra = [q.strip() for q in extra or [] if q.strip()]
    leaked = [q for q in extra if normalize_question(q) in held_out]
    if leaked:
        raise PersonavecError(f"{len(leaked)} extra question(s) are evaluation questions of '{trait.trait.name}' "
                              f"(e.g. {leaked[0][:60]!r}); remove them: evaluation questions must stay unseen")
    seen: set[str] = set()
    out = []
    for q in trait.trait.extraction_questions + extra:
        if normalize_question(q) not in seen:
            seen.add(normalize_question(q))
            out.append(q)
    return out


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    import json

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _rows(questions: list[str], plan: list[tuple[int, int]], answers: list[str]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": questions[q]}, {"role": "assistant", "content": a}]}
            for (q, _), a in zip(plan, answers, strict=True) if a.strip()]


def elicit(model: Model, trait: str | Path | LoadedTrait, out: str | Path, *,
           settings: ElicitSettings | None = None, extra_questions: list[str] | None = None,
           levels: tuple[str, ...] = LEVELS, engine: Engine | str | None = None,
           progress: Progress = no_progress) -> dict[str, Path]:
    """Write OUT/{normal,level1,level2}.jsonl; returns the paths. Empty answers are dropped. `engine` ("hf",
    "vllm" or an engine object) generates the answers."""
    s = settings or ElicitSettings()
    s.validate()
    loaded = trait if isinstance(trait, LoadedTrait) else load_trait(trait)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise PersonavecError(f"unknown level(s) {bad}; choose from {', '.join(LEVELS)}")
    questions = training_questions(loaded, extra_questions)
    prompts = level_prompts(loaded)
    slots = s.n_prompts or len(loaded.trait.pairs)
    folder = open_run(out, "elicit", {"model_id": model.model_id, "fingerprint": model.fingerprint,
                                      "trait": loaded.trait.name, "trait_sha256": loaded.sha256,
                                      "questions": questions, **asdict(s), **run_settings(engine)})
    plan = [(q, k * s.rollouts + r) for q in range(len(questions)) for k in range(slots) for r in range(s.rollouts)]
    mixed = "level1" in levels and prompts["level1"] is None
    needed = set(levels) | ({"normal", "level2"} if mixed else set())
    paths: dict[str, Path] = {}
    with engine_scope(model, engine) as eng:
        for n, level in enumerate(("normal", "level2", "level1")):
            if level not in needed:
                continue
            path = folder / f"{level}.jsonl"
            paths[level] = path
            if path.exists():  # finished earlier: resume
                continue
            systems = prompts[level]
            # each level samples with the seed of its place in this order, as every resumable loop does
            rows = (_mixed_level1(folder, len(plan), s.seed) if systems is None else
                    _answer_level(model, eng, questions, plan, systems, s, chunk_seed(s.seed, n), level,
                                  progress))
            _write(path, rows)
    return {lv: paths[lv] for lv in levels}


def _answer_level(model: Model, engine: Engine, questions: list[str], plan: list[tuple[int, int]],
                  systems: list[str], s: ElicitSettings, seed: int, level: str,
                  progress: Progress) -> list[dict[str, Any]]:
    """One level's rows: every (question, slot) answered under the slot's system prompt."""
    convs = [messages_for(questions[q], systems[(slot // s.rollouts) % len(systems)]) for q, slot in plan]
    texts = generate(model, convs, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                     seed=seed, batch_size=s.batch_size, progress=progress, task=level, engine=engine)
    return _rows(questions, plan, texts)


def _mixed_level1(folder: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """Half normal, half level2 rows (a fixed random half), when the trait has no graded prompts."""
    normal, strong = read_jsonl(folder / "normal.jsonl"), read_jsonl(folder / "level2.jsonl")
    rng = random.Random(seed)
    picks = [rng.random() < 0.5 for _ in range(n)]
    return [(strong if pick else normal)[i] for i, pick in enumerate(picks) if i < min(len(normal), len(strong))]


def mix(parts: dict[str | Path, float], out: str | Path, n: int | None = None, seed: int = 0) -> Path:
    """Write a mixture: `parts` maps dataset files to fractions (normalized); `n` rows in all (default:
    the smallest part's size). Rows are drawn without replacement and shuffled; inputs are not modified."""
    if not parts or any(f < 0 for f in parts.values()) or sum(parts.values()) <= 0:
        raise PersonavecError("a mixture needs at least one dataset with a positive fraction")
    sets = {Path(p): read_jsonl(p) for p in parts}
    for p, rows in sets.items():
        if not rows:
            raise PersonavecError(f"dataset '{p}' is empty or missing")
    total = n or min(len(r) for r in sets.values())
    weight = sum(parts.values())
    rng = random.Random(seed)
    mixed: list[dict[str, Any]] = []
    for (name, frac), data in zip(parts.items(), sets.values(), strict=True):
        k = round(total * frac / weight)
        if k > len(data):
            raise PersonavecError(f"dataset '{name}' has {len(data)} rows, the mixture needs {k}")
        mixed.extend(rng.sample(data, k))
    rng.shuffle(mixed)
    _write(Path(out), mixed)
    return Path(out)
