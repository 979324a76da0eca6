"""Issue 12 experiment: does steering with a trait's vector move the trait's AUTHORED reference answers
(a measure the vector never saw), more than a random direction and more than other traits' vectors?

For each of the seven built-in traits, with the committed vectors (experiments/out/monitor_eval/*.pv.safetensors,
extracted on the embedded model from the trait's prompt pairs and extraction questions):
  1. choose (selection half = evaluation questions 0–9): for every layer in LAYERS and c in COEFS, the rise
     of the reference measure from −c to +c; kept only where neutral-text perplexity at +c and at −c stays
     within PPL_MAX × the unsteered perplexity; the largest kept rise wins;
  2. report (held-out half = evaluation questions 10–19, never used for the choice): at the chosen layer and
     c, the per-question rise of the own vector, of RANDOM_SEEDS seeded random directions and of each other
     trait's vector, all at the own vector's per-layer norm; 95% bootstrap intervals over questions.
The rule and the grid were fixed before the first run.

    .venv/bin/python experiments/steering_reference.py --out experiments/out/steering_reference

Resumable (per-question rows are appended to measure.jsonl as each cell finishes). Writes results.json,
results.md and measure.jsonl (one row per trait × vector × layer × coef × question, to redo any statistic).
The script only measures: the choice rule and the held-out statistics are the library's (`choose_by_rise`,
`heldout` in personavec.reproduce.steering), and tests/test_steering_replay.py replays them from the committed
measure.jsonl and perplexity.jsonl without a model.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import personavec as pv
from personavec.capability import perplexity
from personavec.controls import matched_norm, random_like
from personavec.errors import PersonavecError
from personavec.evaluate import question_indices
from personavec.io import append_jsonl, read_jsonl, write_json, write_text
from personavec.reference import reference_measure
from personavec.reproduce.records import Interval, interval
from personavec.reproduce.steering import GridChoice, choose_by_rise, grid_cell, heldout, paired_rise
from personavec.runs import open_run
from personavec.traits import builtin_traits

LAYERS = (6, 10, 14, 18, 22)
COEFS = (2.0, 4.0, 6.0)
PPL_MAX = 1.5
RANDOM_SEEDS = (0, 1, 2)
RISE_VS_RANDOM = 3.0  # the own rise must be at least this many times the largest random |rise|
VECTORS = Path("experiments/out/monitor_eval")


class Cells:
    """Per-question rows of the reference measure, keyed by (trait, vector, layer, coef, half); resumable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in read_jsonl(path):
            self.rows.setdefault(self.key(r), []).append(r)

    @staticmethod
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["trait"], r["vector"], r["layer"], r["coef"], r["half"])

    def get(self, model: pv.Model, trait: Any, name: str, vec: pv.PersonaVector | None, layer: int | None,
            coef: float, half: str) -> dict[int, float]:
        key = (trait.name, name, layer, coef, half)
        if key not in self.rows:
            qs = question_indices(len(trait.evaluation_questions), half)
            if vec is None or coef == 0:
                res = reference_measure(model, trait, qs)
            else:
                with vec.steer(model, layer=layer, coef=coef, allow_mismatch=True):
                    res = reference_measure(model, trait, qs)
            rows = [{"trait": trait.name, "vector": name, "layer": layer, "coef": coef, "half": half,
                     "question_idx": g.question_idx, "lp_with_trait": round(g.with_trait, 6),
                     "lp_without_trait": round(g.without_trait, 6), "gap": round(g.gap, 6)} for g in res.questions]
            append_jsonl(self.path, rows)
            self.rows[key] = rows
        return {r["question_idx"]: r["gap"] for r in self.rows[key]}


def rise(cells: Cells, model: pv.Model, trait: Any, name: str, vec: pv.PersonaVector, layer: int, c: float,
         half: str) -> list[float]:
    """Per-question rise of the reference measure from −c to +c."""
    return paired_rise(cells.get(model, trait, name, vec, layer, c, half),
                       cells.get(model, trait, name, vec, layer, -c, half))


def summary(i: Interval) -> dict[str, Any]:
    return {"mean": i.mean, "se": i.se, "n": i.n, "ci95": [i.low, i.high]}


def choose(cells: Cells, model: pv.Model, trait: Any, vec: pv.PersonaVector,
           ppl: dict[tuple[str, int, float], float], base_ppl: float) -> GridChoice:
    """Measure the selection grid (cached) and choose with the library's rule."""
    grid = []
    for layer in LAYERS:
        for c in COEFS:
            for signed in (c, -c):
                if (trait.name, layer, signed) not in ppl:
                    with vec.steer(model, layer=layer, coef=signed, allow_mismatch=True):
                        ppl[(trait.name, layer, signed)] = perplexity(model)
            grid.append(grid_cell(layer, c, rise(cells, model, trait, "own", vec, layer, c, "first"),
                                  ppl[(trait.name, layer, c)], ppl[(trait.name, layer, -c)], base_ppl, PPL_MAX))
    try:
        return choose_by_rise(grid)
    except PersonavecError as e:
        raise SystemExit(f"{trait.name}: {e} (limit {PPL_MAX}x)") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/out/steering_reference"))
    ap.add_argument("--traits", default=",".join(builtin_traits()))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = pv.load_model()
    names = args.traits.split(",")
    loaded = {n: pv.load_trait(n) for n in builtin_traits()}
    vectors = {n: pv.load_vector(VECTORS / f"{n}.pv.safetensors") for n in builtin_traits()}
    # the cached cells are only valid for these vectors, references, model and grid: a change is refused
    open_run(args.out, "steering_reference", {
        "layers": LAYERS, "coefs": COEFS, "ppl_max": PPL_MAX, "random_seeds": RANDOM_SEEDS,
        "fingerprint": model.fingerprint, "vectors": {n: v.digest() for n, v in vectors.items()},
        "references": {n: [r.model_dump() for r in t.trait.references] for n, t in loaded.items()}})
    cells = Cells(args.out / "measure.jsonl")
    ppl_path = args.out / "perplexity.jsonl"
    ppl = {(r["trait"], r["layer"], r["coef"]): r["perplexity"] for r in read_jsonl(ppl_path)}
    base_ppl = perplexity(model)
    results: dict[str, Any] = {"settings": {"layers": LAYERS, "coefs": COEFS, "ppl_max": PPL_MAX,
                                            "random_seeds": RANDOM_SEEDS, "selection_half": "first (questions 0-9)",
                                            "report_half": "second (questions 10-19)", "model": model.model_id,
                                            "base_perplexity": base_ppl,
                                            "vector_digests": {n: v.digest() for n, v in vectors.items()}},
                               "traits": {}}
    for name in names:
        trait, vec = loaded[name].trait, vectors[name]
        before = dict(ppl)
        pick = choose(cells, model, trait, vec, ppl, base_ppl)
        append_jsonl(ppl_path, [{"trait": k[0], "layer": k[1], "coef": k[2], "perplexity": v}
                                for k, v in ppl.items() if k not in before])
        layer, c = pick.layer, pick.coef
        own = rise(cells, model, trait, "own", vec, layer, c, "second")
        randoms = {f"random{s}": rise(cells, model, trait, f"random{s}", random_like(vec, s), layer, c, "second")
                   for s in RANDOM_SEEDS}
        others = {o: rise(cells, model, trait, o, matched_norm(vectors[o], vec), layer, c, "second")
                  for o in builtin_traits() if o != name}
        base = cells.get(model, trait, "none", None, None, 0.0, "second")
        h = heldout(own, randoms, others, k=RISE_VS_RANDOM)
        res = {"layer": layer, "coef": c, "selection_rise": pick.selection_rise,
               "grid": [asdict(g) for g in pick.grid],
               "base_mean": sum(base.values()) / len(base), "own": summary(h.own),
               "own_minus_random0": summary(interval([a - b for a, b in zip(own, randoms["random0"], strict=True)])),
               "random": {k: summary(v) for k, v in h.random.items()},
               "others": {k: summary(v) for k, v in h.others.items()},
               "max_abs_random_rise": h.max_abs_random, "ratio_to_random": h.ratio_to_random,
               "best_other": h.best_other, "best_other_rise": h.best_other_rise,
               "target_interval_and_3x_random": h.interval_above_zero and h.beats_random,
               "target_own_beats_others": bool(h.beats_others)}
        results["traits"][name] = res
        print(f"{name:>13}: L{layer} c={c:g} own rise {h.own.mean:+.3f} {res['own']['ci95']}, "
              f"random max |rise| {h.max_abs_random:.3f} (x{h.ratio_to_random or 0:.1f}), best other "
              f"{h.best_other} {h.best_other_rise:+.3f}  [{time.time() - t0:.0f}s]", flush=True)
    results["n_interval_and_3x_random"] = sum(r["target_interval_and_3x_random"] for r in results["traits"].values())
    results["n_own_beats_others"] = sum(r["target_own_beats_others"] for r in results["traits"].values())
    results["seconds"] = round(time.time() - t0)
    write_json(args.out / "results.json", results)
    write_text(args.out / "results.md", render(results))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    f = "{:+.3f}".format
    lines = ["| trait | layer | c | own rise (held-out) [95% CI] | random rises (3 seeds) | x random | "
             "best other trait (rise) | own > others |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["traits"].items():
        lo, hi = r["own"]["ci95"]
        rnd = ", ".join(f(v["mean"]) for v in r["random"].values())
        lines.append(f"| {name} | {r['layer']} | {r['coef']:g} | {f(r['own']['mean'])} [{f(lo)}, {f(hi)}] | {rnd} | "
                     f"{(r['ratio_to_random'] or 0):.1f} | {r['best_other']} ({f(r['best_other_rise'])}) | "
                     f"{'yes' if r['target_own_beats_others'] else 'no'} |")
    lines.append("")
    lines.append(f"interval above 0 and ≥ 3× the largest random |rise|: {results['n_interval_and_3x_random']} of "
                 f"{len(results['traits'])}; own vector moves its own references more than every other trait's "
                 f"vector: {results['n_own_beats_others']} of {len(results['traits'])}")
    lines.append("")
    lines.append("Cross-trait rises on the held-out half (row: references of; column: vector at the row trait's "
                 "layer, c and norm):")
    names = list(results["traits"])
    lines.append("| refs \\ vector | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for name, r in results["traits"].items():
        row = [f(r["own"]["mean"]) if o == name else f(r["others"][o]["mean"]) if o in r["others"] else "–"
               for o in names]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
