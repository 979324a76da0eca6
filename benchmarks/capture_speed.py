"""Activation capture speed and memory on the embedded model, three ways in one process.

    python benchmarks/capture_speed.py [--samples 200] [--quick] [--json out.json]

(1) ours     personavec.capture_means at all layers (0..n), positions response / prompt / last_prompt:
             length-sorted right-padded batches, reductions inside forward hooks, no-grad, stops after
             the last block (no final norm, no LM head).
(2) loop     the persona-vectors reference implementation's way: one sample at a time, gradients on
             (parameters require grad, no torch.no_grad), `output_hidden_states=True` through the whole
             model (LM head included), then the same per-sample means from the returned hidden states.
(3) ceiling  a plain batched no-grad forward through the decoder only (`hf.base_model`, no hooks, no LM
             head) on the same batches and padding as (1): what capture cannot beat in practice.

Throughput is real (unpadded) tokens per second over the same samples, median of 3 timed runs after a
warm-up, with the three methods interleaved run by run so that drift on a shared machine hits all three.
Peak memory of capture_means is measured for two sample counts, each in a fresh child process
(`--memory-child N`), so one size's peak cannot hide the other's.

Layer numbering: 0 = embedding output, L = output of decoder block L-1. HF's last hidden state has the
final norm applied while ours is the raw block output, so the agreement check covers layers 0..n-1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import personavec as pv
from personavec.capture import Sample
from personavec.chat import batches_by_length, encode_chat, encode_response, messages_for, pad_batch

POSITIONS = ("response", "prompt", "last_prompt")
TARGET_CEILING = 0.90
TARGET_LOOP = 1.5

# Neutral filler for synthetic answers: only the token count and variety matter for speed.
FILLER = (
    "There are a few practical steps you can take here. First, write down what happened and when, so you "
    "have a clear record to refer to. Second, talk to the person directly and calmly; most conflicts come "
    "from misunderstandings rather than bad intent. Third, if that does not help, involve someone you both "
    "trust, such as a manager or a mutual friend, and explain the situation with the facts you collected. "
    "Keep your tone constructive, focus on the outcome you want, and give people a chance to make things "
    "right. Finally, look after yourself: take breaks, get enough sleep, and remember that one difficult "
    "situation does not define you or your work. "
)


# --- samples ----------------------------------------------------------------------------------------------


def build_samples(model: pv.Model, n: int, *, seed: int = 0, min_response: int = 32,
                  max_response: int = 96) -> list[Sample]:
    """n (prompt, response) pairs: the evil trait's questions under its positive and negative system
    prompts, with synthetic answers of min_response..max_response tokens (seeded)."""
    trait = pv.load_trait("evil").trait
    questions = trait.extraction_questions + trait.evaluation_questions
    systems = [p.positive for p in trait.pairs] + [p.negative for p in trait.pairs]
    filler = encode_response(model.tokenizer, FILLER * 4)
    rng = random.Random(seed)
    prompts: dict[tuple[int, int], list[int]] = {}
    samples = []
    for i in range(n):
        key = (i % len(questions), (i // len(questions)) % len(systems))
        if key not in prompts:
            prompts[key] = encode_chat(model.tokenizer, messages_for(questions[key[0]], systems[key[1]]))
        length = rng.randint(min_response, max_response)
        start = rng.randint(0, len(filler) - length)
        samples.append(Sample(prompt=prompts[key], response=filler[start:start + length]))
    return samples


def token_count(samples: Sequence[Sample]) -> int:
    return sum(len(s.prompt) + len(s.response) for s in samples)


# --- the three methods --------------------------------------------------------------------------------------


def run_ours(model: pv.Model, samples: Sequence[Sample], batch_size: int,
             max_tokens: int) -> dict[str, torch.Tensor]:
    return pv.capture_means(model, samples, positions=POSITIONS, batch_size=batch_size, max_tokens=max_tokens)


@contextmanager
def _grads_on(model: pv.Model) -> Iterator[None]:
    """Parameters that require grad, as after a plain `from_pretrained` (load_model turns them off)."""
    before = [p.requires_grad for p in model.hf.parameters()]
    model.hf.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(model.hf.parameters(), before, strict=True):
            p.requires_grad_(flag)


def run_loop(model: pv.Model, samples: Sequence[Sample], batch_size: int,
             max_tokens: int) -> dict[str, torch.Tensor]:
    """One sample per forward, gradients on, output_hidden_states: the reference implementation's way."""
    del batch_size, max_tokens  # the loop does not batch
    sums = {p: torch.zeros(model.n_layers + 1, model.hidden_size, dtype=torch.float64) for p in POSITIONS}
    with _grads_on(model), torch.enable_grad():
        for s in samples:
            ids = torch.tensor([s.prompt + s.response], device=model.device)
            hidden = model.hf(input_ids=ids, output_hidden_states=True).hidden_states
            p = len(s.prompt)
            resp = torch.stack([h[0, p:].mean(0) for h in hidden]).detach().double().cpu()
            prompt = torch.stack([h[0, :p].mean(0) for h in hidden]).detach().double().cpu()
            last = torch.stack([h[0, p - 1] for h in hidden]).detach().double().cpu()
            sums["response"] += resp
            sums["prompt"] += prompt
            sums["last_prompt"] += last
    return {p: (s / len(samples)).float() for p, s in sums.items()}


def run_ceiling(model: pv.Model, samples: Sequence[Sample], batch_size: int,
                max_tokens: int) -> dict[str, torch.Tensor]:
    """The decoder alone, batched exactly as capture_means batches: no hooks, no reductions, no LM head."""
    lengths = [len(s.prompt) + len(s.response) for s in samples]
    decoder = model.hf.base_model
    with torch.no_grad():
        for group in batches_by_length(lengths, max_tokens=max_tokens, max_batch=batch_size):
            ids, mask = pad_batch([samples[i].prompt + samples[i].response for i in group],
                                  model.tokenizer.pad_token_id, side="right", device=model.device)
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    return {}


Method = Callable[[pv.Model, Sequence[Sample], int, int], dict[str, torch.Tensor]]
METHODS: dict[str, tuple[str, Method]] = {
    "ours": ("personavec capture_means", run_ours),
    "loop": ("per-sample loop, grads on", run_loop),
    "ceiling": ("decoder forward (ceiling)", run_ceiling),
}


def time_methods(model: pv.Model, samples: Sequence[Sample], *, repeats: int, batch_size: int,
                 max_tokens: int, log: Callable[[str], None]) -> tuple[dict[str, list[float]],
                                                                       dict[str, dict[str, torch.Tensor]]]:
    warm = list(samples[: min(len(samples), 2 * batch_size)])
    for name, (_, fn) in METHODS.items():
        log(f"warm-up {name} ({len(warm)} samples)")
        fn(model, warm, batch_size, max_tokens)
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    results: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(repeats):
        for name, (_, fn) in METHODS.items():
            t0 = time.perf_counter()
            results[name] = fn(model, samples, batch_size, max_tokens)
            seconds[name].append(time.perf_counter() - t0)
            log(f"run {r + 1}/{repeats} {name}: {seconds[name][-1]:.2f} s")
    return seconds, results


def agreement(ours: dict[str, torch.Tensor], loop: dict[str, torch.Tensor], n_layers: int) -> float:
    """Largest relative difference of the per-position means at layers 0..n-1 (batched vs one by one)."""
    worst = 0.0
    for p in POSITIONS:
        a, b = ours[p][:n_layers], loop[p][:n_layers]
        rel = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)
        worst = max(worst, float(rel.max()))
    return worst


# --- memory (child processes) -------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    """Samples the resident set size every few milliseconds on a thread (torch ops release the GIL).

    ru_maxrss alone is not enough: the model load's own peak can exceed capture's and hide it."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def memory_child(n: int, batch_size: int, max_tokens: int, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    model = pv.load_model()
    samples = build_samples(model, n)
    run_ours(model, samples[:batch_size], batch_size, max_tokens)  # allocator warm-up, as in the timing
    before = _rss_bytes()
    t0 = time.perf_counter()
    with _PeakSampler() as sampler:
        run_ours(model, samples, batch_size, max_tokens)
    seconds = time.perf_counter() - t0
    mb = 1024 * 1024
    return {"samples": n, "tokens": token_count(samples), "seconds": round(seconds, 2),
            "rss_before_mb": round(before / mb, 1), "peak_rss_mb": round(sampler.peak / mb, 1),
            "peak_increase_mb": round((sampler.peak - before) / mb, 1),
            # Linux reports ru_maxrss in KiB: the whole child's peak, model load included.
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def measure_memory(sizes: Sequence[int], args: argparse.Namespace,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    out = []
    for n in sizes:  # one child at a time: never two heavy processes at once
        log(f"memory child: capture_means on {n} samples")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n),
               "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for {n} samples failed:\n{proc.stderr[-2000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# --- main ---------------------------------------------------------------------------------------------------


def summarize(model: pv.Model, samples: Sequence[Sample], seconds: dict[str, list[float]], agree: float,
              memory: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    tokens = token_count(samples)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    tps = {name: tokens / median[name] for name in METHODS}
    ratio_ceiling = tps["ours"] / tps["ceiling"]
    ratio_loop = tps["ours"] / tps["loop"]
    return {
        "benchmark": "capture_speed",
        "model_id": model.model_id,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "personavec_version": pv.__version__,
        "n_layers": model.n_layers,
        "layers_captured": f"0..{model.n_layers}",
        "positions": list(POSITIONS),
        "samples": len(samples),
        "tokens": tokens,
        "prompt_tokens": sum(len(s.prompt) for s in samples),
        "response_tokens": sum(len(s.response) for s in samples),
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "seconds": {name: [round(x, 4) for x in s] for name, s in seconds.items()},
        "tokens_per_s": {name: round(v, 1) for name, v in tps.items()},
        "ours_over_ceiling": round(ratio_ceiling, 3),
        "ours_over_loop": round(ratio_loop, 3),
        "target_ours_over_ceiling": TARGET_CEILING,
        "target_ours_over_loop": TARGET_LOOP,
        "meets_ceiling_target": ratio_ceiling >= TARGET_CEILING,
        "meets_loop_target": ratio_loop >= TARGET_LOOP,
        "ours_vs_loop_max_relative_difference": agree,
        "memory": memory,
        "quick": args.quick,
    }


def render(summary: dict[str, Any]) -> str:
    tps, sec = summary["tokens_per_s"], summary["seconds"]
    ok = {True: "OK", False: "BELOW TARGET"}
    lines = [
        "=" * 78,
        f"capture speed: {summary['model_id']} ({summary['device']}, {summary['dtype']}, "
        f"{summary['torch_threads']} threads, torch {summary['torch_version']})",
        f"samples {summary['samples']}, tokens {summary['tokens']:,} (prompt {summary['prompt_tokens']:,}, "
        f"response {summary['response_tokens']:,}), batch {summary['batch_size']}, "
        f"layers {summary['layers_captured']}, positions {'/'.join(summary['positions'])}",
        f"median of {summary['repeats']} runs after a warm-up:",
    ]
    for name, (label, _) in METHODS.items():
        runs = ", ".join(f"{x:.2f}" for x in sec[name])
        lines.append(f"  ({list(METHODS).index(name) + 1}) {label:<28} {tps[name]:>10,.0f} tokens/s   [{runs} s]")
    lines += [
        f"  ours / ceiling  {summary['ours_over_ceiling']:.3f}   (target >= {TARGET_CEILING:.2f})  "
        f"{ok[summary['meets_ceiling_target']]}",
        f"  ours / loop     {summary['ours_over_loop']:.2f}x   (target >= {TARGET_LOOP:.1f}x)  "
        f"{ok[summary['meets_loop_target']]}",
        f"  ours vs loop, layers 0..n-1: max relative difference {summary['ours_vs_loop_max_relative_difference']:.2e}",
    ]
    if summary["memory"]:
        lines.append("peak RSS of capture_means, each size in a fresh process (increase over RSS before capture):")
        for m in summary["memory"]:
            lines.append(f"  {m['samples']:>6} samples ({m['tokens']:,} tokens): +{m['peak_increase_mb']:.1f} MB "
                         f"(peak {m['peak_rss_mb']:.0f} MB, ru_maxrss {m['ru_maxrss_mb']:.0f} MB, "
                         f"{m['seconds']:.1f} s)")
    lines.append("=" * 78)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--samples", type=int, default=200, help="samples timed per method (default 200)")
    ap.add_argument("--quick", action="store_true", help="a small smoke run: 24 samples, memory 16 vs 64")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--memory-sizes", default="100,1000", help="sample counts for the memory children")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples = min(args.samples, 24)
        if args.memory_sizes == "100,1000":
            args.memory_sizes = "16,64"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.batch_size, args.max_tokens, args.threads)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[capture_speed] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    model = pv.load_model()
    samples = build_samples(model, args.samples)
    log(f"{model.model_id}: {len(samples)} samples, {token_count(samples):,} tokens")
    seconds, results = time_methods(model, samples, repeats=args.repeats, batch_size=args.batch_size,
                                    max_tokens=args.max_tokens, log=log)
    agree = agreement(results["ours"], results["loop"], model.n_layers)
    sizes = [] if args.no_memory else [int(x) for x in args.memory_sizes.split(",") if x.strip()]
    memory = measure_memory(sizes, args, log)
    summary = summarize(model, samples, seconds, agree, memory, args)
    print(render(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
