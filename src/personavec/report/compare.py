"""Trait-similarity heatmaps (``personavec vector compare``), as PNG bytes.

One panel per chosen layer, each an n × n grid of cosine similarities between trait vectors on a fixed −1..1
diverging scale, annotated. Layer L is the output of decoder block L (1-based); 0 is the embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from matplotlib.figure import Figure

from .plots import _png


def cosine_heatmap(names: Sequence[str], matrices: Mapping[int, torch.Tensor], *, title: str | None = None) -> bytes:
    """`matrices`: layer -> [n, n] cosine similarities in the order of `names`."""
    n, panels = len(names), len(matrices)
    side = max(3.2, 1.4 + 0.55 * n)
    fig = Figure(figsize=(side * panels + 1.0, side), dpi=100, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    image = None
    for ax, (layer, m) in zip(axes, matrices.items(), strict=True):
        grid = m.detach().float().cpu().numpy()
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(grid[i, j]) > 0.6 else "black")
        ax.set_xticks(range(n), list(names), rotation=45, ha="right")
        ax.set_yticks(range(n), list(names))
        ax.set_title(f"layer {layer} (output of block {layer})" if layer else "layer 0 (embeddings)", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="cosine similarity", shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _png(fig)
