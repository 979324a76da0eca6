"""Issue 13, CPU-sized start: does finetuning on the AUTHORED trait data raise the trait, measured by the
reference measure (authored answers the finetuning data never contained), and does the finetuning shift along
the vector follow it?

For each trait × set × seed: a LoRA finetune of the embedded model (float32) on
`experiments/data/finetune_authored/<trait>/<set>.jsonl`; then, on the merged model: the reference measure on
all 20 evaluation questions (per question), neutral-text perplexity, and the finetuning shift (mean
last-prompt activation on the evaluation prompts minus the base model's, on the unit vector at its layer).
Before training: the dataset's mean --fast ΔP (the screening prediction). Settings fixed before the first run.

    .venv/bin/python experiments/finetune_authored.py --traits evil --sets normal,II --seeds 0,1,2

Resumable: each finished finetune appends one row to runs.jsonl and is skipped on a rerun.
Writes results.json and results.md (per-set means with 95% t intervals over seeds; II − normal paired by seed).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

import personavec as pv
from personavec.capability import perplexity
from personavec.io import append_jsonl, read_jsonl, write_json, write_text
from personavec.reference import reference_measure
from personavec.screen import screen
from personavec.screening.stats import mean_ci
from personavec.training import TrainSettings, attach_adapter, train
from personavec.training.shift import eval_prompts, last_prompt_means, project

DATA = Path("experiments/data/finetune_authored")
VECTORS = Path("experiments/out/monitor_eval")
SETTINGS = dict(rank=32, alpha=64, rslora=True, lr=3e-4, epochs=2.0, batch_size=8, max_length=192, save_steps=1000,
                shift_questions=2)


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95% t interval over seeds, from the screening statistics."""
    ci = mean_ci(np.asarray(xs, dtype=float))
    return ci["mean"], ci["ci_low"], ci["ci_high"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/out/finetune_authored"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/personavec-finetune-authored"))
    ap.add_argument("--traits", default="evil")
    ap.add_argument("--sets", default="normal,II")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = pv.load_model(dtype="float32")
    runs_path = args.out / "runs.jsonl"
    done = {(r["trait"], r["set"], r["seed"]) for r in read_jsonl(runs_path)}
    for trait in args.traits.split(","):
        loaded = pv.load_trait(trait)
        vec = pv.load_vector(VECTORS / f"{trait}.pv.safetensors")
        prompts = eval_prompts(base, loaded)
        base_means = last_prompt_means(base, prompts)
        base_ref = reference_measure(base, loaded.trait)
        base_row = {"trait": trait, "set": "base", "seed": None, "reference": base_ref.mean,
                    "reference_per_question": base_ref.gaps, "perplexity": perplexity(base), "shift": 0.0}
        if (trait, "base", None) not in done:
            append_jsonl(runs_path, [base_row])
        for name in args.sets.split(","):
            data = DATA / trait / f"{name}.jsonl"
            dp = screen(base, data, [vec], args.work / f"{trait}_{name}_dp.csv", fast=True, histograms=False)
            for seed in (int(s) for s in args.seeds.split(",")):
                if (trait, name, seed) in done:
                    continue
                folder = args.work / f"{trait}_{name}_s{seed}"
                shutil.rmtree(folder, ignore_errors=True)
                t = time.time()
                train(copy.deepcopy(base), data, folder, TrainSettings(seed=seed, **SETTINGS))  # type: ignore[arg-type]
                ft = attach_adapter(copy.deepcopy(base), folder, merge=True, allow_mismatch=True)
                ref = reference_measure(ft, loaded.trait)
                shift = project(last_prompt_means(ft, prompts), base_means, vec)[vec.layer]
                row = {"trait": trait, "set": name, "seed": seed, "reference": ref.mean,
                       "reference_per_question": ref.gaps, "perplexity": perplexity(ft), "shift": shift,
                       "dataset_delta_p": dp.summary["traits"][vec.trait]["delta_p"]["mean"],
                       "train_seconds": round(time.time() - t, 1)}
                append_jsonl(runs_path, [row])
                print(f"{trait} {name} seed {seed}: reference {ref.mean:+.4f} (base {base_ref.mean:+.4f}), "
                      f"shift {shift:+.3f}, perplexity {row['perplexity']:.2f}, dataset ΔP "
                      f"{row['dataset_delta_p']:.2f} [{time.time() - t0:.0f}s]", flush=True)
                del ft
    summarize(args.out, read_jsonl(runs_path))


def summarize(out: Path, rows: list[dict[str, Any]]) -> None:
    result: dict[str, Any] = {"settings": SETTINGS, "traits": {}}
    lines = ["| trait | set | seeds | reference measure [95% t CI over seeds] | shift [95% t CI] | perplexity | dataset ΔP |",
             "|---|---|---|---|---|---|---|"]
    for trait in dict.fromkeys(r["trait"] for r in rows):
        mine = [r for r in rows if r["trait"] == trait]
        res: dict[str, Any] = {}
        for name in dict.fromkeys(r["set"] for r in mine):
            sub = [r for r in mine if r["set"] == name]
            m, lo, hi = t_interval([r["reference"] for r in sub])
            res[name] = {"n": len(sub), "reference": [m, lo, hi], "shift": list(t_interval([r["shift"] for r in sub])),
                         "perplexity": float(np.mean([r["perplexity"] for r in sub])),
                         "dataset_delta_p": sub[0].get("dataset_delta_p")}
            dp = res[name]["dataset_delta_p"]
            sm, slo, shi = res[name]["shift"]
            lines.append(f"| {trait} | {name} | {len(sub)} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | {sm:+.1f} [{slo:+.1f}, {shi:+.1f}] | "
                         f"{res[name]['perplexity']:.2f} | {'–' if dp is None else f'{dp:.2f}'} |")
        by_seed = {r["seed"]: r for r in mine if r["set"] == "normal"}
        diffs = [r["reference"] - by_seed[r["seed"]]["reference"] for r in mine if r["set"] == "II" and r["seed"] in by_seed]
        if diffs:
            m, lo, hi = t_interval(diffs)
            res["II_minus_normal"] = [m, lo, hi]
            lines.append(f"| {trait} | II − normal (paired by seed) | {len(diffs)} | {m:+.4f} [{lo:+.4f}, {hi:+.4f}] | | | |")
        result["traits"][trait] = res
    write_json(out / "results.json", result)
    write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
