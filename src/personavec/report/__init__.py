"""Reports of evaluation and sweep run folders: plots (``personavec.report.plots``, needs matplotlib) and one
self-contained HTML page.

    from personavec.report import write_report
    path = write_report("runs/evil-sweep")      # -> runs/evil-sweep/report.html, written atomically

Layer L is the output of decoder block L (1-based); layer 0 is the embeddings.
"""

from __future__ import annotations

from .html import read_cells, render_report, write_report

__all__ = ["read_cells", "render_report", "write_report"]
