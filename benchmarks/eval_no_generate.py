"""What `EvalSettings(generate=False)` saves: `evaluate` with the reference measure on one trait, a few steered
conditions, with and without generating the answers (same settings otherwise), in one process on the embedded
model. Asserts the per-question measure values are identical (the measure reads the same steered model).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_no_generate.py    # output: benchmarks/results/eval_no_generate.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import personavec as pv
from personavec.evaluate import Condition, EvalSettings, evaluate
from personavec.io import read_jsonl

VECTOR = Path(__file__).resolve().parent.parent / "experiments/out/reproduce_cpu/extract/evil/vector.pv.safetensors"


def per_question(run: Path) -> dict[tuple[str, int], float]:
    return {(r["cell"], r["question_idx"]): r["value"] for r in read_jsonl(run / "measure.jsonl")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vector", type=Path, default=VECTOR, help="evil vector for the embedded model")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    model = pv.load_model()
    vec = pv.PersonaVector.load(args.vector)
    conditions = [Condition(None, 0.0)] + [Condition(layer, c) for layer in (14, 18) for c in (-2.0, -1.0, 1.0, 2.0)]
    base = EvalSettings(n_questions=5, max_new_tokens=16, half="first")
    omp = os.environ.get("OMP_NUM_THREADS")
    print(f"# {f'OMP_NUM_THREADS={omp} ' if omp else ''}{' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print("# measured while another CPU job ran on this machine: compare the ratio, not the absolute times")
    print(f"# embedded {model.model_id} ({model.hf.dtype}), trait evil, reference measure, {base.n_questions} questions "
          f"(first half), max_new_tokens {base.max_new_tokens}, greedy; {len(conditions)} conditions "
          f"(unsteered, layers 14 and 18 at ±1, ±2); torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        evaluate(model, "evil", vector=vec, conditions=conditions[:2], judge="reference",
                 settings=replace(base, n_questions=1, max_new_tokens=2))  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        values: dict[bool, dict[tuple[str, int], float]] = {}
        for rep in range(args.repeats):
            for generate in (True, False):
                run = Path(tmp) / f"gen{int(generate)}_{rep}"
                t = time.perf_counter()
                evaluate(model, "evil", vector=vec, conditions=conditions, judge="reference",
                         settings=replace(base, generate=generate), run_dir=run)
                times[generate].append(time.perf_counter() - t)
                got = per_question(run)
                assert values.setdefault(generate, got) == got, "a rerun changed the measure"
                print(f"run {rep + 1}  generate={generate!s:5s}  {times[generate][-1]:7.2f} s  "
                      f"({len(read_jsonl(run / 'answers.jsonl'))} answers, {len(got)} per-question values)")
    assert values[True] == values[False], "generate=False changed the per-question measure"
    print(f"per-question measure values identical with and without answers: {len(values[True])} values")
    med = {g: statistics.median(ts) for g, ts in times.items()}
    print(f"median wall time: generate=True {med[True]:.2f} s, generate=False {med[False]:.2f} s; "
          f"ratio {med[True] / med[False]:.2f}x (time saved {1 - med[False] / med[True]:.0%})")
    print(f"# 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
