"""Scatter plot of a monitoring run: last-prompt-token projection (x) against the trait measures (y), one
colour per prompt level, graded system prompts as circles and many-shot prompts as squares, Pearson r in
each panel's title. Built on matplotlib's Figure + Agg canvas (no pyplot state, no display)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from .plots import _colours, _png

if TYPE_CHECKING:
    from ..monitor import MonitorSummary

PANELS = (("reference", "reference: log p(authored trait ans.) − log p(authored non-trait ans.)"),
          ("trait_score", "trait score of sampled answers ({judge})"),
          ("judge_free", "judge-free (prompted): log p(pos. ref.) − log p(neg. ref.)"))
MARKERS = {"graded": "o", "many_shot": "s"}


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))


def _fmt(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}"


def scatter_png(points: Sequence[dict[str, Any]], result: MonitorSummary) -> bytes:
    panels = [(m, label) for m, label in PANELS if any(_finite(p.get(m)) for p in points)]
    fig = Figure(figsize=(5.2 * max(len(panels), 1), 4.4))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (metric, label) in zip(axes, panels, strict=False):
        for cond, marker in MARKERS.items():
            sub = [p for p in points if p["condition"] == cond]
            lv = sorted({p["level"] for p in sub})
            for level, colour in zip(lv, _colours(len(lv)), strict=True):
                pts = [p for p in sub if p["level"] == level and _finite(p.get(metric)) and _finite(p["projection"])]
                name = f"graded {level}" if cond == "graded" else f"{level}-shot"
                ax.scatter([p["projection"] for p in pts], [p[metric] for p in pts], c=[colour], marker=marker,
                           s=22, alpha=0.8, edgecolors="none" if marker == "o" else "k", linewidths=0.4, label=name)
        r = result.pearson.get(metric, {})
        ax.set_title(f"r = {_fmt(r.get('overall'))} (graded {_fmt(r.get('graded'))}, "
                     f"many-shot {_fmt(r.get('many_shot'))})", fontsize=9)
        ax.set_xlabel(f"last-prompt-token projection, layer {result.layer}")
        ax.set_ylabel(label.format(judge=result.judge), fontsize=8)
        thr = result.calibration["prompt"].threshold if metric == "trait_score" else None
        if thr is not None:
            ax.axvline(thr, color="grey", linestyle="--", linewidth=0.8)
    if panels:
        axes[0].legend(fontsize=6, ncol=2, loc="best")
    fig.suptitle(f"{result.trait} on {result.model_id} (points: prompt × question)", fontsize=10)
    fig.tight_layout()
    return _png(fig)
