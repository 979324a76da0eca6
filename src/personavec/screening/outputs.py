"""The files a screen writes beside its scores: the table itself (CSV, or Parquet by suffix) and one ΔP
histogram per trait; each written atomically, so a reader never sees half a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_path
from .source import format_of

__all__ = ["histogram", "write_table"]


def write_table(path: Path, table: dict[str, Any]) -> None:
    import pyarrow as pa

    arrow = pa.table({k: pa.array(v, type=pa.string()) if k == "id" else pa.array(v) for k, v in table.items()})
    with atomic_path(path) as tmp:
        if format_of(path) == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(arrow, str(tmp))
        else:
            import pyarrow.csv as pacsv

            pacsv.write_csv(arrow, str(tmp))


def histogram(path: Path, trait: str, values: np.ndarray, threshold: float | None,
              reference: np.ndarray | None, fast: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    both = values if reference is None else np.concatenate([values, reference])
    bins = np.histogram_bin_edges(both, bins=min(60, max(10, int(np.sqrt(len(both)))))).tolist()
    ax.hist(values, bins=bins, alpha=0.7, label=f"dataset (n={len(values)})")
    if reference is not None:
        ax.hist(reference, bins=bins, alpha=0.5, label=f"reference (n={len(reference)})")
    ax.axvline(float(np.mean(values)), color="k", linestyle="--", label=f"mean {np.mean(values):.3g}")
    if threshold is not None:
        ax.axvline(threshold, color="r", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(f"{trait} ΔP ({'answer − last prompt token' if fast else 'answer − base answer'})")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
