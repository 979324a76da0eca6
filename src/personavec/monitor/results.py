"""A monitoring run's results from its points: Pearson r per measure and scope (per point, over level
means, within levels), the calibrations, the `meta["monitor"]` block, and the files written from them."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_path, write_json, write_text
from ..judges import Judge
from ..runs import settings_hash
from ..stats import centre, mean, pearson
from ..vectors import now_iso
from .calibration import Calibration, calibrate
from .settings import CONDITIONS

CSV_FIELDS = ["condition", "level", "question_idx", "prompt_tokens", "projection", "reference", "trait_score",
              "judge_free",
              "response_projection", "n_answers", "label", "question"]


#: {measure: {scope: r}}: measures reference, trait_score, judge_free; scopes overall and each condition run
Pearsons = dict[str, dict[str, float | None]]


@dataclass(frozen=True)
class Level:
    """The means over questions of one prompt (condition, level): a point of the paper's scatter plots."""

    condition: str
    level: int
    label: str
    n: int
    projection: float | None
    trait_score: float | None
    judge_free: float | None
    reference: float | None
    response_projection: float | None


@dataclass(frozen=True)
class MonitorSummary:
    """What a monitoring run found: results.json. `settings` is the run folder's identity, `monitor_meta` the
    block `store_calibration` writes into the vector, `engine` the engine that sampled the answers."""

    trait: str
    model_id: str
    fingerprint: str
    vector_digest: str
    layer: int
    judge: str
    judge_threshold: float
    settings: dict[str, Any]
    n_points: int
    measure: str  # the headline measure: reference, or the judge's name without authored references
    pearson: Pearsons  # over prompt × question points
    pearson_levels: Pearsons  # over level means
    pearson_within_levels: Pearsons  # both variables centred on their level's mean
    pearson_response_projection: float | None  # each answer's response-mean projection vs its score
    levels: list[Level]
    calibration: dict[str, Calibration]  # "prompt" (last prompt token) and "response" (response mean)
    layer_profile: dict[str, Any]  # a note and {measure: {scope: [r at layer 1..L]}}
    shots: dict[str, Any]  # how many many-shot examples, how many express the trait, their source
    monitor_meta: dict[str, Any]
    engine: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def levels(points: Sequence[dict[str, Any]]) -> list[Level]:
    """Per (condition, level) means: the points the paper's scatter plots average over questions."""
    out = []
    keys = list(dict.fromkeys((p["condition"], p["level"]) for p in points))
    for cond, level in keys:
        sub = [p for p in points if p["condition"] == cond and p["level"] == level]
        out.append(Level(condition=cond, level=level, label=sub[0]["label"], n=len(sub),
                         projection=mean([p["projection"] for p in sub]),
                         trait_score=mean([p["trait_score"] for p in sub]),
                         judge_free=mean([p["judge_free"] for p in sub]),
                         reference=mean([p.get("reference") for p in sub]),
                         response_projection=mean([p["response_projection"] for p in sub])))
    return out


def summarize(points: Sequence[dict[str, Any]], *, layer: int, judge: Judge, identity: dict[str, Any],
              shots: Sequence[dict[str, Any]], n_layers: int, engine: dict[str, Any]) -> MonitorSummary:
    measures = ("reference", "trait_score", "judge_free")
    lv = levels(points)
    r: Pearsons = {m: {} for m in measures}
    r_levels: Pearsons = {m: {} for m in measures}
    r_within: Pearsons = {m: {} for m in measures}
    for scope, sub in scopes(points).items():
        sub_levels = [x for x in lv if scope == "overall" or x.condition == scope]
        for m in measures:
            r[m][scope] = pearson([p["projection"] for p in sub], [p.get(m) for p in sub])
            r_levels[m][scope] = pearson([x.projection for x in sub_levels], [getattr(x, m) for x in sub_levels])
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
                    "threshold": prompt_cal.threshold, "response_threshold": response_cal.threshold,
                    "balanced_accuracy": prompt_cal.balanced_accuracy,
                    "heldout_balanced_accuracy": prompt_cal.heldout_balanced_accuracy,
                    "measure": measure, "r": r[headline]["overall"], "r_graded": r[headline].get("graded"),
                    "r_many_shot": r[headline].get("many_shot"), "r_judge": r["trait_score"]["overall"],
                    "r_judge_free": r["judge_free"]["overall"], "judge": judge.name,
                    "judge_threshold": judge.threshold, "n_answers": prompt_cal.n_answers,
                    "trait_sha256": identity["trait_sha256"], "run": settings_hash(identity), "created": now_iso()}
    return MonitorSummary(
        trait=identity["trait"], model_id=identity["model_id"], fingerprint=identity["fingerprint"],
        vector_digest=identity["vector_digest"], layer=layer, judge=judge.name, judge_threshold=judge.threshold,
        settings=identity, n_points=len(points), measure=measure, pearson=r, pearson_levels=r_levels,
        pearson_within_levels=r_within, pearson_response_projection=r_response,
        levels=lv, calibration={"prompt": prompt_cal, "response": response_cal},
        layer_profile={"note": "diagnostic only: the reading layer was fixed before the run", **profile},
        shots={"n": len(shots), "expressing": sum(1 for x in shots if x["score"] is not None and x["score"] >= judge.threshold),
               "source": "model answers to extraction questions under positive system prompts"},
        monitor_meta=monitor_meta, engine=engine)


def write_outputs(folder: Path, points: Sequence[dict[str, Any]], result: MonitorSummary) -> None:
    """results.json, results.csv (one row per prompt × question) and monitor.png, each written atomically."""
    from ..report.monitor_plot import scatter_png

    write_json(folder / "results.json", result.to_json())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for p in points:
        w.writerow({**{k: ("" if p.get(k) is None else (f"{p[k]:.6g}" if isinstance(p[k], float) else p[k]))
                       for k in CSV_FIELDS}, "n_answers": len(p["answers"])})
    write_text(folder / "results.csv", buf.getvalue())
    with atomic_path(folder / "monitor.png") as tmp:
        tmp.write_bytes(scatter_png(points, result))
