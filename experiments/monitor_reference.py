"""Issue 12 experiment: does the last-prompt-token projection predict the trait, measured by the AUTHORED
reference answers under the monitored system prompt, with graded prompts that paraphrase no prompt pair?

For evil, humorous and impolite (committed vectors, read at the vector's layer fixed by its earlier sweep):
`personavec.monitor.monitor_eval` on the trait file's graded prompts (rewritten for issue 12: persona
descriptions such as "Reply like a schemer who …") × all 20 evaluation questions, one sampled answer per
point for the contrast judge (reported beside, not the headline). Reported: the highest content-word overlap
(Jaccard) of any graded prompt with any prompt pair, and Pearson r between projection and the reference
measure across all points, over level means, and within levels (both centred on their level's mean), each
with a 95% Fisher-z interval. Added after the first evil result (raw r 0.02, level means 0.72): r within
questions (both centred on each question's mean over the 8 prompts), which removes the between-question spread
of the references' own likelihood gap (sd 0.40 nats/token for evil, ten times the spread between levels) and
asks whether the projection's shift predicts the measure's shift when only the prompt changes.

    .venv/bin/python experiments/monitor_reference.py --out experiments/out/monitor_reference

Resumable through the monitor run folders. Writes results.json and results.md; the per-point values are in
each run folder's results.csv.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

import personavec as pv
from personavec.io import read_jsonl, write_json, write_text
from personavec.monitor import MonitorSettings, monitor_eval
from personavec.reproduce.monitoring import Point, correlations, overlap
from personavec.reproduce.records import Correlation

TRAITS = ("evil", "humorous", "impolite")
VECTORS = Path("experiments/out/monitor_eval")


def sd_of_means(points: list[Point], by: str) -> float:
    """Spread (population sd) of the reference measure's group means: between questions or between levels."""
    groups: dict[int, list[float]] = {}
    for p in points:
        groups.setdefault(getattr(p, by), []).append(p.reference)
    return float(np.std([sum(v) / len(v) for v in groups.values()]))


def ci(r: Correlation) -> dict[str, float | None]:
    return {"r": r.r, "low": r.low, "high": r.high}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/out/monitor_reference"))
    ap.add_argument("--traits", default=",".join(TRAITS))
    args = ap.parse_args()
    t0 = time.time()
    model = pv.load_model()
    settings = MonitorSettings(n_questions=None, rollouts=1, max_new_tokens=24, temperature=1.0,
                               conditions=("graded",), seed=0)
    results: dict[str, Any] = {"settings": {"n_questions": 20, "levels": 8, "rollouts": 1, "max_new_tokens": 24},
                               "traits": {}}
    for name in args.traits.split(","):
        loaded = pv.load_trait(name)
        vec = pv.load_vector(VECTORS / f"{name}.pv.safetensors")
        res = monitor_eval(model, loaded, vec, settings=settings, run_dir=args.out / f"{name}.monitor",
                           allow_mismatch=True).to_json()
        pts = [Point(p["condition"], int(p["level"]), int(p["question_idx"]), float(p["projection"]),
                     float(p["reference"]), p.get("trait_score"))
               for p in read_jsonl(args.out / f"{name}.monitor" / "points.jsonl") if p.get("reference") is not None]
        r = correlations(pts)  # reproduce's monitor stage computes the same statistics
        judged = [p for p in pts if p.trait_score is not None]
        rj = correlations([replace(p, reference=float(p.trait_score or 0)) for p in judged])
        row = {"layer": res["layer"], "n_points": len(pts), "overlap": asdict(overlap(loaded.trait)),
               "r_points": ci(r["points"]), "r_level_means": ci(r["level_means"]),
               "r_within_levels": ci(r["within_levels"]), "r_within_questions": ci(r["within_questions"]),
               "r_contrast_judge_within_questions": ci(rj["within_questions"]),
               "sd_question_means": sd_of_means(pts, "question_idx"), "sd_level_means": sd_of_means(pts, "level"),
               "r_contrast_judge_points": res["pearson"]["trait_score"]["overall"],
               "r_prompted_judge_free_points": res["pearson"]["judge_free"]["overall"],
               "levels": [{"level": v["level"], "label": v["label"], "projection": v["projection"],
                           "reference": v["reference"]} for v in res["levels"]]}
        results["traits"][name] = row
        print(f"{name:>9}: layer {row['layer']}, r = {row['r_points']['r']:.2f} "
              f"[{row['r_points']['low']:.2f}, {row['r_points']['high']:.2f}] over {len(pts)} points; "
              f"level means {row['r_level_means']['r']:.2f}; within questions "
              f"{row['r_within_questions']['r']:.2f}; within levels {row['r_within_levels']['r']:.2f} "
              f"[{row['r_within_levels']['low']:.2f}, {row['r_within_levels']['high']:.2f}]; max prompt overlap "
              f"{row['overlap']['jaccard']:.2f}  [{time.time() - t0:.0f}s]", flush=True)
    results["seconds"] = round(time.time() - t0)
    write_json(args.out / "results.json", results)
    write_text(args.out / "results.md", render(results))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    def f(c: dict[str, float]) -> str:
        return f"{c['r']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"

    lines = ["| trait | layer | points | r (all points) | r (8 level means) | r (within questions) | r (within levels) | "
             "contrast-judge r (all / within questions) | max graded/pair word overlap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["traits"].items():
        cj = r["r_contrast_judge_points"]
        lines.append(f"| {name} | {r['layer']} | {r['n_points']} | {f(r['r_points'])} | {f(r['r_level_means'])} | "
                     f"{f(r['r_within_questions'])} | {f(r['r_within_levels'])} | "
                     f"{'–' if cj is None else f'{cj:.2f}'} / {r['r_contrast_judge_within_questions']['r']:.2f} | "
                     f"{r['overlap']['jaccard']:.2f} ({', '.join(r['overlap']['shared'])}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
