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
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import personavec as pv
from personavec.capability import perplexity
from personavec.controls import matched_norm, random_like
from personavec.evaluate import question_indices
from personavec.io import append_jsonl, read_jsonl, write_json, write_text
from personavec.reference import reference_measure
from personavec.runs import open_run
from personavec.stats import bootstrap_ci, mean_se
from personavec.traits import builtin_traits

LAYERS = (6, 10, 14, 18, 22)
COEFS = (2.0, 4.0, 6.0)
PPL_MAX = 1.5
RANDOM_SEEDS = (0, 1, 2)
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
    up = cells.get(model, trait, name, vec, layer, c, half)
    down = cells.get(model, trait, name, vec, layer, -c, half)
    return [up[q] - down[q] for q in sorted(up)]


def summary(xs: list[float]) -> dict[str, Any]:
    m, se, n = mean_se(xs)
    lo, hi = bootstrap_ci(xs)
    return {"mean": m, "se": se, "n": n, "ci95": [lo, hi]}


def choose(cells: Cells, model: pv.Model, trait: Any, vec: pv.PersonaVector,
           ppl: dict[tuple[str, int, float], float], base_ppl: float) -> dict[str, Any]:
    grid = []
    for layer in LAYERS:
        for c in COEFS:
            for signed in (c, -c):
                if (trait.name, layer, signed) not in ppl:
                    with vec.steer(model, layer=layer, coef=signed, allow_mismatch=True):
                        ppl[(trait.name, layer, signed)] = perplexity(model)
            r = rise(cells, model, trait, "own", vec, layer, c, "first")
            ratio = max(ppl[(trait.name, layer, c)], ppl[(trait.name, layer, -c)]) / base_ppl
            grid.append({"layer": layer, "coef": c, "rise": sum(r) / len(r), "ppl_ratio": ratio,
                         "kept": ratio <= PPL_MAX})
    kept = [g for g in grid if g["kept"]]
    if not kept:
        raise SystemExit(f"{trait.name}: no cell kept perplexity within {PPL_MAX}x")
    best = max(kept, key=lambda g: g["rise"])
    return {"layer": best["layer"], "coef": best["coef"], "selection_rise": best["rise"], "grid": grid}


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
        layer, c = pick["layer"], pick["coef"]
        own = rise(cells, model, trait, "own", vec, layer, c, "second")
        randoms = {f"random{s}": rise(cells, model, trait, f"random{s}", random_like(vec, s), layer, c, "second")
                   for s in RANDOM_SEEDS}
        others = {o: rise(cells, model, trait, o, matched_norm(vectors[o], vec), layer, c, "second")
                  for o in builtin_traits() if o != name}
        base = cells.get(model, trait, "none", None, None, 0.0, "second")
        max_random = max(abs(sum(r) / len(r)) for r in randoms.values())
        own_mean = sum(own) / len(own)
        best_other = max(others, key=lambda o: sum(others[o]) / len(others[o]))
        res = {"layer": layer, "coef": c, "selection_rise": pick["selection_rise"], "grid": pick["grid"],
               "base_mean": sum(base.values()) / len(base), "own": summary(own),
               "own_minus_random0": summary([a - b for a, b in zip(own, randoms["random0"], strict=True)]),
               "random": {k: summary(v) for k, v in randoms.items()},
               "others": {k: summary(v) for k, v in others.items()},
               "max_abs_random_rise": max_random,
               "ratio_to_random": own_mean / max_random if max_random > 0 else None,
               "best_other": best_other, "best_other_rise": sum(others[best_other]) / len(others[best_other])}
        res["target_interval_and_3x_random"] = bool(res["own"]["ci95"][0] > 0 and own_mean >= 3 * max_random)
        res["target_own_beats_others"] = bool(own_mean > res["best_other_rise"])
        results["traits"][name] = res
        print(f"{name:>13}: L{layer} c={c:g} own rise {own_mean:+.3f} {res['own']['ci95']}, "
              f"random max |rise| {max_random:.3f} (x{res['ratio_to_random'] or 0:.1f}), best other "
              f"{best_other} {res['best_other_rise']:+.3f}  [{time.time() - t0:.0f}s]", flush=True)
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
