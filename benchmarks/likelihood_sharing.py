"""Scoring responses prompt-once vs one whole forward per sample, on the embedded model, in one process.

    python benchmarks/likelihood_sharing.py [--threads 2] [--json out.json]

`likelihood.response_logprobs` scores samples that share a prompt prompt-once (one forward over each distinct
prompt with the KV cache, then their responses on that cache). The three workloads that share prompts:

  quiz       the shipped quiz, cloze: each choice's text scored as the reply to its question
             (`quiz_accuracy`, 4 choices per prompt);
  reference  evil's reference measure on every evaluation question (`reference_measure`: each question's
             authored with-trait and without-trait answers under one prompt);
  contrast   the contrast judge on 5 questions × 10 answers (greedy answers under each system prompt of evil's
             first five prompt pairs, 32 tokens), each scored under 2 pairs × 2 system prompts: extraction's
             filter (`ContrastJudge.score_batch`).

Each is timed both ways (`share_prompts=False`: the cache-free forward per sample that was the only path
before), alternately, median of 3 runs after a warm-up, with the same batch sizes the library uses. Printed:
seconds per way, the ratio, and the largest |difference| of any score between the ways (float32)."""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import personavec as pv
import personavec.likelihood as likelihood
from personavec.capability import quiz_items
from personavec.capture import Sample
from personavec.chat import encode_chat, encode_response
from personavec.judges.base import JudgeItem
from personavec.judges.contrast import ContrastJudge
from personavec.reference import reference_measure


def switched(share: bool) -> Callable[..., Any]:
    """`response_logprobs` with `share_prompts` forced, installed where the workloads look it up."""
    original = likelihood.response_logprobs

    def forced(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "share_prompts": share})

    return forced


def workloads(model: pv.Model) -> dict[str, Callable[[], list[float]]]:
    trait = pv.load_trait("evil").trait
    items = quiz_items()
    pairs = trait.pairs[:5]
    questions = trait.extraction_questions[:5]
    systems = [getattr(p, side) for p in pairs for side in ("positive", "negative")]
    conversations = [[{"role": "system", "content": s}, {"role": "user", "content": q}] for q in questions
                     for s in systems]
    answers = pv.generate(model, conversations, max_new_tokens=32)
    judged = [JudgeItem(c[1]["content"], a) for c, a in zip(conversations, answers, strict=True)]
    judge = ContrastJudge(model, trait.pairs)

    def quiz() -> list[float]:  # what `quiz_accuracy` scores: each choice as the reply to its question
        samples = [Sample(encode_chat(model.tokenizer, [{"role": "user", "content": str(item["question"])}]),
                          encode_response(model.tokenizer, c)) for item in items for c in item["choices"]]
        scored = importlib.import_module("personavec.capability").response_logprobs(model, samples, batch_size=8)
        return [float(x) for x in scored if x is not None]

    def reference() -> list[float]:
        return reference_measure(model, trait).gaps

    def contrast() -> list[float]:
        return [float(x) for x in judge.score_batch(judged, "") if x is not None]

    return {"quiz": quiz, "reference": reference, "contrast": contrast}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workloads", default="quiz,reference,contrast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = pv.load_model(dtype=torch.float32)
    print(f"model {model.model_id}, float32, {args.threads} threads, median of {args.runs} runs after a warm-up")
    modules = [importlib.import_module(f"personavec.{m}") for m in ("capability", "reference", "judges.contrast")]
    rows = []
    for name, fn in workloads(model).items():
        if name not in args.workloads.split(","):
            continue
        times: dict[bool, list[float]] = {False: [], True: []}
        values: dict[bool, list[float]] = {}
        for run in range(args.runs + 1):
            for share in (False, True):
                for mod in modules:
                    mod.response_logprobs = switched(share)  # type: ignore[attr-defined]
                t0 = time.perf_counter()
                values[share] = fn()
                if run:
                    times[share].append(time.perf_counter() - t0)
        whole, shared = statistics.median(times[False]), statistics.median(times[True])
        diff = max(abs(a - b) for a, b in zip(values[False], values[True], strict=True))
        rows.append({"workload": name, "whole_s": round(whole, 2), "shared_s": round(shared, 2),
                     "ratio": round(whole / shared, 2), "max_abs_diff": diff, "n_values": len(values[True])})
        print(f"{name:10s} whole forwards {whole:6.2f}s   prompt-once {shared:6.2f}s   {whole / shared:4.2f}×   "
              f"max |difference| {diff:.2e} over {len(values[True])} values", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
