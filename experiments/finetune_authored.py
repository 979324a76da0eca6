"""Issue 13: does finetuning on the AUTHORED trait data raise the trait, measured by the reference measure
(authored answers the finetuning data never contained); do the finetuning shift along the vector and the
dataset's ΔP before training predict it; and does the vaccine hold?

For each trait × set × condition × seed: a LoRA finetune of the embedded model (float32) on
`experiments/data/finetune_authored/<trait>/<set>.jsonl`; then, on the merged model: the reference measure on
all 20 evaluation questions (per question), neutral-text perplexity, the 40-item quiz, and the finetuning shift
(mean last-prompt activation on the evaluation prompts minus the base model's, on the unit vector at its
layer) beside the same shift on five random unit directions (mean |projection|: the control). Before training:
the dataset's mean --fast ΔP (the screening prediction). Settings fixed before the first run.

    .venv/bin/python experiments/finetune_authored.py --traits evil --sets normal,I,II,mix025,mix050,mix075
    .venv/bin/python experiments/finetune_authored.py --traits evil --sets normal,II --vaccine

Conditions (--vaccine, on the II set; (c) of the issue): preventative steering (+coef × v at the vector's layer,
every token, training only), the projection penalty, CAFT (the direction ablated at every layer while
training) and inference-time steering of the plain II finetune (−coef × v on response positions). Each
coefficient grid runs at seed 0; the coefficient is chosen on evaluation questions 0–9 (largest removal share
with perplexity ≤ 1.05 × the plain II finetune's, else the cheapest), then run at the other seeds; removal
share and perplexity cost are reported on questions 10–19 with t intervals over seeds. Removal share =
1 − (condition − normal) / (II − normal), each finetune compared with the normal and II finetunes of its seed.

A grid extended after its results were seen (EXTENDED: sycophancy's preventative steering, 4 and 8) runs as
its own method, `--methods prevent+`, and is reported beside the pre-set choice with that label:

    .venv/bin/python experiments/finetune_authored.py --traits sycophantic --vaccine --methods prevent+ --controls

Resumable: each finished finetune appends one row to runs.jsonl and is skipped on a rerun; `--fill` adds the
quiz and the random-direction shift to rows from before they were measured (adapters in --work; it
runs after the finetunes, and checks that the remeasured shift equals the stored one).
Writes results.json and results.md.

Inference-time steering needs the plain II adapters in --work. Where one is missing (the earlier runs' work
folders were not kept), the II set is finetuned again with the plain settings into the set "II-retrained"; the
retrained adapter is measured unsteered (its own row in the plain table: how far a retrain lands from the
original) and the whole inference-time comparison (grid, choice, seeds, control) runs on the retrained
adapters, each scored against its own retrained adapter, never against the original II rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import personavec as pv
from personavec.io import append_jsonl, read_jsonl, write_json, write_jsonl, write_text
from personavec.models import Model
from personavec.reference import reference_measure
from personavec.reproduce import vaccine as vaccine_rule
from personavec.reproduce.finetuning import Bench as LibraryBench
from personavec.reproduce.records import Interval
from personavec.reproduce.vaccine import Scored, interventions_for
from personavec.screen import screen
from personavec.screening.stats import mean_ci
from personavec.stats import pearson_bootstrap_ci, pearson_ci
from personavec.training import TrainSettings, attach_adapter, train

DATA = Path("experiments/data/finetune_authored")
VECTORS = Path("experiments/out/monitor_eval")
SETTINGS: dict[str, Any] = dict(rank=32, alpha=64, rslora=True, lr=3e-4, epochs=2.0, batch_size=8, max_length=192, save_steps=1000,
                shift_questions=2)
HALF_A, HALF_B = range(0, 10), range(10, 20)  # choose on A, report on B
PPL_CAP = 1.05
RANDOM_SEEDS = range(5)
GRIDS: dict[str, tuple[float, ...]] = {"prevent": (0.5, 1.0, 2.0), "penalty": (0.1, 1.0), "infer": (0.5, 1.0, 2.0, 4.0)}
#: The plain II set finetuned again when its adapters are gone (see the docstring); a set name, not a data file.
RETRAINED = "II-retrained"
#: Coefficients added to a method's grid AFTER its pre-set grid's results were seen, run as the method "<kind>+"
#: (its own choice over the whole extended grid, its own seeds and control) and reported beside the pre-set
#: choice, labelled as an extension. Sycophancy's preventative steering: removal on questions 0–9 still rose at
#: the grid's top (0.5 → +0.02, 1 → +0.03, 2 → +0.06) with perplexity below the plain II finetune's (0.980).
EXTENDED: dict[tuple[str, str], tuple[float, ...]] = {("sycophantic", "prevent"): (4.0, 8.0)}


def conditions(trait: str, kind: str) -> list[str]:
    """A method's grid as condition names: "caft" alone; "<kind>+" the pre-set grid plus EXTENDED's coefficients."""
    if kind == "caft":
        return ["caft"]
    base = kind.removesuffix("+")
    extra = EXTENDED.get((trait, base), ()) if kind.endswith("+") else ()
    return [f"{base}:{c:g}" for c in (*GRIDS[base], *extra)]


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95% t interval over seeds, from the screening statistics."""
    ci = mean_ci(np.asarray(xs, dtype=float))
    return ci["mean"], ci["ci_low"], ci["ci_high"]


def condition_of(row: dict[str, Any]) -> str:
    return str(row.get("condition", "plain"))


def index(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int | None], dict[str, Any]]:
    """Rows of one trait by (set, condition, seed): how the selection and the report look runs up."""
    return {(r["set"], condition_of(r), r["seed"]): r for r in rows}


class Bench:
    """The experiment's view of the library's bench (`personavec.reproduce.finetuning.Bench`, which reproduce's
    finetune stage measures with): the committed vector at its own layer, five random directions, rows as dicts."""

    def __init__(self, base: Model, trait: str, data: Path = DATA) -> None:
        self.trait, self.data = trait, data
        self.loaded = pv.load_trait(trait)
        self.vec = pv.load_vector(VECTORS / f"{trait}.pv.safetensors")
        self.lib = LibraryBench(base, self.loaded, self.vec, self.vec.layer, random_seeds=RANDOM_SEEDS, float32=False)
        self.base, self.randoms = self.lib.base, self.lib.randoms

    def measure(self, model: Model, condition: str = "plain") -> dict[str, Any]:
        """Trait, capability and shift of a (merged) model; an 'infer:C' condition is measured steered by −C × v
        on its responses (its shift, a property of the weights, unsteered)."""
        m = self.lib.measure(model, "", None, time.time(), condition)
        return {"reference": m.reference, "reference_per_question": m.reference_per_question,
                "reference_questions": m.questions, "perplexity": m.perplexity, "quiz": m.quiz, "shift": m.shift,
                "shift_random": m.shift_random, "shift_random_abs": float(np.mean(np.abs(m.shift_random)))}

    def finetuned(self, folder: Path) -> Model:
        return attach_adapter(copy.deepcopy(self.base), folder, merge=True, allow_mismatch=True)


def folder_name(trait: str, name: str, condition: str, seed: int) -> str:
    tag = "" if condition == "plain" else "_" + condition.replace(":", "")
    return f"{trait}_{name}{tag}_s{seed}"


def run_one(bench: Bench, name: str, condition: str, seed: int, work: Path, runs_path: Path,
            dataset_dp: float | None) -> dict[str, Any]:
    """Finetune (or, for infer:C, steer the plain finetune), measure, append the row. The set II-retrained
    trains on II's data."""
    t = time.time()
    if vaccine_rule.inference_coef(condition):  # infer:C and its random-direction control steer the plain finetune
        model = bench.finetuned(work / folder_name(bench.trait, name, "plain", seed))
        row = bench.measure(model, condition)
    else:
        folder = work / folder_name(bench.trait, name, condition, seed)
        shutil.rmtree(folder, ignore_errors=True)
        data = "II" if name == RETRAINED else name
        train(copy.deepcopy(bench.base), bench.data / bench.trait / f"{data}.jsonl", folder,
              TrainSettings(seed=seed, **SETTINGS), interventions_for(condition, bench.vec, bench.vec.layer),
              allow_mismatch=True)
        row = bench.measure(bench.finetuned(folder))
    row.update(trait=bench.trait, set=name, condition=condition, seed=seed, dataset_delta_p=dataset_dp,
               train_seconds=round(time.time() - t, 1))
    append_jsonl(runs_path, [row])
    print(f"{bench.trait} {name} {condition} seed {seed}: reference {row['reference']:+.4f}, shift "
          f"{row['shift']:+.3f} (random {row['shift_random_abs']:.3f}), perplexity {row['perplexity']:.2f}, quiz "
          f"{row['quiz']:.3f} [{row['train_seconds']:.0f}s]", flush=True)
    return row


def question_ids(row: dict[str, Any]) -> list[int]:
    """The evaluation questions behind the per-question gaps (older rows: all 20, in order)."""
    return list(row.get("reference_questions", range(len(row["reference_per_question"]))))


def scored(row: dict[str, Any]) -> Scored:
    """A row as the library's vaccine rule reads it (`personavec.reproduce.vaccine`, which reproduce uses)."""
    return Scored(condition_of(row), row["seed"], dict(zip(question_ids(row), row["reference_per_question"],
                                                           strict=True)), row["perplexity"], row.get("quiz", 0.0))


def removal(row: dict[str, Any], normal: dict[str, Any], plain: dict[str, Any], half: range) -> float:
    return vaccine_rule.removal(scored(row), scored(normal), scored(plain), list(half))


def choose(rows: list[dict[str, Any]], trait: str, kind: str, seed: int, iset: str = "II") -> str | None:
    """The coefficient chosen on half A at `seed` (None until the whole grid is measured). Rows of `trait`;
    `iset` the II adapters the method ran on (II-retrained: inference-time steering of retrained adapters)."""
    by = index(rows)
    normal, plain = by.get(("normal", "plain", seed)), by.get((iset, "plain", seed))
    grid = [by.get((iset, cond, seed)) for cond in conditions(trait, kind)]
    if normal is None or plain is None or any(g is None for g in grid):
        return None
    return vaccine_rule.choose([scored(g) for g in grid if g is not None], scored(normal), scored(plain),
                               list(HALF_A), PPL_CAP)


def vaccine(bench: Bench, seeds: list[int], work: Path, runs_path: Path, dp: float | None,
            methods: tuple[str, ...] = ("infer", "prevent", "caft", "penalty"), controls: bool = False) -> None:
    """(c): grids at the first seed, the chosen coefficient (and CAFT) at every seed; with `controls`, the chosen
    setting with a random direction of the vector's norm in its place, at every seed."""
    def done() -> dict[tuple[str, str, int | None], dict[str, Any]]:
        return index([r for r in read_jsonl(runs_path) if r["trait"] == bench.trait])

    def ensure(condition: str, seed: int, iset: str = "II") -> None:
        if (iset, condition, seed) not in done():
            run_one(bench, iset, condition, seed, work, runs_path, dp)

    def complete(kind: str, iset: str) -> bool:
        """Every row the method needs on `iset` is there (grid, chosen at each seed, controls if asked)."""
        have = done()  # runs.jsonl read once
        chosen = choose(list(have.values()), bench.trait, kind, seeds[0], iset)
        need = [] if chosen is None else [(iset, c, k) for k in seeds for c in
                                          (chosen, *([vaccine_rule.control_of(chosen)] if controls else []))]
        return chosen is not None and all(n in have for n in need)

    for kind in methods:  # inference first (no training), then the paper's method
        iset = "II"
        if (kind == "infer" and not complete(kind, "II")
                and not all((work / folder_name(bench.trait, "II", "plain", s)).is_dir() for s in seeds)):
            iset = RETRAINED  # the adapters are gone: steer retrained ones, scored against themselves
            for seed in seeds:
                ensure("plain", seed, iset)
        if kind == "caft":
            chosen: str | None = "caft"
        else:
            for cond in conditions(bench.trait, kind):
                ensure(cond, seeds[0], iset)
            chosen = choose(list(done().values()), bench.trait, kind, seeds[0], iset)
            print(f"{bench.trait} {kind} ({iset} adapters): chosen on questions 0–9 at seed {seeds[0]}: {chosen}",
                  flush=True)
        assert chosen is not None
        for seed in seeds:
            ensure(chosen, seed, iset)
        for seed in seeds if controls else []:
            ensure(vaccine_rule.control_of(chosen), seed, iset)


def fill(bench: Bench, runs_path: Path, work: Path) -> None:
    """Measure the quiz and the random-direction shift for rows from before they were recorded."""
    rows = read_jsonl(runs_path)
    changed = False
    for row in rows:
        if row["trait"] != bench.trait or "quiz" in row:
            continue
        if row["set"] == "base":
            model = bench.base
        else:
            model = bench.finetuned(work / folder_name(bench.trait, row["set"], condition_of(row), row["seed"]))
        m = bench.measure(model)
        drift = abs(m["shift"] - row["shift"])
        print(f"fill {row['set']} seed {row['seed']}: quiz {m['quiz']:.3f}, random shift "
              f"{m['shift_random_abs']:.3f}; shift remeasured {m['shift']:+.4f} (stored {row['shift']:+.4f}, drift "
              f"{drift:.1e})", flush=True)
        row.update(quiz=m["quiz"], shift_random=m["shift_random"], shift_random_abs=m["shift_random_abs"],
                   condition=condition_of(row))
        changed = True
    if changed:
        write_jsonl(runs_path, rows)


def dp_control(bench: Bench, sets: list[str], work: Path, out: Path) -> None:
    """The control for (b): each dataset's mean --fast ΔP on the 5 random directions (one pass per set)."""
    path = out / "dp_random.json"
    have: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    randoms = {f"random{k}": r for k, r in zip(RANDOM_SEEDS, bench.randoms, strict=True)}
    for name in sets:
        if name in have.get(bench.trait, {}):
            continue
        res = screen(bench.base, bench.data / bench.trait / f"{name}.jsonl", randoms,
                     work / f"{bench.trait}_{name}_dp_random.csv", fast=True, histograms=False)
        have.setdefault(bench.trait, {})[name] = [res.summary.traits[k].delta_p["mean"] for k in randoms]
        print(f"{bench.trait} {name}: ΔP on random directions {have[bench.trait][name]}", flush=True)
        write_json(path, have)


def cross(base: Model, traits: list[str], runs_path: Path, work: Path) -> None:
    """(d)'s cross-trait control: every plain finetune measured on the other traits' reference measures too, so
    top − random can be read against what the same sets do to traits they were not screened for."""
    loaded = {t: pv.load_trait(t).trait for t in traits}
    rows = read_jsonl(runs_path)
    for row in rows:
        have = row.setdefault("reference_cross", {})
        need = [u for u in traits if u != row["trait"] and u not in have]
        if condition_of(row) != "plain" or not need:
            continue
        model = base if row["set"] == "base" else attach_adapter(
            copy.deepcopy(base), work / folder_name(row["trait"], row["set"], "plain", row["seed"]), merge=True,
            allow_mismatch=True)
        for u in need:
            have[u] = reference_measure(model, loaded[u]).mean
        print(f"cross {row['trait']} {row['set']} seed {row['seed']}: "
              + ", ".join(f"{u} {v:+.4f}" for u, v in have.items()), flush=True)
        write_jsonl(runs_path, rows)  # after each model: resumable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/out/finetune_authored"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/personavec-finetune-authored"))
    ap.add_argument("--data", type=Path, default=DATA, help="folder of <trait>/<set>.jsonl finetuning sets")
    ap.add_argument("--traits", default="evil")
    ap.add_argument("--sets", default="normal,II")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--vaccine", action="store_true", help="run (c) on the II set after the plain finetunes")
    ap.add_argument("--methods", default="infer,prevent,caft,penalty", help="--vaccine's methods, in order; 'prevent+' is prevent over its EXTENDED grid")
    ap.add_argument("--controls", action="store_true",
                    help="--vaccine: each method's chosen setting again with a random direction (every seed)")
    ap.add_argument("--fill", action="store_true", help="measure quiz and random shift for older rows")
    ap.add_argument("--dp-control", action="store_true", help="ΔP of each set on the random directions ((b)'s control)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 training steps and 2-point grids: a smoke test")
    ap.add_argument("--cross", action="store_true", help="measure every plain finetune on the other traits too")
    ap.add_argument("--epochs", type=float, help=f"override the training epochs ({SETTINGS['epochs']:g})")
    ap.add_argument("--max-length", type=int, help=f"override the token cut per row ({SETTINGS['max_length']})")
    args = ap.parse_args()
    if args.epochs is not None:
        SETTINGS["epochs"] = args.epochs
    if args.max_length is not None:
        SETTINGS["max_length"] = args.max_length
    if args.quick:
        SETTINGS["max_steps"] = 2
        for kind, grid in GRIDS.items():
            GRIDS[kind] = grid[:2]
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "runs.jsonl"
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        base = pv.load_model(dtype="float32")
        for trait in args.traits.split(","):
            bench = Bench(base, trait, args.data)
            done = {(r["trait"], r["set"], condition_of(r), r["seed"]) for r in read_jsonl(runs_path)}
            if (trait, "base", "plain", None) not in done:
                row = bench.measure(base)
                row.update(trait=trait, set="base", condition="plain", seed=None)
                append_jsonl(runs_path, [row])
            dps: dict[str, float] = {}
            for name in args.sets.split(","):
                res = screen(base, args.data / trait / f"{name}.jsonl", [bench.vec], args.work / f"{trait}_{name}_dp.csv",
                             fast=True, histograms=False)
                dps[name] = res.summary.traits[bench.vec.trait].delta_p["mean"]
                for seed in seeds:
                    if (trait, name, "plain", seed) not in done:
                        run_one(bench, name, "plain", seed, args.work, runs_path, dps[name])
            if args.vaccine:
                vaccine(bench, seeds, args.work, runs_path, dps.get("II"), tuple(args.methods.split(",")),
                        args.controls)
            if args.fill:
                fill(bench, runs_path, args.work)
            if args.dp_control:
                dp_control(bench, args.sets.split(","), args.work, args.out)
        if args.cross:
            cross(base, args.traits.split(","), runs_path, args.work)
    summarize(args.out, read_jsonl(runs_path), args.out / "dp_random.json")


def fmt(ci: Sequence[float | None], digits: int = 4) -> str:
    m, lo, hi = (float("nan") if v is None else v for v in ci)
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def summarize(out: Path, rows: list[dict[str, Any]], dp_random: Path | None = None) -> None:
    result: dict[str, Any] = {"settings": SETTINGS, "ppl_cap": PPL_CAP, "grids": GRIDS,
                              "extended_grids": {f"{t}:{k}": v for (t, k), v in EXTENDED.items()}, "traits": {}}
    lines = ["## Finetunes (plain)"]
    for trait in dict.fromkeys(r["trait"] for r in rows):
        lines += ["", "| trait | set | seeds | reference [95% t CI over seeds] | shift [95% t CI] | random-direction "
                  "mean abs shift | perplexity | quiz | dataset ΔP |", "|---|---|---|---|---|---|---|---|---|"]
        mine = [r for r in rows if r["trait"] == trait]
        plain = [r for r in mine if condition_of(r) == "plain"]
        res: dict[str, Any] = {"sets": {}}
        for name in dict.fromkeys(r["set"] for r in plain):
            sub = [r for r in plain if r["set"] == name]
            entry: dict[str, Any] = {"n": len(sub), "reference": t_interval([r["reference"] for r in sub]),
                     "shift": t_interval([r["shift"] for r in sub]),
                     "shift_random_abs": mean_of(sub, "shift_random_abs"), "perplexity": mean_of(sub, "perplexity"),
                     "quiz": mean_of(sub, "quiz"), "dataset_delta_p": sub[0].get("dataset_delta_p")}
            res["sets"][name] = entry
            dp, rnd, quiz = entry["dataset_delta_p"], entry["shift_random_abs"], entry["quiz"]
            lines.append(f"| {trait} | {name} | {len(sub)} | {fmt(entry['reference'])} | {fmt(entry['shift'], 1)} | "
                         f"{'–' if rnd is None else f'{rnd:.1f}'} | {entry['perplexity']:.2f} | "
                         f"{'–' if quiz is None else f'{quiz:.3f}'} | {'–' if dp is None else f'{dp:.2f}'} |")
        normal_at = {r["seed"]: r for r in plain if r["set"] == "normal"}
        ii_at = {r["seed"]: r for r in plain if r["set"] == "II"}
        diffs = [r["reference"] - normal_at[r["seed"]]["reference"] for r in plain
                 if r["set"] == "II" and r["seed"] in normal_at]
        retrains = [(r, ii_at[r["seed"]]) for r in plain if r["set"] == RETRAINED and r["seed"] in ii_at]
        if retrains:  # how closely a retrain reproduces the original II finetune, per evaluation question
            gap = max(abs(a - b) for r, o in retrains
                      for a, b in zip(r["reference_per_question"], o["reference_per_question"], strict=True))
            res["retrained_max_abs_gap_per_question"] = gap
            lines.append(f"| {trait} | II-retrained − II, largest gap on any question | {len(retrains)} | {gap:.1e} "
                         "| | | | | |")
        if len(diffs) > 1:
            res["II_minus_normal"] = t_interval(diffs)
            lines.append(f"| {trait} | II − normal (paired by seed) | {len(diffs)} | {fmt(res['II_minus_normal'])} "
                         "| | | | | |")
        result["traits"][trait] = res
        control = json.loads(dp_random.read_text()).get(trait, {}) if dp_random and dp_random.exists() else {}
        correlations(res, plain, lines, control)
        orderings(res, plain, lines)
        mitigations(res, mine, lines)
    cross_table(result, rows, lines)
    write_json(out / "results.json", result)
    write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(xs)) if xs else None


def correlations(res: dict[str, Any], plain: list[dict[str, Any]], lines: list[str],
                 dp_random: dict[str, list[float]]) -> None:
    """(a) shift vs trait change and (b) dataset ΔP vs trait change, across the plain finetunes."""
    base = next((r for r in plain if r["set"] == "base"), None)
    fts = [r for r in plain if r["set"] not in ("base", RETRAINED)]  # a retrain repeats II: not another finetune
    if base is None or len({r["set"] for r in fts}) < 3:
        return
    change = [r["reference"] - base["reference"] for r in fts]
    pairs: dict[str, Callable[[dict[str, Any]], float]] = {
        "(a) finetuning shift": lambda r: float(r["shift"]),
        "(b) dataset ΔP before training": lambda r: float(r["dataset_delta_p"])}
    trait = fts[0]["trait"]
    lines += ["", f"### {trait}: what predicts the trait change (reference − base) across {len(fts)} finetunes", "",
              "| predictor | r | 95% bootstrap CI (finetunes resampled) |", "|---|---|---|"]
    for label, key in pairs.items():
        r, lo, hi = pearson_bootstrap_ci([key(x) for x in fts], change)
        res[label] = [r, lo, hi]
        lines.append(f"| {label} | {r:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    if all(r.get("shift_random") for r in fts):  # the control for (a): shifts on random unit directions
        rs = [pearson_bootstrap_ci([r["shift_random"][k] for r in fts], change)[0] for k in RANDOM_SEEDS]
        res["(a) control: random-direction shifts, r per direction"] = rs
        lines.append(f"| (a) control: shift on {len(rs)} random unit directions | mean abs r {np.mean(np.abs(rs)):.3f}, "
                     f"max abs r {np.max(np.abs(rs)):.3f} | |")
    if fts and all(r["set"] in dp_random for r in fts):  # the control for (b): ΔP on random directions
        rs = [pearson_bootstrap_ci([dp_random[r["set"]][k] for r in fts], change)[0] for k in RANDOM_SEEDS]
        res["(b) control: random-direction ΔP, r per direction"] = rs
        lines.append(f"| (b) control: dataset ΔP on {len(rs)} random directions | mean abs r {np.mean(np.abs(rs)):.3f}, "
                     f"max abs r {np.max(np.abs(rs)):.3f} | |")
    sets = sorted({r["set"] for r in fts})  # the datasets are the units ΔP varies over: r over set means too
    if len(sets) < 4:  # a Fisher-z interval needs n > 3
        return
    mean_change = [float(np.mean([c for r, c in zip(fts, change, strict=True) if r["set"] == n])) for n in sets]
    for label, key in pairs.items():
        xs = [float(np.mean([key(r) for r in fts if r["set"] == n])) for n in sets]
        r, lo, hi = pearson_ci(xs, mean_change)
        res[f"{label}, over set means"] = [r, lo, hi]
        lines.append(f"| {label}, over the {len(sets)} set means | {r:+.3f} | [{lo:+.3f}, {hi:+.3f}] (Fisher z) |")


ORDER = (("top", "random"), ("random", "bottom"), ("top", "bottom"), ("rdtop", "random"), ("top", "rdtop"))
# rdtop: the top 500 by ΔP on a random direction (experiments/sharegpt_random_sets.py), the selection control


def orderings(res: dict[str, Any], plain: list[dict[str, Any]], lines: list[str]) -> None:
    """(d): screened sets compared by seed (top − random, random − bottom); the interval is over seeds."""
    by = {(r["set"], r["seed"]): r["reference"] for r in plain}
    trait = plain[0]["trait"] if plain else ""
    rows = []
    for hi, lo in ORDER:
        diffs = [by[(hi, s)] - by[(lo, s)] for (name, s) in by if name == hi and (lo, s) in by]
        if not diffs:
            continue
        ci = t_interval(diffs) if len(diffs) > 1 else (diffs[0], float("nan"), float("nan"))
        res[f"{hi}_minus_{lo}"] = list(ci)
        res[f"{hi}_minus_{lo}_per_seed"] = diffs
        rows.append(f"| {hi} − {lo} | {len(diffs)} | {fmt(ci)} | {'yes' if ci[1] > 0 else 'no' if ci[2] < 0 else 'not resolved'} |")
    if rows:
        lines += ["", f"### {trait}: trait after finetuning, screened sets paired by seed", "",
                  "| comparison | seeds | reference difference [95% t CI over seeds] | interval above 0? |",
                  "|---|---|---|---|", *rows]


def cross_table(result: dict[str, Any], rows: list[dict[str, Any]], lines: list[str]) -> None:
    """top − random (paired by seed) of each screened trait's sets on every trait's reference measure, and the
    same for the random direction's top 500 (rdtop − random): the cross-trait and selection controls."""
    for hi, lo in (("top", "random"), ("rdtop", "random")):
        plain = [r for r in rows if condition_of(r) == "plain" and r["set"] in (hi, lo)]
        if not any(r.get("reference_cross") for r in plain if r["set"] == hi):
            continue
        traits = list(dict.fromkeys(r["trait"] for r in plain))
        table: dict[str, dict[str, list[float]]] = {}
        out = ["", f"### {hi} − {lo} (paired by seed) on each trait's reference measure", "",
               "| sets chosen for | " + " | ".join(f"measured: {u}" for u in traits) + " |",
               "|---|" + "---|" * len(traits)]
        for t in traits:
            by = {(r["set"], r["seed"]): {t: r["reference"], **r.get("reference_cross", {})}
                  for r in plain if r["trait"] == t}
            cells = []
            for u in traits:
                diffs = [by[(hi, s)][u] - by[(lo, s)][u] for (name, s) in by
                         if name == hi and (lo, s) in by and u in by[(hi, s)] and u in by[(lo, s)]]
                if len(diffs) > 1:
                    table.setdefault(t, {})[u] = list(t_interval(diffs))
                    cells.append(fmt(t_interval(diffs)))
                else:
                    cells.append("–")
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        result["cross_trait_top_minus_random" if hi == "top" else f"cross_trait_{hi}_minus_{lo}"] = table
        lines += out


def mitigations(res: dict[str, Any], mine: list[dict[str, Any]], lines: list[str]) -> None:
    """(c): per method, the chosen coefficient's removal share and perplexity cost on half B over seeds."""
    by = index(mine)
    seeds = sorted({r["seed"] for r in mine if r["set"] == "II" and condition_of(r) == "plain"})
    if not any(condition_of(r) != "plain" for r in mine) or not seeds:
        return
    trait = mine[0]["trait"]
    lines += ["", f"### {trait}: mitigations on the II set (chosen on questions 0–9 at seed {seeds[0]}, reported "
              "on 10–19)", "",
              "| method | grid at seed 0: coef → removal on 0–9 (perplexity ÷ plain II) | chosen | seeds | "
              "removal share on 10–19 [95% t CI] | perplexity ÷ plain II [95% t CI] | quiz − plain II | control: "
              "random direction, same setting: removal on 10–19 [95% t CI] (perplexity ÷ plain II) | vector − random "
              "removal (paired by seed) [95% t CI] |",
              "|---|---|---|---|---|---|---|---|---|"]
    res["mitigations"] = {}
    s0 = seeds[0]
    retrained = any(r["set"] == RETRAINED and condition_of(r) != "plain" for r in mine)
    for kind, iset in (("prevent", "II"), ("prevent+", "II"), ("penalty", "II"), ("infer", "II"),
                       *((("infer", RETRAINED),) if retrained else ()), ("caft", "II")):
        if kind.endswith("+") and (trait, kind.removesuffix("+")) not in EXTENDED:
            continue
        conds = conditions(trait, kind)
        grid = []
        for cond in conds:
            g, normal, plain = by.get((iset, cond, s0)), by.get(("normal", "plain", s0)), by.get((iset, "plain", s0))
            if g is not None and normal is not None and plain is not None:
                grid.append(f"{cond.partition(':')[2] or 'caft'} → {removal(g, normal, plain, HALF_A):+.2f} "
                            f"({g['perplexity'] / plain['perplexity']:.3f})")
        chosen = "caft" if kind == "caft" else choose(mine, trait, kind, s0, iset)
        if chosen is None:
            continue
        runs = {key: scored(r) for key, r in by.items()}
        normals = {k: v for (name, cond, k), v in runs.items() if name == "normal" and cond == "plain" and k is not None}
        plains = {k: v for (name, cond, k), v in runs.items() if name == iset and cond == "plain" and k is not None}
        ok = [k for k in seeds if k in normals and k in plains]
        at = [runs[(iset, chosen, k)] for k in ok if (iset, chosen, k) in runs]
        if not at:
            continue
        ctrl = [runs[(iset, vaccine_rule.control_of(chosen), k)] for k in ok
                if (iset, vaccine_rule.control_of(chosen), k) in runs]
        m = vaccine_rule.summarize(kind, [runs[(iset, c, s0)] for c in conds if (iset, c, s0) in runs], at, normals,
                                   plains, list(HALF_A), list(HALF_B), ctrl)  # the library's rule, as reproduce
        rem, n = m.removal_per_seed, len(m.seeds)
        ratio = [v + 1 if v is not None else None for v in (m.ppl_cost.mean, m.ppl_cost.low, m.ppl_cost.high)]
        entry: dict[str, Any] = {"chosen": chosen, "seeds": n, "removal_half_b": interval_of(m.removal),
                 "perplexity_ratio": ratio, "quiz_change": m.quiz_change.mean, "grid": grid,
                 "removal_half_b_per_seed": rem}
        control_cells = "– | –"
        if m.control is not None and m.control_ppl_cost is not None and m.beyond_control is not None:
            entry.update(control_removal_half_b=m.control_per_seed,
                         control_perplexity_ratio=[c.perplexity / plains[c.seed].perplexity for c in ctrl
                                                   if c.seed is not None],
                         vector_minus_control=interval_of(m.beyond_control))
            one = " (one seed)" if m.control.n == 1 else ""
            control_cells = (f"{fmt(interval_of(m.control), 2)}{one} ({1 + (m.control_ppl_cost.mean or 0):.3f}) | "
                             f"{fmt(interval_of(m.beyond_control), 2)} ({m.beyond_control.n} seeds)")
        key = kind if iset == "II" else f"{kind} ({iset})"
        res["mitigations"][key] = entry
        label = f"{kind.removesuffix('+')}, grid extended after its results" if kind.endswith("+") else kind
        label += "" if iset == "II" else ", on retrained plain II adapters (perplexity and removal against them)"
        lines.append(f"| {label} | {'; '.join(grid)} | {chosen} | {n} | "
                     f"{fmt(entry['removal_half_b'], 2) if n > 1 else f'{rem[0]:+.2f} (one seed)'} | "
                     f"{fmt(ratio, 3) if n > 1 else f'{ratio[0]:.3f} (one seed)'} | "
                     f"{'–' if entry['quiz_change'] is None else format(entry['quiz_change'], '+.3f')} | "
                     f"{control_cells} |")


def interval_of(i: Interval) -> list[float | None]:
    """A library interval as this script's [mean, low, high] (None where undefined: one seed)."""
    return [i.mean, i.low, i.high]

if __name__ == "__main__":
    main()
