"""One self-contained HTML page for an evaluation or sweep run folder.

The page loads nothing from anywhere: styles are inline and plots are embedded as base64 PNG data URIs,
so it can be mailed, archived or opened offline. Optional inputs (``manifest.json``, ``answers.jsonl``,
``choice.json``) that are absent simply drop their sections; ``cells.csv`` is required.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from ..errors import PersonavecError, RunError
from ..io import read_jsonl, write_text

LAYER_CONVENTION = "Layer L is the output of decoder block L (1-based); layer 0 is the embeddings."

CELL_COLUMNS = ["control", "measure", "layer", "coef", "n", "trait_mean", "trait_se", "coherence_mean", "coherence_se",
                "judge_free_mean", "judge_free_se", "perplexity", "quiz_accuracy"]

EXAMPLE_QUESTIONS = 2
EXAMPLE_ROLLOUTS = 3

Row = dict[str, "float | int | str | None"]
TEXT_COLUMNS = ("control", "measure", "cell")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#fff;
  max-width:1100px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;padding-bottom:4px;
  border-bottom:1px solid #e3e6ec}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5a6272;margin:0 0 6px}.note{color:#5a6272;font-size:12.5px}
.choice{background:#f3f7ff;border:1px solid #c9d8f5;border-radius:6px;padding:10px 14px}
.choice b{font-size:16px}
figure{margin:14px 0;display:inline-block;vertical-align:top}figure img{max-width:100%;height:auto;
  border:1px solid #eceef2;border-radius:4px}figcaption{color:#5a6272;font-size:12.5px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{padding:3px 9px;border-bottom:1px solid #eceef2;
  text-align:right}th{background:#f6f7f9;position:sticky;top:0}td.l,th.l{text-align:left}
tr.chosen td{background:#fff6d6;font-weight:600}
details{margin:6px 0;border:1px solid #eceef2;border-radius:6px;padding:4px 10px}
summary{cursor:pointer;font-weight:600}
.q{margin:10px 0 2px;font-weight:600}.a{white-space:pre-wrap;background:#f8f9fb;border-left:3px solid #c9cfda;
  padding:6px 10px;margin:4px 0;font-size:13px}.s{color:#5a6272;font-size:12px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f3f4f6;padding:1px 4px;border-radius:3px}
"""


def read_cells(path: str | os.PathLike[str]) -> tuple[list[str], list[Row]]:
    """Parse ``cells.csv``: (header, rows). ``layer`` becomes an int or None, every other field a float or
    None (empty). A malformed file is a :class:`RunError`."""
    p = Path(path)
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        missing = [k for k in ("layer", "coef") if k not in header]
        if missing:
            raise RunError(f"{p} lacks the column(s) {', '.join(missing)}; rerun personavec sweep or eval")
        rows: list[Row] = []
        for lineno, raw in enumerate(reader, start=2):
            row: Row = {}
            for key in header:
                text = (raw.get(key) or "").strip()
                try:
                    if not text:
                        row[key] = None
                    elif key in TEXT_COLUMNS:
                        row[key] = text
                    elif key == "layer":
                        row[key] = int(float(text))
                    else:
                        row[key] = float(text)
                except ValueError:
                    raise RunError(f"{p} line {lineno}: {key}={text!r} is not a number") from None
            rows.append(row)
    return header, rows


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise RunError(f"{path} is not valid JSON; rerun the command that wrote it") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} should hold a JSON object")
    return data


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _coef(value: float) -> str:
    return f"{value:+g}" if value else "0"


def _fmt_cell(key: str, value: float | int | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if key in ("layer", "n"):
        return str(int(value))
    if key == "coef":
        return _coef(value)
    if key == "quiz_accuracy":
        return f"{value:.3f}"
    return f"{value:.2f}"


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _cond_name(layer: int | None, coef: float | None) -> str:
    if layer is None:
        return "unsteered" + ("" if coef in (None, 0.0) else f" (coef {coef:+g})")
    return f"layer {layer}, coef {_coef(coef)}" if coef is not None else f"layer {layer}"


def _json_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _kv_table(data: Mapping[str, Any]) -> str:
    rows = "".join(f'<tr><td class="l"><code>{escape(str(k))}</code></td>'
                   f'<td class="l">{escape(_json_value(v))}</td></tr>' for k, v in sorted(data.items()))
    return f"<table>{rows}</table>"


def _run_date(folder: Path, manifest: Mapping[str, Any] | None) -> str:
    for key in ("created", "created_at", "date", "started"):
        if manifest and isinstance(manifest.get(key), str):
            return str(manifest[key])
    source = folder / "manifest.json" if (folder / "manifest.json").exists() else folder / "cells.csv"
    return datetime.fromtimestamp(source.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _rise(rows: Sequence[Row], layer: Any) -> tuple[float, float, float] | None:
    """(lowest coef, highest coef, trait measure there minus at the lowest) at one layer, or None."""
    at = {r["coef"]: r.get("trait_mean") for r in rows if r.get("layer") == layer and r.get("trait_mean") is not None}
    if len(at) < 2:
        return None
    lo, hi = min(at), max(at)  # type: ignore[type-var]
    return float(lo), float(hi), float(at[hi]) - float(at[lo])  # type: ignore[arg-type]


def _controls_section(own: Sequence[Row], controls: Sequence[Row], measure: str) -> str:
    """The trait's own rise beside each control's, per layer: what makes the vector a trait direction."""
    if not controls:
        return ""
    names = list(dict.fromkeys(str(r["control"]) for r in controls))
    layers = sorted({int(v) for r in own if isinstance(v := r.get("layer"), int | float) and r.get("coef")})
    head = "<th>layer</th><th>coefficients</th><th>vector</th>" + "".join(f"<th>{escape(n)}</th>" for n in names)
    body = []
    for layer in layers:
        mine = _rise([r for r in own if r.get("coef") != 0], layer)
        if mine is None:
            continue
        cells = []
        for n in names:
            theirs = _rise([r for r in controls if r.get("control") == n], layer)
            cells.append("–" if theirs is None else f"{theirs[2]:+.3f}")
        body.append(f"<tr><td>{layer}</td><td>{_coef(mine[0])} → {_coef(mine[1])}</td><td><b>{mine[2]:+.3f}</b></td>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<h2>Controls</h2><p class="note">Rise of the trait measure (' + escape(measure) + ") from the lowest to "
            "the highest coefficient at each layer, for the trait's vector and for each control direction at the "
            "vector's per-layer norm (a seeded random direction; other traits' vectors). A trait direction should "
            "rise clearly more than every control.</p>"
            f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _plots_section(rows: Sequence[Row], choice: Mapping[str, Any] | None, measure: str = "trait score") -> str:
    try:
        from . import plots
    except ImportError as exc:  # matplotlib is an optional extra
        raise PersonavecError(f"the report needs matplotlib ({exc}); install it with "
                              "pip install 'personavec[plots]'") from None
    chosen: tuple[int, float] | None = None
    threshold: float | None = None
    if choice:
        layer, coef = _num(choice.get("best_layer")), _num(choice.get("best_coef"))
        if layer is not None and coef is not None:
            chosen = (int(layer), coef)
        threshold = _num(choice.get("coherence_threshold"))
    figures: list[str] = []
    specs = [
        ("trait_mean", measure, None,
         f"Trait measure ({measure}; mean ± standard error) against the steering coefficient."),
        ("coherence_mean", "coherence", threshold,
         "Coherence (mean ± standard error) against the coefficient"
         + (f"; the dotted line is the coherence threshold {threshold:g}." if threshold is not None else ".")),
        ("judge_free_mean", "judge-free (prompted)", None,
         "Prompted judge-free measure (answers the model wrote under the trait's own prompts; mean ± standard "
         "error) against the coefficient."),
    ]
    for metric, ylabel, thr, caption in specs:
        png = plots.metric_vs_coef(rows, metric, ylabel, threshold=thr, chosen=chosen)
        if png is not None:
            figures.append(_img(png, f"{ylabel} vs coefficient", caption))
    for metric, label in (("trait_mean", measure), ("coherence_mean", "coherence")):
        png = plots.heatmap(rows, metric, label=label, chosen=chosen)
        if png is not None:
            figures.append(_img(png, f"{label} heatmap",
                                f"{label.capitalize()} by layer × coefficient: change relative to coefficient 0 "
                                "at the same layer (raw values when there is no coefficient 0)."
                                + (" The outlined cell is the chosen condition." if chosen else "")))
    png = plots.capability_vs_coef(rows)
    if png is not None:
        figures.append(_img(png, "capability vs coefficient",
                            "Capability: perplexity and quiz accuracy against the coefficient."))
    if not figures:
        return ""
    return (f'<h2>Plots</h2><p class="note">{escape(LAYER_CONVENTION)} The grey dashed line is the unsteered '
            "condition where one was run.</p>" + "".join(figures))


def _cells_section(header: Sequence[str], rows: Sequence[Row], chosen: tuple[int, float] | None) -> str:
    columns = [c for c in CELL_COLUMNS if c in header] + [c for c in header if c not in CELL_COLUMNS]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        layer, coef = row.get("layer"), row.get("coef")
        is_chosen = chosen is not None and layer == chosen[0] and coef == chosen[1]
        cls = ' class="chosen"' if is_chosen else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(_fmt_cell(c, row.get(c)))}</td>" for c in columns)
                    + "</tr>")
    if not body:
        body.append(f'<tr><td class="l" colspan="{len(columns)}">no cells yet</td></tr>')
    return (f'<h2>Cells</h2><p class="note">One row per condition; empty layer = unsteered. '
            f"{escape(LAYER_CONVENTION)}" + (" The chosen condition is highlighted." if chosen else "")
            + f'</p><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _examples_section(answers: Sequence[Mapping[str, Any]], chosen: tuple[int, float] | None) -> str:
    if not answers:
        return ""

    def layer_of(a: Mapping[str, Any]) -> int | None:
        v = _num(a.get("layer"))
        return None if v is None else int(v)

    def coef_of(a: Mapping[str, Any]) -> float:
        return _num(a.get("coef")) or 0.0

    layers = sorted({layer for a in answers if (layer := layer_of(a)) is not None})
    shown = [chosen[0]] if chosen is not None and chosen[0] in layers else layers
    groups: list[tuple[int | None, float]] = []
    if any(layer_of(a) is None for a in answers):
        groups += sorted({(None, coef_of(a)) for a in answers if layer_of(a) is None}, key=lambda g: g[1])
    for layer in shown:
        groups += [(layer, coef) for coef in sorted({coef_of(a) for a in answers if layer_of(a) == layer})]
    parts = []
    for layer, coef in groups:
        rows = [a for a in answers if layer_of(a) == layer and coef_of(a) == coef]
        qids = sorted({int(_num(a.get("question_idx")) or 0) for a in rows})[:EXAMPLE_QUESTIONS]
        inner = []
        for q in qids:
            q_rows = sorted((a for a in rows if int(_num(a.get("question_idx")) or 0) == q),
                            key=lambda a: int(_num(a.get("rollout")) or 0))
            inner.append(f'<div class="q">Q{q}: {escape(str(q_rows[0].get("question", "")))}</div>')
            for a in q_rows[:EXAMPLE_ROLLOUTS]:
                scores = []
                for key, label in (("trait_score", "trait"), ("coherence", "coherence")):
                    v = _num(a.get(key))
                    scores.append(f"{label} {v:.1f}" if v is not None else f"{label} –")
                inner.append(f'<div class="a">{escape(str(a.get("answer", "")))}</div>'
                             f'<div class="s">rollout {escape(str(a.get("rollout", "?")))} · '
                             f'{escape(" · ".join(scores))}</div>')
            if len(q_rows) > EXAMPLE_ROLLOUTS:
                inner.append(f'<div class="s">… {len(q_rows) - EXAMPLE_ROLLOUTS} more rollout(s) in '
                             "answers.jsonl</div>")
        is_chosen = chosen is not None and (layer, coef) == chosen
        label = _cond_name(layer, coef) + (" — chosen" if is_chosen else "")
        open_attr = " open" if is_chosen or (layer is None) else ""
        parts.append(f"<details{open_attr}><summary>{escape(label)}</summary>{''.join(inner)}</details>")
    which = f"layer {chosen[0]} (the chosen layer)" if chosen is not None and chosen[0] in layers else "every layer"
    return (f'<h2>Example answers</h2><p class="note">For {escape(which)}, each coefficient: the answers to '
            f"the first {EXAMPLE_QUESTIONS} questions (at most {EXAMPLE_ROLLOUTS} rollouts each), "
            "shown as plain text.</p>" + "".join(parts))


def render_report(run_dir: str | os.PathLike[str]) -> str:
    """The report of ``run_dir`` as one self-contained HTML string (nothing written)."""
    folder = Path(run_dir)
    cells_path = folder / "cells.csv"
    if not cells_path.is_file():
        raise RunError(f"{folder} has no cells.csv: run personavec sweep or eval first")
    header, all_rows = read_cells(cells_path)
    rows = [r for r in all_rows if not r.get("control")]
    control_rows = [r for r in all_rows if r.get("control")]
    manifest = _read_json(folder / "manifest.json")
    choice = _read_json(folder / "choice.json")
    answers = read_jsonl(folder / "answers.jsonl")
    settings: dict[str, Any] = dict(manifest.get("settings") or {}) if manifest else {}

    trait = str(settings.get("trait") or (choice or {}).get("trait") or "unknown trait")
    kind = str(manifest.get("kind")) if manifest and manifest.get("kind") else "run"
    judge = settings.get("judge") or (choice or {}).get("judge")
    measure = str(settings.get("measure") or judge or "trait score")
    chosen: tuple[int, float] | None = None
    if choice:
        layer, coef = _num(choice.get("best_layer")), _num(choice.get("best_coef"))
        if layer is not None and coef is not None:
            chosen = (int(layer), coef)

    title = f"{trait} — {kind} report"
    meta = [f"kind <b>{escape(kind)}</b>", f"trait <b>{escape(trait)}</b>"]
    if judge:
        meta.append(f"trait measure <b>{escape(measure)}</b>"
                    + (" (authored reference answers)" if measure == "reference" else
                       " (built from the trait's own prompt pairs)" if measure == "contrast" else ""))
    if settings.get("vector"):
        meta.append(f"vector <code>{escape(str(settings['vector']))}</code>")
    meta.append(f"run {escape(_run_date(folder, manifest))}")
    meta.append(f"report {escape(datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC'))}")
    sections = [f"<h1>{escape(title)}</h1>",
                f'<p class="meta">{" · ".join(meta)}</p>',
                f'<p class="note">Run folder <code>{escape(str(folder))}</code>. {escape(LAYER_CONVENTION)}</p>']

    if choice:
        pick = (f"layer <b>{chosen[0]}</b> (output of decoder block {chosen[0]}; 0 = embeddings), "
                f"coefficient <b>{_coef(chosen[1])}</b>" if chosen
                else "<b>no condition chosen</b>")
        extra = []
        if _num(choice.get("coherence_threshold")) is not None:
            extra.append(f"coherence threshold {_num(choice.get('coherence_threshold')):g}")
        if choice.get("judge"):
            extra.append(f"judge {choice['judge']}")
        criterion = choice.get("criterion")
        sections.append(
            f'<h2>Chosen condition</h2><div class="choice">{pick}'
            + (f' <span class="note">({escape(", ".join(extra))})</span>' if extra else "")
            + (f"<p>{escape(str(criterion))}</p>" if criterion else "") + "</div>")

    sections.append(_plots_section(rows, choice, measure))
    sections.append(_controls_section(rows, control_rows, measure))
    sections.append(_cells_section(header, all_rows, chosen))
    sections.append(_examples_section(answers, chosen))

    if manifest:
        run = ""
        if settings:
            run += "<h3>Settings</h3>" + _kv_table(settings)
        if isinstance(manifest.get("versions"), dict) and manifest["versions"]:
            run += "<h3>Versions</h3>" + _kv_table(manifest["versions"])
        command = manifest.get("command")
        if isinstance(command, list) and command:
            run += f"<h3>Command</h3><p><code>{escape(' '.join(str(c) for c in command))}</code></p>"
        if run:
            sections.append("<h2>Run</h2>" + run)

    body = "\n".join(s for s in sections if s)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    Raises :class:`RunError` when ``run_dir`` has no ``cells.csv`` or its files are malformed.
    """
    html = render_report(run_dir)
    out = Path(run_dir) / "report.html"
    write_text(out, html)
    return out
