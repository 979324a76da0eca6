"""Issue 4 experiment: does the last prompt token's projection onto a persona vector predict the trait of
the answer, before generation, across graded system prompts and many-shot prompts (the paper's Table 2)?

For every built-in trait (evil first) on the embedded model:
  1. the vector: experiments/out/steering_response/<trait>.pv.safetensors when that experiment made one
     (read only; its layer was chosen by that sweep), else extracted here (6 extraction questions × 5 pairs,
     contrast judge; layer = the default 60% of depth, 18). The layer is fixed before any monitoring point;
  2. `monitor_eval` on 6 evaluation questions: the trait's 8 graded system prompts and 0/5/10/15/20-shot
     prompts (examples = the model's own answers to EXTRACTION questions under positive prompts), one greedy
     answer of 24 tokens per prompt × question, contrast judge and judge-free measure;
  3. a calibrated copy of the vector (meta "monitor": layer, thresholds) for `personavec serve`.
Results are written after every trait (results.json, results.md), so partial runs keep what finished.

    .venv/bin/python experiments/monitor_eval.py --out experiments/out/monitor_eval

A second pass closer to the paper's protocol (answers sampled at temperature 1 and averaged, here 4 per
prompt × question, graded prompts only) reuses the same vectors and writes results_graded_r4.*:

    .venv/bin/python experiments/monitor_eval.py --out experiments/out/monitor_eval --graded-r4

(for evil this is the same run as `personavec monitor-eval --vector
experiments/out/steering_response/evil.pv.safetensors --trait evil --out
experiments/out/monitor_eval/evil.graded_r4.monitor --n-questions 6 --rollouts 4 --temperature 1
--max-new-tokens 24 --condition graded`).

Resumable: extraction and monitoring run folders are reused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import personavec as pv
from personavec.io import write_json, write_text
from personavec.monitor import MonitorSettings, monitor_eval, store_calibration

ORDER = ("evil", "impolite", "humorous", "sycophantic", "optimistic", "apathetic", "hallucinating")
SETTINGS = MonitorSettings(n_questions=6, rollouts=1, max_new_tokens=24, temperature=0.0,
                           shots=(0, 5, 10, 15, 20), shot_tokens=32)
GRADED_R4 = MonitorSettings(n_questions=6, rollouts=4, max_new_tokens=24, temperature=1.0, conditions=("graded",))
REUSE = Path("experiments/out/steering_response")


def vector_for(model: pv.Model, name: str, out: Path) -> tuple[Path, str]:
    reused = REUSE / f"{name}.pv.safetensors"
    if reused.exists():
        return reused, f"reused {reused} (layer chosen by its sweep)"
    path = out / f"{name}.extracted.pv.safetensors"
    if not path.exists():
        pv.extract(model, name, run_dir=out / f"{name}.extract", n_questions=6, max_new_tokens=32).save(path)
    return path, "extracted here (6 extraction questions; default layer)"


def run_trait(model: pv.Model, name: str, out: Path, settings: MonitorSettings, tag: str) -> dict[str, Any]:
    t0 = time.time()
    source, how = vector_for(model, name, out)
    vec = pv.load_vector(source)
    t1 = time.time()

    def progress(task: str, done: int, total: int) -> None:
        if task == "points":
            print(f"  {name}: {done}/{total} points ({time.time() - t1:.0f} s)", flush=True)

    result = monitor_eval(model, name, vec, settings=settings, run_dir=out / f"{name}.{tag}", progress=progress)
    if tag == "monitor":
        store_calibration(source, result, out / f"{name}.pv.safetensors")
    res = result.to_json()
    return {"trait": name, "vector": how, "layer": res["layer"], "pearson": res["pearson"],
            "pearson_levels": res["pearson_levels"], "calibration": res["calibration"],
            "pearson_response_projection": res["pearson_response_projection"],
            "extract_seconds": round(t1 - t0), "monitor_seconds": round(time.time() - t1)}


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| trait | layer | r graded, judge (levels) | r graded, judge-free (levels) | r many-shot, judge / "
             "judge-free | r all, judge / judge-free | threshold | held-out bal. acc. | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, lv, cal = r["pearson"], r["pearson_levels"], r["calibration"]["prompt"]
        minutes = (r["extract_seconds"] + r["monitor_seconds"]) / 60
        lines.append(f"| {r['trait']} | {r['layer']} | {fmt(p['trait_score'].get('graded'))} "
                     f"({fmt(lv['trait_score'].get('graded'))}) | {fmt(p['judge_free'].get('graded'))} "
                     f"({fmt(lv['judge_free'].get('graded'))}) | {fmt(p['trait_score'].get('many_shot'))} / "
                     f"{fmt(p['judge_free'].get('many_shot'))} | {fmt(p['trait_score']['overall'])} / "
                     f"{fmt(p['judge_free']['overall'])} | {fmt(cal['threshold'])} | "
                     f"{fmt(cal['heldout_balanced_accuracy'])} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("experiments/out/monitor_eval"))
    ap.add_argument("--traits", default=",".join(ORDER))
    ap.add_argument("--graded-r4", action="store_true", help="the 4-sample graded pass (results_graded_r4.*)")
    args = ap.parse_args()
    settings, tag, stem = (GRADED_R4, "graded_r4.monitor", "results_graded_r4") if args.graded_r4 else \
        (SETTINGS, "monitor", "results")
    args.out.mkdir(parents=True, exist_ok=True)
    model = pv.load_model()
    rows: list[dict[str, Any]] = []
    for name in args.traits.split(","):
        rows.append(run_trait(model, name, args.out, settings, tag))
        write_json(args.out / f"{stem}.json", {"model": model.model_id, "dtype": str(model.dtype),
                                               "settings": settings.__dict__, "results": rows})
        write_text(args.out / f"{stem}.md", table(rows))
        print(table(rows[-1:]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
