"""A monitoring run's results from its points: Pearson r per measure and scope (per point, over level
means, within levels), the calibrations, the `meta["monitor"]` block, and the files written from them."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_path, write_json, write_text
from ..judges import Judge
from ..runs import settings_hash
from ..stats import centre, mean, pearson
from ..vectors import now_iso
from .calibration import calibrate
from .settings import CONDITIONS

CSV_FIELDS = ["condition", "level", "question_idx", "prompt_tokens", "projection", "reference", "trait_score",
              "judge_free",
              "response_projection", "n_answers", "label", "question"]


def within_levels(points: Sequence[dict[str, Any]], measure: str) -> float | None:
    """Pearson r after centring projection and measure on their (condition, level) means: what the
    projection says about a question beyond which prompt it was asked under."""
    pts = [p for p in points if p.get(measure) is not None and p.get("projection") is not None]
    level = [(p["condition"], p["level"]) for p in pts]
    return pearson(centre([p["projection"] for p in pts], level), centre([p[measure] for p in pts], level))


def scopes(points: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    scopes = {"overall": list(points)}
    for c in CONDITIONS:
        sub = [p for p in points if p["condition"] == c]
        if sub:
            scopes[c] = sub
    return scopes


def levels(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (condition, level) means: the points the paper's scatter plots average over questions."""
    out = []
    keys = list(dict.fromkeys((p["condition"], p["level"]) for p in points))
    for cond, level in keys:
        sub = [p for p in points if p["condition"] == cond and p["level"] == level]
        out.append({"condition": cond, "level": level, "label": sub[0]["label"], "n": len(sub),
                    "projection": mean([p["projection"] for p in sub]),
                    "trait_score": mean([p["trait_score"] for p in sub]),
                    "judge_free": mean([p["judge_free"] for p in sub]),
                    "reference": mean([p.get("reference") for p in sub]),
                    "response_projection": mean([p["response_projection"] for p in sub])})
    return out


def summarize(points: Sequence[dict[str, Any]], *, layer: int, judge: Judge, identity: dict[str, Any],
              shots: Sequence[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    measures = ("reference", "trait_score", "judge_free")
    lv = levels(points)
    r: dict[str, dict[str, float | None]] = {m: {} for m in measures}
    r_levels: dict[str, dict[str, float | None]] = {m: {} for m in measures}
    r_within: dict[str, dict[str, float | None]] = {m: {} for m in measures}
    for scope, sub in scopes(points).items():
        sub_levels = [x for x in lv if scope == "overall" or x["condition"] == scope]
        for m in measures:
            r[m][scope] = pearson([p["projection"] for p in sub], [p.get(m) for p in sub])
            r_levels[m][scope] = pearson([x["projection"] for x in sub_levels], [x[m] for x in sub_levels])
            r_within[m][scope] = within_levels(sub, m)
    headline = "reference" if any(p.get("reference") is not None for p in points) else "trait_score"
    measure = "reference" if headline == "reference" else judge.name
    r_response = pearson([v for p in points for v in p["response_projections"]],
                         [s for p in points for s in p["trait_scores"]])
    profile = {m: {scope: [pearson([p["profile"][ly - 1] for p in sub], [p.get(m) for p in sub])
                           for ly in range(1, n_layers + 1)] for scope, sub in scopes(points).items()}
               for m in measures}
    prompt_cal = calibrate(points, lambda p: [p["projection"]] * len(p["trait_scores"]), judge.threshold)
    response_cal = calibrate(points, lambda p: p["response_projections"], judge.threshold)
    monitor_meta = {"layer": layer, "position": "last_prompt", "vector_position": "response",
                    "threshold": prompt_cal["threshold"], "response_threshold": response_cal["threshold"],
                    "balanced_accuracy": prompt_cal["balanced_accuracy"],
                    "heldout_balanced_accuracy": prompt_cal["heldout_balanced_accuracy"],
                    "measure": measure, "r": r[headline]["overall"], "r_graded": r[headline].get("graded"),
                    "r_many_shot": r[headline].get("many_shot"), "r_judge": r["trait_score"]["overall"],
                    "r_judge_free": r["judge_free"]["overall"], "judge": judge.name,
                    "judge_threshold": judge.threshold, "n_answers": prompt_cal["n_answers"],
                    "trait_sha256": identity["trait_sha256"], "run": settings_hash(identity), "created": now_iso()}
    return {"trait": identity["trait"], "model_id": identity["model_id"], "fingerprint": identity["fingerprint"],
            "vector_digest": identity["vector_digest"], "layer": layer, "judge": judge.name,
            "judge_threshold": judge.threshold, "settings": identity, "n_points": len(points),
            "measure": measure, "pearson": r, "pearson_levels": r_levels, "pearson_within_levels": r_within,
            "pearson_response_projection": r_response,
            "levels": lv, "calibration": {"prompt": prompt_cal, "response": response_cal},
            "layer_profile": {"note": "diagnostic only: the reading layer was fixed before the run", **profile},
            "shots": {"n": len(shots), "expressing": sum(1 for x in shots if x["score"] is not None and x["score"] >= judge.threshold),
                      "source": "model answers to extraction questions under positive system prompts"},
            "monitor_meta": monitor_meta}


def write_outputs(folder: Path, points: Sequence[dict[str, Any]], result: dict[str, Any]) -> None:
    """results.json, results.csv (one row per prompt × question) and monitor.png, each written atomically."""
    from ..report.monitor_plot import scatter_png

    write_json(folder / "results.json", result)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for p in points:
        w.writerow({**{k: ("" if p.get(k) is None else (f"{p[k]:.6g}" if isinstance(p[k], float) else p[k]))
                       for k in CSV_FIELDS}, "n_answers": len(p["answers"])})
    write_text(folder / "results.csv", buf.getvalue())
    with atomic_path(folder / "monitor.png") as tmp:
        tmp.write_bytes(scatter_png(points, result))
