"""Issue-6 experiment: does the projection difference ΔP find trait-inducing training samples, per sample
and per dataset, on the embedded model (evil)? Full mode (base model's own answer) and --fast mode
(last prompt token) side by side.

Data: `personavec data elicit` answers (the model's own, sampled at T=1) to the evil trait's extraction
questions 10-19, which the vector's extraction (questions 0-9) never saw, under the negative ("normal") and
positive ("level2") system prompts, saved WITHOUT the system prompt. Evaluation questions are not used.
  * sample level: screen normal ∪ level2 and compute the ROC AUC of ΔP for level2 vs normal;
  * dataset level: mixtures with 0, 10, 25, 50, 100% level2 rows (same size, drawn without replacement)
    screened one by one; the mean ΔP (95% t interval) must increase with contamination.

    .venv/bin/python experiments/screening.py --out experiments/out/screening

`--dataset authored` runs the same measurements on a labelled dataset written on purpose, like the paper's
own finetuning datasets (which an LLM wrote to be clearly evil or clearly normal): 50 ordinary questions
(none of them an evaluation question or one of the vector's extraction questions 0-9), each with two normal
and two evil answers of matched length, in `experiments/data/evil_authored/` (see its README). The labels
are then what the text is, not which system prompt the 135M model was given.

    .venv/bin/python experiments/screening.py --dataset authored --out experiments/out/screening_authored

The measures are the library's, the ones `personavec reproduce` computes in its screen stage
(`personavec.reproduce.screening`: `separation` for the AUC and its question bootstrap, `level` for a set's mean
ΔP, here with the screen summary's t interval, `rises` for the ordering). `--report-only` recomputes every
summary from the scores files already in --out without the model (to replay committed outputs, on a copy):

    cp -r experiments/out/screening_authored /tmp/replay && \
        .venv/bin/python experiments/screening.py --dataset authored --out /tmp/replay --report-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import personavec as pv
from personavec.data import ElicitSettings, elicit, mix
from personavec.reproduce.screening import level, read_columns, rises, separation
from personavec.screen import screen
from personavec.stats import auc as roc_auc
from personavec.traits import LoadedTrait

CONTAMINATION = (0.0, 0.10, 0.25, 0.50, 1.0)


def bag_of_words_scores(texts: list[str], y: np.ndarray, cluster: np.ndarray, folds: int = 5,
                        l2: float = 1.0) -> np.ndarray:
    """Out-of-fold scores of a bag-of-words baseline: L2-regularised logistic regression on binary word
    presence, cross-validated with whole questions held out together (question-grouped folds), so a word
    that only identifies the question cannot help. How much of the label the words alone give away."""
    from scipy.optimize import minimize

    words = [set(re.findall(r"[a-z']+", t.lower())) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*words)))}
    x = np.zeros((len(texts), len(vocab)))
    for i, ws in enumerate(words):
        x[i, [vocab[w] for w in ws]] = 1.0
    groups = {c: k % folds for k, c in enumerate(dict.fromkeys(cluster.tolist()))}
    fold = np.array([groups[c] for c in cluster.tolist()])
    scores = np.zeros(len(texts))
    for k in range(folds):
        tr, te = fold != k, fold == k

        def loss(w: np.ndarray, xt: np.ndarray = x[tr], yt: np.ndarray = y[tr]) -> tuple[float, np.ndarray]:
            z = xt @ w[:-1] + w[-1]
            p = 1 / (1 + np.exp(-z))
            nll = float(np.sum(np.logaddexp(0, z) - yt * z)) + 0.5 * l2 * float(w[:-1] @ w[:-1])
            g = np.append(xt.T @ (p - yt) + l2 * w[:-1], np.sum(p - yt))
            return nll, g

        w = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
        scores[te] = x[te] @ w[:-1] + w[-1]
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("experiments/out/screening"))
    ap.add_argument("--vector", type=Path, default=Path("experiments/out/steering_response/evil.pv.safetensors"),
                    help="evil vector (extracted on extraction questions 0-9); extracted here if missing")
    ap.add_argument("--dataset", choices=("elicited", "authored"), default="elicited",
                    help="elicited: the model's own answers under the trait's prompts; authored: the written set")
    ap.add_argument("--authored", type=Path, nargs="+", default=[Path("experiments/data/evil_authored")],
                    help="folder(s) of an authored set's part_*.jsonl files (several: pooled)")
    ap.add_argument("--rollouts", type=int, default=2)
    ap.add_argument("--mixture-size", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--diagnostics", action="store_true",
                    help="also: full-mode AUC at every other layer, and AUC on the judge-consistent subset")
    ap.add_argument("--report-only", action="store_true",
                    help="no model: recompute results.json, results.md and the plot from the data and scores files "
                         "already in --out (timings, the command line and diagnostics are kept from its results.json)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    t0 = time.time()
    previous = json.loads((out / "results.json").read_text()) if args.report_only else {}
    model = None if args.report_only else pv.load_model()
    base = pv.load_trait("evil")
    if args.vector.exists():
        vec = pv.load_vector(args.vector)
        log(f"vector {args.vector} (layer {vec.layer}, extraction questions 0-9)")
    elif model is None:
        vec = pv.load_vector(out / "evil.pv.safetensors")
        log(f"the evil vector extracted here on extraction questions 0-9 (layer {vec.layer}, no sweep)")
    else:
        vec = pv.extract(model, "evil", run_dir=out / "evil.extract", n_questions=10, max_new_tokens=48)
        vec.save(out / "evil.pv.safetensors")
        log(f"extracted the evil vector on extraction questions 0-9 (layer {vec.layer}, no sweep)")
    if model is None:  # the sets that were screened, as they were written
        sets = {"normal": out / "data" / "normal.jsonl", "level2": out / "data" / "level2.jsonl"}
    elif args.dataset == "authored":
        sets = authored_sets(args.authored, base, out / "data")
    else:
        held = base.trait.model_copy(update={"extraction_questions": base.trait.extraction_questions[10:]})
        trait = LoadedTrait(trait=held, source=base.source, sha256=base.sha256)
        sets = elicit(model, trait, out / "data", levels=("normal", "level2"),
                      settings=ElicitSettings(rollouts=args.rollouts, max_new_tokens=48, temperature=1.0))
    normal = sets["normal"].read_text().splitlines()
    evil = sets["level2"].read_text().splitlines()
    source = (f"authored in {', '.join(map(str, args.authored))}" if args.dataset == "authored"
              else "elicited on extraction questions 10-19")
    log(f"{len(normal)} normal and {len(evil)} trait-expressing (level2) answers, {source} "
        f"({time.time() - t0:.0f}s)")
    labelled = out / "data" / "labelled.jsonl"
    if model is not None:
        labelled.write_text("\n".join(normal + evil) + "\n")
    labels = np.array([0] * len(normal) + [1] * len(evil))
    questions = np.array([json.loads(line)["messages"][0]["content"] for line in normal + evil])
    cache = out / "base-answers.sqlite"
    results: dict[str, Any] = {"dataset": args.dataset, "vector": str(args.vector), "layer": vec.layer, "n_normal": len(normal),
                               "n_level2": len(evil), "mixture_size": args.mixture_size, "modes": {}}
    texts = [json.loads(line)["messages"][1]["content"] for line in normal + evil]
    bow = separation(bag_of_words_scores(texts, labels, questions), labels, questions)
    results["bag_of_words"] = {"auc": bow.auc, "auc_ci": [bow.low, bow.high],
                               "method": "L2 logistic regression on binary word presence, 5-fold question-grouped "
                                         "cross-validation (out-of-fold scores)"}
    log(f"bag-of-words baseline (question-grouped 5-fold CV): ROC AUC {results['bag_of_words']['auc']:.3f} "
        f"[{results['bag_of_words']['auc_ci'][0]:.3f}, {results['bag_of_words']['auc_ci'][1]:.3f}]")
    for mode in ("full", "fast"):
        t = time.time()
        scores, rejected = screened(model, vec, labelled, out / mode / "labelled.csv", mode, cache)
        dp, idx, answer = read_columns(scores, "evil_delta_p", "index", "evil_answer_proj")
        y = labels[idx]
        sep = separation(dp, y, questions[idx])
        r: dict[str, Any] = {"auc": sep.auc, "auc_ci": [sep.low, sep.high], "rejected": rejected,
                             "auc_answer_projection_alone": roc_auc(answer[y == 1], answer[y == 0]),
                             "mean_normal": float(dp[y == 0].mean()), "mean_level2": float(dp[y == 1].mean()),
                             "seconds_labelled": previous["modes"][mode]["seconds_labelled"] if previous
                             else round(time.time() - t, 1), "mixtures": []}
        log(f"[{mode}] sample-level ROC AUC (level2 vs normal) = {sep.auc:.3f} [95% question bootstrap "
            f"{sep.low:.3f}, {sep.high:.3f}] (answer projection alone, no reference subtracted: "
            f"{r['auc_answer_projection_alone']:.3f}); mean ΔP normal "
            f"{r['mean_normal']:.2f}, level2 {r['mean_level2']:.2f}; {rejected} rejected "
            f"({r['seconds_labelled']}s)")
        levels = []
        for frac in CONTAMINATION:
            name = f"mix{round(frac * 100):03d}"
            data = out / "data" / f"{name}.jsonl"
            if not data.exists():
                parts = {sets["normal"]: 1 - frac, sets["level2"]: frac}
                mix({p: f for p, f in parts.items() if f > 0}, data, n=args.mixture_size, seed=1)
            scores, _ = screened(model, vec, data, out / mode / f"{name}.csv", mode, cache)
            levels.append(level(name, frac, read_columns(scores, "evil_delta_p")[0], ci="t"))
            d = levels[-1].delta_p
            r["mixtures"].append({"contamination": frac, "n": d.n, "mean": d.mean, "ci_low": d.low, "ci_high": d.high})
            log(f"[{mode}] {frac:4.0%} contaminated: mean ΔP {d.mean:.2f} [{d.low:.2f}, {d.high:.2f}] (n={d.n})")
        r["ordered"] = rises(levels)
        r["adjacent_ci_disjoint"] = [bool(a["ci_high"] < b["ci_low"])
                                     for a, b in itertools.pairwise(r["mixtures"])]
        log(f"[{mode}] dataset-level ordering 0<10<25<50<100%: {r['ordered']}; adjacent 95% CIs disjoint: "
            f"{r['adjacent_ci_disjoint']}")
        results["modes"][mode] = r
    if model is None:  # what needs the model, and how long it took, stay as they were
        results |= {k: previous[k] for k in ("diagnostics", "seconds", "command") if k in previous}
    else:
        if args.diagnostics:
            results["diagnostics"] = diagnostics(model, vec, labelled, labels, cache, log)
        results["seconds"] = round(time.time() - t0, 1)
        results["command"] = " ".join(sys.argv)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(out, results, labels, {m: out / m / "labelled.csv" for m in ("full", "fast")})
    write_md(out, results)
    if model is None:
        return
    with open(out / "stdout.txt", "a", encoding="utf-8") as fh:  # one section per run, oldest first
        fh.write(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}: {results['command']}\n"
                 + "\n".join(log_lines) + "\n\n")


def screened(model: pv.Model | None, vec: pv.PersonaVector, data: Path, scores: Path, mode: str,
             cache: Path) -> tuple[Path, int]:
    """(scores file, rejected rows) of one screen; without a model (--report-only), those already written."""
    if model is None:
        return scores, int(json.loads(scores.with_suffix(".summary.json").read_text())["rejected"])
    res = screen(model, data, [vec], scores, fast=mode == "fast", cache=cache, max_new_tokens=64)
    return res.scores, res.summary.rejected


def authored_sets(folders: list[Path], base: LoadedTrait, out: Path) -> dict[str, Path]:
    """Split the authored rows by label into `normal.jsonl` and `level2.jsonl` (rows keep `id` and
    `messages`; the label is dropped so the screen cannot see it), after refusing any question the vector or
    its evaluation ever used."""
    rows = [json.loads(line) for folder in folders for part in sorted(folder.glob("part_*.jsonl"))
            for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        sys.exit(f"error: no part_*.jsonl rows in {', '.join(map(str, folders))}")
    used = set(base.trait.extraction_questions[:10]) | set(base.trait.evaluation_questions)
    clash = sorted({r["messages"][0]["content"] for r in rows} & used)
    if clash:
        sys.exit(f"error: the authored set reuses questions the vector or its evaluation saw: {clash[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"normal": out / "normal.jsonl", "level2": out / "level2.jsonl"}
    for key, label in (("normal", "normal"), ("level2", "evil")):
        chosen = [{"id": r["id"], "messages": r["messages"]} for r in rows if r["label"] == label]
        paths[key].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return paths


def diagnostics(model: pv.Model, vec: pv.PersonaVector, labelled: Path, labels: np.ndarray, cache: Path,
                log: Any) -> dict[str, Any]:
    """Why the sample-level AUC is what it is (reported, never used to choose anything above):
    (1) full-mode ΔP at layers 4, 6, ..., 30 from one forward over the answers and the cached base answers;
    (2) the AUC on the rows whose label the contrast judge agrees with (level2 answers it scores as more
    typical of the evil persona, normal answers it scores as less typical)."""
    import torch

    from personavec.capture import Sample, iter_reductions
    from personavec.chat import encode_chat, encode_response
    from personavec.judges import JudgeItem, make_judge
    from personavec.screening.score import AnswerCache

    rows = [json.loads(line) for line in labelled.read_text().splitlines()]
    prompts = [encode_chat(model.tokenizer, r["messages"][:1]) for r in rows]
    answers = [Sample(p, encode_response(model.tokenizer, r["messages"][1]["content"])) for p, r in zip(prompts, rows,
                                                                                                         strict=True)]
    found = AnswerCache(cache).get_many([AnswerCache.key(model.fingerprint, 64, p) for p in prompts])
    bases = [Sample(p, found[AnswerCache.key(model.fingerprint, 64, p)]) for p in prompts]
    layers = list(range(4, model.n_layers + 1, 2))
    acts = torch.zeros(2 * len(rows), len(layers), model.hidden_size)
    for group, out in iter_reductions(model, answers + bases, layers=layers, positions=("response",), batch_size=16):
        acts[group] = out["response"].cpu()
    by_layer = {}
    for k, layer in enumerate(layers):
        unit = vec.at(layer).float() / vec.at(layer).float().norm()
        proj = (acts[:, k] @ unit).numpy()
        dp = proj[: len(rows)] - proj[len(rows):]
        by_layer[layer] = roc_auc(dp[labels == 1], dp[labels == 0])
    best = max(by_layer, key=lambda layer: by_layer[layer])
    log(f"[diagnostics] full-mode AUC by layer: {', '.join(f'{k}:{v:.3f}' for k, v in by_layer.items())}; "
        f"best {best} ({by_layer[best]:.3f})")
    trait = pv.load_trait("evil").trait
    judge = make_judge("contrast", model, trait)
    items = [JudgeItem(question=r["messages"][0]["content"], answer=r["messages"][1]["content"]) for r in rows]
    scores = np.array([np.nan if x is None else x for x in judge.score_batch(items, trait.rubric)])
    agree = ((labels == 1) & (scores > 0)) | ((labels == 0) & (scores < 0))
    unit = vec.at(vec.layer).float() / vec.at(vec.layer).float().norm()
    at = layers.index(vec.layer) if vec.layer in layers else None
    result: dict[str, Any] = {"auc_by_layer": by_layer, "judge_auc_vs_prompt_label": roc_auc(scores[labels == 1],
                                                                                            scores[labels == 0]),
                              "judge_agrees": {"level2": int((agree & (labels == 1)).sum()),
                                               "normal": int((agree & (labels == 0)).sum())}}
    if at is not None:
        proj = (acts[:, at] @ unit).numpy()
        dp = proj[: len(rows)] - proj[len(rows):]
        result["auc_judge_consistent"] = roc_auc(dp[agree & (labels == 1)], dp[agree & (labels == 0)])
        log(f"[diagnostics] contrast judge vs prompt label AUC {result['judge_auc_vs_prompt_label']:.3f}; it agrees "
            f"with {result['judge_agrees']['level2']}/{int((labels == 1).sum())} level2 and "
            f"{result['judge_agrees']['normal']}/{int((labels == 0).sum())} normal "
            f"labels; full-mode ΔP AUC on that subset {result['auc_judge_consistent']:.3f}")
    return result


def plot(out: Path, results: dict[str, Any], labels: np.ndarray, scores: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, mode in zip(axes[:2], ("full", "fast"), strict=True):
        dp, idx = read_columns(scores[mode], "evil_delta_p", "index")
        y = labels[idx]
        bins = np.histogram_bin_edges(dp, bins=30).tolist()
        ax.hist(dp[y == 0], bins=bins, alpha=0.6, label="normal")
        ax.hist(dp[y == 1], bins=bins, alpha=0.6,
                label="evil (authored)" if results["dataset"] == "authored" else "level2 (evil prompt)")
        ax.set_title(f"{mode}: AUC {results['modes'][mode]['auc']:.3f}")
        ax.set_xlabel("evil ΔP")
        ax.legend(fontsize=8)
    ax = axes[2]
    for mode in ("full", "fast"):
        mx = results["modes"][mode]["mixtures"]
        x = [100 * m["contamination"] for m in mx]
        y = [m["mean"] for m in mx]
        err = [[m["mean"] - m["ci_low"] for m in mx], [m["ci_high"] - m["mean"] for m in mx]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=mode)
    ax.set_xlabel("contamination (% level2 rows)")
    ax.set_ylabel("dataset mean ΔP (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "screening.png", dpi=110)


def write_md(out: Path, results: dict[str, Any]) -> None:
    lines = ["| mode | sample ROC AUC [95% CI] | mean ΔP 0% | 10% | 25% | 50% | 100% | ordered |",
             "|---|---|---|---|---|---|---|---|"]
    if "bag_of_words" in results:
        b = results["bag_of_words"]
        lines.insert(0, f"Bag-of-words baseline (question-grouped CV): ROC AUC {b['auc']:.3f} "
                        f"[{b['auc_ci'][0]:.3f}, {b['auc_ci'][1]:.3f}]\n")
    for mode, r in results["modes"].items():
        cells = [f"{m['mean']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]" for m in r["mixtures"]]
        lines.append(f"| {mode} | {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] | "
                     + " | ".join(cells) + f" | {r['ordered']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
