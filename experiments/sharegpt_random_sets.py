"""Issue 13 (d), the selection control: the top 500 of the same ShareGPT pool ranked by ΔP on a *random*
direction, one per trait (`controls.random_like` of the trait's vector, seed 100 + trait index: the trait's
norm at every layer, read at the trait's own layer, so only the direction differs).

Finetuning on these sets (set name `rdtop`) and comparing with the random 500 says how much of the screened
top − random any projection-ranked selection would give: a trait's top 500 earn their name only if they leave
more of the trait than the random direction's top 500 do. Same pool, same `--fast` screen settings and the
same ≥ 16-token reply filter as `sharegpt_screen.py`.

    .venv/bin/python experiments/sharegpt_random_sets.py --work /tmp/personavec-sharegpt-sets
    .venv/bin/python experiments/finetune_authored.py --data /tmp/personavec-sharegpt-sets \\
        --out experiments/out/finetune_sharegpt --work /tmp/personavec-finetune-sharegpt --epochs 1 \\
        --max-length 128 --traits evil,sycophantic,hallucinating --sets rdtop --seeds 0,1,2 --cross
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
from sharegpt_screen import GROUP, MIN_ANSWER_TOKENS, TRAITS, VECTORS, select
from sharegpt_sets import selection_args, write_set

import personavec as pv
from personavec.controls import random_like
from personavec.io import write_json
from personavec.screen import screen

OUT = Path("experiments/out/sharegpt_screen")
SEED0 = 100


def main() -> None:
    args = selection_args(__doc__).parse_args()
    t0 = time.time()
    _, short = select(args.import_dir, args.n, args.max_chars)
    by_id = {r["id"]: r for r in short}
    model = pv.load_model()
    randoms = {}
    for k, trait in enumerate(TRAITS):
        vec = pv.load_vector(VECTORS / f"{trait}.pv.safetensors")
        rnd = random_like(vec, seed=SEED0 + k)
        rnd.meta["best_layer"] = vec.layer  # read at the trait's layer: only the direction differs
        randoms[f"random_{trait}"] = rnd
    res = screen(model, args.import_dir / "data.jsonl", randoms, OUT / "random_scores.csv", fast=True,
                 histograms=False, progress=lambda task, done, total: None)
    table = pacsv.read_csv(res.scores).to_pydict()
    ids = table["id"]
    long_enough = np.array(table["answer_tokens"]) >= MIN_ANSWER_TOKENS
    groups, summary = {}, {"n_screened": len(ids), "n_long_enough": int(long_enough.sum()), "seed0": SEED0,
                           "seconds": round(time.time() - t0), "traits": {}}
    for trait in TRAITS:
        dp = np.where(long_enough, np.array(table[f"random_{trait}_delta_p"], dtype=float), -np.inf)
        top = [ids[i] for i in np.argsort(-dp)[:GROUP]]
        own = json.loads((OUT / f"{trait}_groups.json").read_text(encoding="utf-8"))
        groups[trait] = top
        summary["traits"][trait] = {
            "layer": randoms[f"random_{trait}"].layer,
            "overlap_with_trait_top": len(set(top) & set(own["top"])),
            "overlap_with_trait_random": len(set(top) & set(own["random"])),
            "median_reply_tokens": float(np.median([table["answer_tokens"][ids.index(i)] for i in top]))}
        write_set(args.work / trait / "rdtop.jsonl", [by_id[i] for i in top])
        print(f"{trait}: random direction's top {GROUP} written; {summary['traits'][trait]}", flush=True)
    write_json(OUT / "random_direction_groups.json", groups)
    write_json(OUT / "random_direction_summary.json", summary)


if __name__ == "__main__":
    main()
