"""Issue 3 experiment: does the judge-free trait measure rise with the steering coefficient at the layer
the sweep chooses, and does perplexity on neutral text rise at the largest |coefficient|?

For each trait (evil, impolite, humorous) on the embedded model, judge-free throughout (contrast judge):
  1. extract the vector (10 extraction questions, default settings);
  2. sweep the default layers × coefficients (-4, -2, 0, 2, 4) on evaluation questions 0–7 and choose a layer;
  3. at the chosen layer, measure the judge-free measure (log-likelihood of positive minus negative
     reference answers) over 7 coefficients on evaluation questions 10–19 — questions the layer choice
     never saw — and perplexity on the shipped neutral text set; report Spearman's rho.

    .venv/bin/python experiments/steering_response.py --out experiments/out/steering_response

Resumable: extraction and sweep run folders are reused. Writes results.json, results.md and a plot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import personavec as pv
from personavec.capability import perplexity
from personavec.evaluate import EvalSettings, judge_free_measure, reference_answers
from personavec.io import write_json, write_text
from personavec.stats import mean_se, spearman
from personavec.sweep import sweep
from personavec.traits import LoadedTrait

COEFS = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)


def held_out(loaded: LoadedTrait, start: int) -> LoadedTrait:
    """The same trait with only evaluation questions[start:], for measurements the layer choice never saw."""
    trait = loaded.trait.model_copy(update={"evaluation_questions": loaded.trait.evaluation_questions[start:]})
    return LoadedTrait(trait=trait, source=loaded.source, sha256=loaded.sha256)


def run_trait(model: pv.Model, name: str, out: Path) -> dict:
    t0 = time.time()
    loaded = pv.load_trait(name)
    vfile = out / f"{name}.pv.safetensors"
    if not vfile.exists():
        pv.extract(model, loaded, run_dir=out / f"{name}.extract", n_questions=10).save(vfile)
    vec = pv.load_vector(vfile)
    choice = sweep(model, loaded, vec, coefs=[-4.0, -2.0, 0.0, 2.0, 4.0], settings=EvalSettings(n_questions=8, max_new_tokens=32,
                   n_reference=8), run_dir=out / f"{name}.sweep", vector_path=vfile)
    layer = choice.best_layer
    refs = reference_answers(model, held_out(loaded, 10), EvalSettings(), None)
    line = []
    for c in COEFS:
        with vec.steer(model, layer=layer, coef=c):
            jf = mean_se([r["judge_free"] for r in judge_free_measure(model, refs)])
            ppl = perplexity(model)
        line.append({"coef": c, "judge_free": jf[0], "judge_free_se": jf[1], "n": jf[2], "perplexity": ppl})
        print(f"  {name} layer {layer} coef {c:+g}: judge-free {jf[0]:+.3f} ± {jf[1]:.3f}  perplexity {ppl:.2f}",
              flush=True)
    rho = spearman([r["coef"] for r in line], [r["judge_free"] for r in line])
    base_ppl = next(r["perplexity"] for r in line if r["coef"] == 0)
    return {"trait": name, "chosen_layer": layer, "choice": choice.to_json(), "line": line, "spearman": rho,
            "perplexity_at_0": base_ppl, "perplexity_at_-6": line[0]["perplexity"],
            "perplexity_at_+6": line[-1]["perplexity"], "seconds": round(time.time() - t0)}


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for r in results:
        xs = [p["coef"] for p in r["line"]]
        ax1.errorbar(xs, [p["judge_free"] for p in r["line"]], yerr=[p["judge_free_se"] for p in r["line"]],
                     marker="o", capsize=3, label=f"{r['trait']} (layer {r['chosen_layer']}, ρ={r['spearman']:.2f})")
        ax2.plot(xs, [p["perplexity"] for p in r["line"]], marker="o", label=r["trait"])
    ax1.set_xlabel("steering coefficient")
    ax1.set_ylabel("judge-free trait measure (nats/token)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("steering coefficient")
    ax2.set_ylabel("perplexity, neutral text")
    ax2.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: steering at the sweep's chosen layer (held-out evaluation questions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("experiments/out/steering_response"))
    ap.add_argument("--traits", default="evil,impolite,humorous")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = pv.load_model()
    results = [run_trait(model, name, args.out) for name in args.traits.split(",")]
    write_json(args.out / "results.json", {"model": model.model_id, "dtype": str(model.dtype), "results": results})
    lines = ["| trait | chosen layer | Spearman ρ (judge-free vs coef, 7 coefs) | perplexity at −6 / 0 / +6 |",
             "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['trait']} | {r['chosen_layer']} | {r['spearman']:.3f} | "
                     f"{r['perplexity_at_-6']:.2f} / {r['perplexity_at_0']:.2f} / {r['perplexity_at_+6']:.2f} |")
    write_text(args.out / "results.md", "\n".join(lines) + "\n")
    plot(results, args.out / "steering_response.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
