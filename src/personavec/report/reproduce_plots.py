"""Plots of a `reproduce` run, as PNG bytes (matplotlib Figure + Agg canvas, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from .plots import _png


def rise_bars(labels: Sequence[str], means: Sequence[float], lows: Sequence[float | None],
              highs: Sequence[float | None], *, title: str, ylabel: str) -> bytes:
    """One bar per vector (the trait's own first, highlighted) with its 95% interval as an error bar."""
    fig = Figure(figsize=(max(4.4, 0.9 * len(labels) + 1.6), 3.4), layout="constrained")
    ax = fig.add_subplot()
    colours = ["#c0392b"] + ["#7f8c9a"] * (len(labels) - 1)
    xs = list(range(len(labels)))
    ax.bar(xs, means, color=colours)
    err_lo = [m - lo if lo is not None else 0.0 for m, lo in zip(means, lows, strict=True)]
    err_hi = [hi - m if hi is not None else 0.0 for m, hi in zip(means, highs, strict=True)]
    ax.errorbar(xs, means, yerr=[err_lo, err_hi], fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def delta_p_histogram(values: Sequence[float], marks: Sequence[float], *, title: str) -> bytes:
    """The ΔP distribution of screened samples, with the top-flagged ones' values marked under the axis."""
    fig = Figure(figsize=(4.6, 3.0), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(values, bins=40, color="#7f8c9a")
    ax.plot(marks, [0.0] * len(marks), "|", color="#c0392b", markersize=12, label="top-flagged")
    ax.set_xlabel("ΔP (fast mode)", fontsize=8)
    ax.set_ylabel("conversations", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def scatter_panels(panels: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[str]]], *, ylabel: str,
                   title: str) -> bytes:
    """Side-by-side scatters sharing the y axis, one colour per group (a finetuning set, say): each panel is
    (x label, xs, ys, group of each point)."""
    fig = Figure(figsize=(4.0 * len(panels) + 0.6, 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    groups = list(dict.fromkeys(g for _, _, _, gs in panels for g in gs))
    colours = {g: f"C{k % 10}" for k, g in enumerate(groups)}
    for ax, (xlabel, xs, ys, gs) in zip(axes, panels, strict=True):
        for g in groups:
            pts = [(x, y) for x, y, h in zip(xs, ys, gs, strict=True) if h == g]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colours[g], label=g, s=22)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel, fontsize=8)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def ordering(shares: Sequence[float], means: Sequence[float], lows: Sequence[float | None],
             highs: Sequence[float | None], *, title: str, xlabel: str, ylabel: str) -> bytes:
    """A mean per level (contamination share, say) with its 95% interval, joined in level order."""
    fig = Figure(figsize=(4.4, 3.0), layout="constrained")
    ax = fig.add_subplot()
    err_lo = [m - lo if lo is not None else 0.0 for m, lo in zip(means, lows, strict=True)]
    err_hi = [hi - m if hi is not None else 0.0 for m, hi in zip(means, highs, strict=True)]
    ax.errorbar(shares, means, yerr=[err_lo, err_hi], fmt="o-", color="#c0392b", ecolor="black", capsize=3)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return _png(fig)
