"""Plots of an evaluation or sweep run, as PNG bytes.

Each function takes the parsed rows of ``cells.csv`` (see :func:`personavec.report.read_cells`: ``layer`` is
an int or None for the unsteered condition, every other field a float or None) and returns PNG bytes, or
None when the metric it draws is empty everywhere. Figures are built on ``matplotlib.figure.Figure`` with
the Agg canvas directly, so nothing touches pyplot's global state or needs a display.

Layer L is the output of decoder block L (1-based); 0 is the embeddings.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

Cell = Mapping[str, "float | int | str | None"]  # text columns (control, measure) are never plotted

LAYER_NOTE = "layer L = output of decoder block L (0 = embeddings)"


def _num(cell: Cell, key: str) -> float | None:
    value = cell.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _layer(cell: Cell) -> int | None:
    value = cell.get("layer")
    return None if value is None else int(value)


def _layers(cells: Sequence[Cell]) -> list[int]:
    return sorted({layer for c in cells if (layer := _layer(c)) is not None})


def _coefs(cells: Sequence[Cell]) -> list[float]:
    return sorted({coef for c in cells if _layer(c) is not None and (coef := _num(c, "coef")) is not None})


def _has(cells: Sequence[Cell], metric: str) -> bool:
    return any(_num(c, metric) is not None for c in cells)


def _se_key(metric: str) -> str:
    return metric[: -len("_mean")] + "_se" if metric.endswith("_mean") else metric + "_se"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No Software/date metadata: the same run gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.1 + 0.8 * i / max(n - 1, 1)) for i in range(n)]


def _lines(ax: Axes, cells: Sequence[Cell], metric: str, *, se: bool = True) -> None:
    """One line per layer (coef on x), error bars where a standard error exists, unsteered as a band."""
    se_key = _se_key(metric)
    layers = _layers(cells)
    for layer, colour in zip(layers, _colours(len(layers)), strict=True):
        points = sorted(
            (coef, y, _num(c, se_key) if se else None)
            for c in cells
            if _layer(c) == layer and (coef := _num(c, "coef")) is not None and (y := _num(c, metric)) is not None
        )
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        ax.plot(xs, ys, marker="o", markersize=4, color=colour, label=f"L{layer}")
        bars = [p for p in points if p[2] is not None]
        if bars:
            ax.errorbar([p[0] for p in bars], [p[1] for p in bars], yerr=[p[2] or 0.0 for p in bars],
                        fmt="none", ecolor=colour, capsize=3, linewidth=1)
    for c in cells:
        if _layer(c) is None and (y := _num(c, metric)) is not None:
            ax.axhline(y, color="grey", linestyle="--", linewidth=1, label="unsteered")
            s = _num(c, se_key) if se else None
            if s is not None:
                ax.axhspan(y - s, y + s, color="grey", alpha=0.15, linewidth=0)
            break
    ax.set_xlabel("steering coefficient")
    ax.grid(True, alpha=0.3)


def metric_vs_coef(cells: Sequence[Cell], metric: str, ylabel: str, *,
                   threshold: float | None = None, chosen: tuple[int, float] | None = None) -> bytes | None:
    """Metric mean against coefficient, one line per layer, with standard-error bars where available.

    ``threshold`` draws a horizontal reference line (e.g. the coherence threshold of a sweep);
    ``chosen`` = (layer, coef) rings the selected condition. None when ``metric`` is empty in every cell.
    """
    if not _has(cells, metric):
        return None
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    _lines(ax, cells, metric)
    if threshold is not None:
        ax.axhline(threshold, color="crimson", linestyle=":", linewidth=1.2, label=f"threshold {threshold:g}")
    if chosen is not None:
        for c in cells:
            y = _num(c, metric)
            if _layer(c) == chosen[0] and _num(c, "coef") == chosen[1] and y is not None:
                ax.plot([chosen[1]], [y], marker="o", markersize=13, markerfacecolor="none",
                        markeredgecolor="crimson", markeredgewidth=1.8, linestyle="none", label="chosen")
                break
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs coefficient", fontsize=11)
    ax.legend(fontsize=8, title="layer", title_fontsize=8, loc="best")
    fig.supxlabel(LAYER_NOTE, x=0.99, ha="right", fontsize=7, color="grey")
    return _png(fig)


def heatmap(cells: Sequence[Cell], metric: str, *, label: str | None = None,
            chosen: tuple[int, float] | None = None) -> bytes | None:
    """Layer × coefficient heatmap of the metric's change relative to coefficient 0 at that layer.

    The baseline of a layer is its own coef-0 cell, else the unsteered cell; if some layer has neither, the
    raw values are drawn instead (and the colour bar says so). Cells are annotated; missing ones stay blank.
    None when ``metric`` is empty in every steered cell.
    """
    layers, coefs = _layers(cells), _coefs(cells)
    steered = [c for c in cells if _layer(c) is not None]
    if not layers or not coefs or not _has(steered, metric):
        return None
    name = label or metric
    value: dict[tuple[int, float], float] = {}
    for c in steered:
        coef, y = _num(c, "coef"), _num(c, metric)
        if coef is not None and y is not None:
            value[(_layer(c) or 0, coef)] = y
    unsteered = next((y for c in cells if _layer(c) is None and (y := _num(c, metric)) is not None), None)
    base: dict[int, float] = {}
    for layer in layers:
        b = value.get((layer, 0.0), unsteered)
        if b is not None:
            base[layer] = b
    delta = len(base) == len(layers)
    grid = [[math.nan] * len(coefs) for _ in layers]
    for i, layer in enumerate(layers):
        for j, coef in enumerate(coefs):
            if (layer, coef) in value:
                grid[i][j] = value[(layer, coef)] - (base[layer] if delta else 0.0)
    finite = [v for row in grid for v in row if not math.isnan(v)]
    fig = Figure(figsize=(max(4.8, 1.0 + 0.9 * len(coefs)), max(3.0, 1.2 + 0.45 * len(layers))), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    if delta:
        span = max((abs(v) for v in finite), default=1.0) or 1.0
        image = ax.imshow(grid, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -span, span), aspect="auto",
                          origin="lower")
        bar_label = f"Δ {name} vs coef 0"
    else:
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        bar_label = name
    fig.colorbar(image, ax=ax, label=bar_label)
    lo, hi = min(finite), max(finite)
    mid = (lo + hi) / 2
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if math.isnan(v):
                continue
            dark = abs(v) > 0.6 * (max(abs(lo), abs(hi)) or 1.0) if delta else v < mid
            ax.text(j, i, f"{v:+.1f}" if delta else f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    if chosen is not None and chosen[0] in layers and chosen[1] in coefs:
        i, j = layers.index(chosen[0]), coefs.index(chosen[1])
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.2))
    ax.set_xticks(range(len(coefs)), [f"{c:+g}" if c else "0" for c in coefs])
    ax.set_yticks(range(len(layers)), [f"L{layer}" for layer in layers])
    ax.set_xlabel("steering coefficient")
    ax.set_ylabel("layer (output of decoder block L)")
    ax.set_title(("Change in " if delta else "") + f"{name} by layer and coefficient", fontsize=11)
    return _png(fig)


def capability_vs_coef(cells: Sequence[Cell]) -> bytes | None:
    """Perplexity and quiz accuracy against coefficient (two panels), one line per layer.

    A panel whose metric was not measured says so; None when neither was measured.
    """
    panels = [("perplexity", "perplexity (lower is better)"), ("quiz_accuracy", "quiz accuracy")]
    if not any(_has(cells, metric) for metric, _ in panels):
        return None
    fig = Figure(figsize=(10.0, 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (metric, ylabel) in zip(axes, panels, strict=True):
        if _has(cells, metric):
            _lines(ax, cells, metric, se=False)
            ax.legend(fontsize=8, title="layer", title_fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs coefficient", fontsize=11)
    fig.supxlabel(LAYER_NOTE, x=0.99, ha="right", fontsize=7, color="grey")
    return _png(fig)
