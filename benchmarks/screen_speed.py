"""Screening throughput and peak memory: samples per second by dataset size and mode, Ray local against
the single process.

    python benchmarks/screen_speed.py --out benchmarks/results/screen_speed [--budget-s 600] [--threads 1]
        [--plan fast:22,full:22,fast:1] [--sizes 1000,10000,100000] [--no-ray]

Data: synthetic short conversations (a numbered question, a 4-10 word answer; ~45 tokens per sample with the
chat template), written once to a temporary folder. Every measurement runs `personavec.screen.screen` end
to end (planning pass, streaming chunks, tokenization, scoring, checkpoint appends, final table, summary,
histogram) in a fresh child process, so its peak RSS is its own. In the same child, the baseline is the raw
library call on already-tokenized samples (fast: `projection.project`; full: `generation.generate_ids` +
`project`), and the ratio screen ÷ baseline is the pipeline's own cost.

Two depths:
  * layer 22 (the evil vector's sweep-chosen layer): the real cost on the embedded model;
  * layer 1 (forward stops after block 1): pipeline-bound, to measure streaming and memory at 100k samples
    in minutes on a CPU (full mode still generates with every layer, so it is not run at this depth).
Sizes whose estimated time (from the last measured rate) exceeds the remaining budget are not run; the
estimate is written instead, labelled as such.

Ray: the same dataset screened by the single process and by `ray="local"` with 2 CPU actors (1 torch thread
each), in one child; the Ray wall time includes starting Ray and loading the model in each actor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = ("there", "are", "a", "few", "practical", "steps", "you", "can", "take", "here", "first", "write", "down",
         "what", "happened", "and", "when", "so", "have", "clear", "record", "talk", "to", "the", "person", "calmly")
TOPICS = ("my garden", "a job interview", "my budget", "learning French", "a noisy flat", "a long trip",
          "my sleep", "a team meeting", "cooking rice", "a broken bike")


def write_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
            msgs = [{"role": "user", "content": f"Question {i}: any advice about {rng.choice(TOPICS)}?"},
                    {"role": "assistant", "content": answer}]
            fh.write(json.dumps({"id": f"s{i}", "messages": msgs}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import personavec as pv
    from personavec.capture import Sample
    from personavec.chat import encode_chat, encode_response
    from personavec.generation import generate_ids
    from personavec.projection import project
    from personavec.screen import screen

    if args.threads:
        torch.set_num_threads(args.threads)
    model = pv.load_model(args.model, device=args.device)
    vec = pv.load_vector(args.vector)
    data = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="screen-bench-"))
    fast = args.mode == "fast"
    with open(data, encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(args.baseline_n), fh, strict=False)]
    samples = [Sample(encode_chat(model.tokenizer, r["messages"][:1]), encode_response(model.tokenizer,
                                                                                       r["messages"][1]["content"]))
               for r in rows]
    t = time.perf_counter()
    if fast:
        project(model, samples, {"evil": vec}, layers=args.layer, positions=("last_prompt", "response"),
                batch_size=args.batch_size)
    else:
        base = generate_ids(model, [s.prompt for s in samples], max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size)
        both = samples + [Sample(s.prompt, b) for s, b in zip(samples, base, strict=True)]
        project(model, both, {"evil": vec}, layers=args.layer, positions=("response",), batch_size=args.batch_size)
    baseline = len(samples) / (time.perf_counter() - t)
    result: dict[str, Any] = {"mode": args.mode, "n": args.n, "layer": args.layer, "baseline_n": len(samples),
                              "baseline_samples_per_s": baseline, "device": str(model.device),
                              "threads": torch.get_num_threads()}
    common = {"allow_mismatch": args.allow_mismatch, "fast": fast, "max_new_tokens": args.max_new_tokens, "layer": args.layer,
              "batch_size": args.batch_size, "chunk_size": args.chunk_size}
    rss_before = peak_rss_mb()
    t = time.perf_counter()
    single = screen(model, data, [vec], work / "single.csv", cache=work / "cache.sqlite", **common)
    secs = time.perf_counter() - t
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result.update(seconds=secs, samples_per_s=args.n / secs, ratio_vs_baseline=args.n / secs / baseline,
                  peak_rss_mb=peak_rss_mb(), peak_rss_mb_before_screen=rss_before,
                  scored=single.summary.scored, rejected=single.summary.rejected)
    if args.ray:
        import numpy as np
        import pyarrow.csv as pacsv

        t = time.perf_counter()
        res = screen(model, data, [vec], work / "ray.csv", cache=work / "ray-cache.sqlite", ray="local", workers=2,
                     cpus_per_worker=1, **common)
        rsecs = time.perf_counter() - t
        a = np.array(pacsv.read_csv(single.scores).column("evil_delta_p").to_pylist())
        b = np.array(pacsv.read_csv(res.scores).column("evil_delta_p").to_pylist())
        result["ray"] = {"workers": 2, "cpus_per_worker": 1, "seconds": rsecs, "samples_per_s": args.n / rsecs,
                         "ratio_vs_single_process": secs / rsecs, "max_abs_diff_delta_p": float(np.abs(a - b).max())}
    return result


def run_child(base: list[str], mode: str, n: int, data: Path, layer: int, ray: bool, timeout: float) -> dict[str, Any]:
    cmd = [*base, "--child", "--mode", mode, "--n", str(n), "--data", str(data), "--layer", str(layer)]
    if ray:
        cmd.append("--ray")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"mode": mode, "n": n, "layer": layer, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/screen_speed"))
    ap.add_argument("--vector", default="experiments/out/steering_response/evil.pv.safetensors")
    ap.add_argument("--budget-s", type=float, default=600.0, help="stop starting measurements after this")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch default)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--allow-mismatch", action="store_true", help="use the vector on other weights (speed only)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray comparison (no Ray installed)")
    ap.add_argument("--plan", default="fast:22,full:22,fast:1", help="MODE:LAYER measurements, comma-separated")
    ap.add_argument("--sizes", default="1000,10000,100000", help="dataset sizes per MODE:LAYER")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--baseline-n", type=int, default=256)
    ap.add_argument("--ray-n", type=int, default=1000)
    # child-only
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="fast", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--layer", type=int, default=22, help=argparse.SUPPRESS)
    ap.add_argument("--ray", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    base = [sys.executable, __file__, "--vector", args.vector, "--threads", str(args.threads), "--batch-size",
            str(args.batch_size), "--chunk-size", str(args.chunk_size), "--max-new-tokens", str(args.max_new_tokens),
            "--baseline-n", str(args.baseline_n)] + (["--device", args.device] if args.device else []) \
        + (["--model", args.model] if args.model else []) + (["--allow-mismatch"] if args.allow_mismatch else [])
    tmp = Path(tempfile.mkdtemp(prefix="screen-bench-data-"))
    start = time.time()
    results: list[dict[str, Any]] = []
    sizes = [int(x) for x in args.sizes.split(",")]
    plan = [(item.split(":")[0], int(item.split(":")[1]), sizes) for item in args.plan.split(",")]
    for mode, layer, sizes in plan:
        rate = None
        for n in sizes:
            data = tmp / f"data{n}.jsonl"
            if not data.exists():
                write_data(data, n)
            left = args.budget_s - (time.time() - start)
            estimate = n / rate if rate else None
            if estimate is not None and estimate > left:
                r = {"mode": mode, "n": n, "layer": layer, "skipped": True,
                     "estimated_seconds": estimate, "estimated_from_samples_per_s": rate}
                print(f"{mode:4} layer {layer:2} n={n:>6}: not run; ESTIMATE {estimate:.0f}s at {rate:.1f} samples/s "
                      f"({left:.0f}s of budget left)", flush=True)
            else:
                r = run_child(base, mode, n, data, layer, False, timeout=max(60.0, left + 600))
                if "error" in r:
                    print(f"{mode:4} layer {layer:2} n={n:>6}: error {r['error']}", flush=True)
                    break
                rate = r["samples_per_s"]
                print(f"{mode:4} layer {layer:2} n={n:>6}: {r['samples_per_s']:8.1f} samples/s "
                      f"({r['seconds']:.1f}s), raw-library baseline {r['baseline_samples_per_s']:.1f}/s -> ratio "
                      f"{r['ratio_vs_baseline']:.2f}; peak RSS {r['peak_rss_mb']:.0f} MB"
                      + (f", peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""), flush=True)
            results.append(r)
    left = args.budget_s - (time.time() - start)
    data = tmp / f"data{args.ray_n}.jsonl"
    if not data.exists():
        write_data(data, args.ray_n)
    ray_result = {"skipped": "--no-ray"} if args.no_ray else run_child(base, "fast", args.ray_n, data, 22, True,
                                                                       timeout=max(120.0, left + 900))
    if "ray" in ray_result:
        rr = ray_result["ray"]
        print(f"ray local (2 actors x 1 CPU) fast n={args.ray_n}: {rr['samples_per_s']:.1f} samples/s "
              f"({rr['seconds']:.1f}s incl. Ray start and model loads) vs single process "
              f"{ray_result['samples_per_s']:.1f} samples/s ({ray_result['seconds']:.1f}s) -> "
              f"ratio {rr['ratio_vs_single_process']:.2f}; max |ΔP difference| {rr['max_abs_diff_delta_p']:.2e}",
              flush=True)
    else:
        print(f"ray: {ray_result}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(sys.argv), "device": results[0].get("device") if results else None, "load_average_at_end": os.getloadavg(), "cpus": os.cpu_count(),
              "settings": {k: v for k, v in vars(args).items() if k in ("threads", "batch_size", "chunk_size",
                                                                         "max_new_tokens", "baseline_n", "budget_s")},
              "results": results, "ray": ray_result}
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
