"""Issue 5 experiment: the behavioral vaccine on the embedded model and the evil trait.

  1. `data elicit`: normal / level1 / level2 finetuning sets from the model's own answers to the evil
     trait's extraction questions (never its evaluation questions), plus three normal+level2 mixtures;
  2. LoRA-finetune on each set; per finetune measure the finetuning shift (last-prompt-token activation on
     the evaluation questions, finetuned − base, projected on the unit evil vector at the vector's layer),
     the trait (judge-free measure: log p(positive reference) − log p(negative reference) per token, with
     references produced once by the base model; contrast judge: the BASE model's contrast score of the
     finetune's greedy answers — a fixed judge), and perplexity on the shipped neutral text;
  3. repeat the level2 finetune with preventative steering (+coef × v at the vector's layer, every token,
     training only) at several coefficients, with CAFT (direction ablated at every layer while training),
     and with the projection penalty at several weights; and steer the unsteered level2 finetune at
     inference (−coef × v on response positions).

    .venv/bin/python experiments/vaccine.py --out experiments/out/vaccine            # full grid
    .venv/bin/python experiments/vaccine.py --out /tmp/vq --quick                      # smoke test
    .venv/bin/python experiments/vaccine.py --out experiments/out/vaccine --report-only # table + plots again

One JSON row per condition is appended to OUT/results.jsonl as soon as it is measured (a rerun skips the
finished ones); table.csv, table.md, summary.json, scatter.png and mitigations.png are rebuilt from it.
Adapters and datasets go to --work (not committed)."""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import personavec as pv
from personavec.capability import perplexity
from personavec.chat import messages_for
from personavec.data import ElicitSettings, elicit, mix
from personavec.evaluate import EvalSettings, judge_free_measure, reference_answers
from personavec.io import append_jsonl, read_jsonl, write_json, write_text
from personavec.judges import JudgeItem
from personavec.judges.contrast import ContrastJudge
from personavec.stats import mean_se, pearson
from personavec.training import Interventions, TrainSettings, attach_adapter, train
from personavec.training.shift import eval_prompts, last_prompt_means, project
from personavec.traits import LoadedTrait

DEFAULT_VECTOR = Path(__file__).parent / "out" / "steering_response" / "evil.pv.safetensors"
MIXES = {"mix25": 0.25, "mix50": 0.5, "mix75": 0.75}  # share of level2 rows in a normal+level2 mixture
DATASETS = ("normal", "level2", "level1", *MIXES)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("experiments/out/vaccine"))
    p.add_argument("--work", type=Path, default=Path("/tmp/personavec-vaccine"))
    p.add_argument("--vector", type=Path, default=DEFAULT_VECTOR)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script end to end")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--rollouts", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=48)
    p.add_argument("--prevent-coefs", type=floats, default=floats("0.5,1,2,4,8"))
    p.add_argument("--penalties", type=floats, default=floats("0.01,0.1,1"))
    p.add_argument("--infer-coefs", type=floats, default=floats("1,2,4,8"))
    p.add_argument("--allow-model-mismatch", action="store_true")
    return p.parse_args()


def limited(loaded: LoadedTrait, n_extract: int | None, n_eval: int | None) -> LoadedTrait:
    t = loaded.trait.model_copy(update={"extraction_questions": loaded.trait.extraction_questions[:n_extract],
                                        "evaluation_questions": loaded.trait.evaluation_questions[:n_eval]})
    return LoadedTrait(trait=t, source=loaded.source, sha256=loaded.sha256)


class Bench:
    """Everything measured on one fixed base model: references, base activations, the judge."""

    def __init__(self, base: pv.Model, trait: LoadedTrait, vec: pv.PersonaVector, args: argparse.Namespace,
                 allow: bool) -> None:
        self.base, self.trait, self.vec, self.args, self.allow = base, trait, vec, args, allow
        self.questions = trait.trait.evaluation_questions
        self.refs = reference_answers(base, trait, EvalSettings(max_new_tokens=args.eval_tokens, n_reference=None),
                                      None)
        self.base_means = last_prompt_means(base, eval_prompts(base, trait))
        self.judge = ContrastJudge(base, trait.trait.pairs)

    def measure(self, m: pv.Model, steering: Any = None) -> dict[str, Any]:
        """Trait, perplexity and shift of `m` (a merged finetune or the base), optionally steered."""
        import contextlib

        with steering if steering is not None else contextlib.nullcontext():
            answers = pv.generate(m, [messages_for(q) for q in self.questions], max_new_tokens=self.args.eval_tokens)
            jf = mean_se([r["judge_free"] for r in judge_free_measure(m, self.refs)])
            ppl = perplexity(m)
        scores = self.judge.score_batch([JudgeItem(q, a) for q, a in zip(self.questions, answers, strict=True)],
                                        self.trait.trait.rubric)
        contrast = mean_se(scores)
        per_layer = project(last_prompt_means(m, eval_prompts(m, self.trait)), self.base_means, self.vec)
        return {"judge_free": jf[0], "judge_free_se": jf[1], "contrast": contrast[0], "contrast_se": contrast[1],
                "perplexity": ppl, "shift": per_layer[self.vec.layer], "shift_per_layer": per_layer,
                "answers": answers[:3]}


def settings(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(rank=32, alpha=64, rslora=True, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                         max_length=256, save_steps=25, seed=0, shift_questions=None)


def finetune(bench: Bench, name: str, data: Path, iv: Interventions, args: argparse.Namespace) -> dict[str, Any]:
    folder = args.work / "adapters" / name
    if folder.exists() and not (folder / "train_summary.json").exists():
        shutil.rmtree(folder)  # an interrupted finetune restarts (fast), rather than resuming mid-way
    t0 = time.time()
    if not folder.exists():
        train(copy.deepcopy(bench.base), data, folder, settings(args), iv, shift_vector=bench.vec,
              shift_trait=bench.trait.source, allow_mismatch=bench.allow)
    train_s = time.time() - t0
    summary = json.loads((folder / "train_summary.json").read_text())
    ft = attach_adapter(copy.deepcopy(bench.base), folder, merge=True, allow_mismatch=True)
    row = bench.measure(ft)
    row.update({"steps": summary["steps"], "final_loss": summary["losses"][-1]["loss"] if summary["losses"] else None,
                "train_seconds": round(train_s, 1), "rows": summary["dataset"]["kept"],
                "checkpoint_shifts": [(r["step"], r["shift"]) for r in read_jsonl(folder / "shift.jsonl")],
                "penalty_mean": summary.get("penalty_mean")})
    del ft
    return row


def run(args: argparse.Namespace) -> None:
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["name"] for r in read_jsonl(results)}
    t_start = time.time()
    base = pv.load_model(device=args.device, dtype="float32")
    vec = pv.load_vector(args.vector)
    allow = args.allow_model_mismatch or vec.meta.get("fingerprint") != base.fingerprint
    if vec.meta.get("fingerprint") != base.fingerprint:
        print(f"note: vector fingerprint {vec.meta.get('fingerprint')} != model {base.fingerprint}; "
              "applying it anyway (same shape)", flush=True)
    vec.check_model(base, allow_mismatch=allow)
    trait = pv.load_trait("evil")
    if args.quick:
        trait = limited(trait, 4, 3)
    info = {"device": str(base.device), "gpu": torch.cuda.get_device_name(0) if base.device.type == "cuda" else None,
            "python": platform.python_version(), "torch": torch.__version__, "argv": sys.argv,
            "vector": str(args.vector), "vector_digest": vec.digest(), "vector_layer": vec.layer,
            "vector_fingerprint": vec.meta.get("fingerprint"), "model_fingerprint": base.fingerprint,
            "settings": {k: str(v) for k, v in vars(args).items()}, "train_settings": settings(args).__dict__}
    write_json(out / "manifest.json", info)
    print(f"model {base.model_id} on {info['gpu'] or base.device}; vector layer {vec.layer}", flush=True)

    t0 = time.time()
    es = ElicitSettings(rollouts=1 if args.quick else args.rollouts, n_prompts=2 if args.quick else None,
                        max_new_tokens=16 if args.quick else args.answer_tokens, temperature=1.0, seed=0,
                        batch_size=128 if base.device.type == "cuda" else 32)
    sets = elicit(base, trait, work / "data", settings=es)
    for name, frac in MIXES.items():
        path = work / "data" / f"{name}.jsonl"
        if not path.exists():
            mix({sets["normal"]: 1 - frac, sets["level2"]: frac}, path, seed=1)
        sets[name] = path
    print(f"datasets: {', '.join(f'{k} {len(read_jsonl(v))}' for k, v in sets.items())} "
          f"({time.time() - t0:.0f} s)", flush=True)

    bench = Bench(base, trait, vec, args, allow)

    def record(name: str, kind: str, coef: float | None, fn: Any) -> None:
        if name in done:
            return
        t = time.time()
        try:
            row = {"name": name, "kind": kind, "coef": coef, **fn(), "seconds": round(time.time() - t, 1)}
        except Exception:  # keep measuring the other conditions; the traceback goes to the log
            traceback.print_exc()
            print(f"{name}: FAILED after {time.time() - t:.0f} s", flush=True)
            return
        append_jsonl(results, [row])
        done.add(name)
        print(f"{name:>16}: shift {row['shift']:+.3f}  judge-free {row['judge_free']:+.3f}  "
              f"contrast {row['contrast']:+.3f}  ppl {row['perplexity']:.2f}  ({row['seconds']:.0f} s; "
              f"{time.time() - t_start:.0f} s total)", flush=True)

    record("base", "base", None, lambda: {**bench.measure(base), "steps": 0})
    for name in DATASETS:
        record(name, "dataset", None, lambda name=name: finetune(bench, name, sets[name], Interventions(), args))
    for c in args.prevent_coefs:
        record(f"prevent{c:g}", "preventative", c, lambda c=c: finetune(
            bench, f"prevent{c:g}", sets["level2"], Interventions(preventative=vec, coef=c), args))
    record("caft", "caft", None, lambda: finetune(bench, "caft", sets["level2"], Interventions(ablate=vec), args))
    for w in args.penalties:
        record(f"penalty{w:g}", "penalty", w, lambda w=w: finetune(
            bench, f"penalty{w:g}", sets["level2"], Interventions(penalty=w, penalty_vector=vec), args))
    level2 = attach_adapter(copy.deepcopy(base), work / "adapters" / "level2", merge=True, allow_mismatch=True)
    for c in args.infer_coefs:
        record(f"infer{c:g}", "inference", c, lambda c=c: bench.measure(
            level2, vec.steer(level2, coef=-c, allow_mismatch=True)))
    print(f"all conditions measured in {time.time() - t_start:.0f} s", flush=True)


# ---- report -------------------------------------------------------------------------------------------

def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["name"]: r for r in rows}
    base = by.get("base")
    if base is None:
        return {}
    for r in rows:
        r["d_judge_free"] = r["judge_free"] - base["judge_free"]
        r["d_contrast"] = r["contrast"] - base["contrast"]
    ds = [r for r in rows if r["kind"] == "dataset"]
    s: dict[str, Any] = {"n_datasets": len(ds)}
    s["r_shift_judge_free"] = pearson([r["shift"] for r in ds], [r["d_judge_free"] for r in ds])
    s["r_shift_contrast"] = pearson([r["shift"] for r in ds], [r["d_contrast"] for r in ds])
    if "normal" in by and "level2" in by:
        n, l2 = by["normal"], by["level2"]
        s["level2_minus_normal"] = {"judge_free": l2["judge_free"] - n["judge_free"],
                                    "contrast": l2["contrast"] - n["contrast"]}
        inc = l2["d_judge_free"]
        ppl_cap = 1.05 * l2["perplexity"]
        mitig = []
        for r in rows:
            if r["kind"] in ("preventative", "caft", "penalty", "inference"):
                r["removed_share"] = None if inc == 0 else (l2["judge_free"] - r["judge_free"]) / inc
                r["removed_share_contrast"] = (None if l2["d_contrast"] == 0 else
                                               (l2["contrast"] - r["contrast"]) / l2["d_contrast"])
                r["ppl_vs_level2"] = r["perplexity"] / l2["perplexity"] - 1
                mitig.append(r)
        prev = [r for r in mitig if r["kind"] == "preventative" and r["perplexity"] <= ppl_cap]
        best = max(prev, key=lambda r: r["removed_share"] or -1e9, default=None)
        s["level2_increase_judge_free"] = inc
        s["best_preventative"] = None if best is None else {
            "coef": best["coef"], "removed_share": best["removed_share"],
            "removed_share_contrast": best["removed_share_contrast"], "ppl_vs_level2": best["ppl_vs_level2"]}
        s["mitigations"] = {r["name"]: {"removed_share": r["removed_share"], "ppl_vs_level2": r["ppl_vs_level2"],
                                        "removed_share_contrast": r["removed_share_contrast"]} for r in mitig}
    return s


COLUMNS = ["name", "kind", "coef", "shift", "judge_free", "d_judge_free", "contrast", "d_contrast", "perplexity",
           "removed_share", "removed_share_contrast", "ppl_vs_level2", "steps", "final_loss", "train_seconds"]


def fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report(out: Path) -> dict[str, Any]:
    rows = read_jsonl(out / "results.jsonl")
    s = summarize(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: fmt(r.get(k)) for k in COLUMNS})
    write_text(out / "table.csv", buf.getvalue())
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    write_text(out / "table.md", "\n".join(md) + "\n")
    write_json(out / "summary.json", s)
    if rows:
        plot(rows, s, out)
    return s


def plot(rows: list[dict[str, Any]], s: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = [r for r in rows if r["kind"] in ("dataset", "base")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, r_key, label in ((axes[0], "d_judge_free", "r_shift_judge_free", "judge-free measure change"),
                                  (axes[1], "d_contrast", "r_shift_contrast", "contrast-judge score change")):
        ax.scatter([r["shift"] for r in ds], [r.get(key, 0) for r in ds])
        for r in ds:
            ax.annotate(r["name"], (r["shift"], r.get(key, 0)), fontsize=8)
        r_val = s.get(r_key)
        ax.set_title(f"r = {r_val:.3f} (finetunes)" if r_val is not None else "r: n/a")
        ax.set_xlabel("finetuning shift along the evil vector")
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=120)
    plt.close(fig)

    by = {r["name"]: r for r in rows}
    kinds = [("preventative", "preventative steering coef"), ("penalty", "projection penalty weight"),
             ("inference", "inference-time steering (−coef)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for col, (kind, xlabel) in enumerate(kinds):
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["coef"])
        for row, key, ylabel in ((0, "judge_free", "judge-free trait measure"), (1, "perplexity", "neutral perplexity")):
            ax = axes[row][col]
            if pts:
                ax.plot([r["coef"] for r in pts], [r[key] for r in pts], "o-", label=kind)
            for ref, style in (("level2", "r--"), ("normal", "g--"), ("base", "k:"), ("caft", "m-.")):
                if ref in by:
                    ax.axhline(by[ref][key], linestyle=style[1:], color=style[0], label=ref)
            if kind == "penalty" and pts and min(r["coef"] for r in pts) > 0:
                ax.set_xscale("log")
            if key == "perplexity" and kind == "inference":
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("level-II finetune: mitigations (dashed: unmitigated level2, normal; dotted: base; dash-dot: CAFT)")
    fig.tight_layout()
    fig.savefig(out / "mitigations.png", dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse()
    if args.quick:
        args.prevent_coefs, args.penalties, args.infer_coefs = [2.0], [1.0], [2.0]
        args.epochs, args.batch_size, args.eval_tokens = 1.0, 4, 12
    if not args.report_only:
        run(args)
    s = report(args.out)
    print(json.dumps(s, indent=2, default=str))


if __name__ == "__main__":
    main()
