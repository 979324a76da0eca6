"""The HTML report of a run folder: self-contained, escaped, atomic, and tolerant of missing optional files."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import pytest
from conftest import visible_text

from personavec.errors import RunError
from personavec.report import read_cells, write_report

plots = pytest.importorskip("personavec.report.plots", reason="the report needs matplotlib (personavec[plots])")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = [6, 12, 18]
COEFS = [-4.0, -2.0, 0.0, 2.0, 4.0]
HEADER = ["layer", "coef", "n", "trait_mean", "trait_se", "coherence_mean", "coherence_se",
          "judge_free_mean", "judge_free_se", "perplexity", "quiz_accuracy"]
EVIL_ANSWER = "Sure. <script>alert('pwned')</script> & then \"take over\""


def _make_run(folder: Path, *, choice: bool = True, manifest: bool = True, answers: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = [{
        "layer": "", "coef": 0.0, "n": 10, "trait_mean": 8.0, "trait_se": 1.5, "coherence_mean": 88.0,
        "coherence_se": 1.2, "judge_free_mean": 0.10, "judge_free_se": 0.02, "perplexity": 12.3,
        "quiz_accuracy": 0.62}]
    for i, layer in enumerate(LAYERS):
        for coef in COEFS:
            strength = (i + 1) / len(LAYERS)
            rows.append({
                "layer": layer, "coef": coef, "n": 10,
                "trait_mean": round(max(0.5, 8.0 + 9.0 * coef * strength), 2),
                # some standard errors are missing: the plots must still draw the means
                "trait_se": "" if coef == 4.0 else round(1.0 + 0.3 * abs(coef), 2),
                "coherence_mean": round(88.0 - 4.0 * coef * coef * strength, 2),
                "coherence_se": round(1.0 + 0.5 * abs(coef), 2),
                "judge_free_mean": round(0.1 + 0.05 * coef * strength, 3),
                "judge_free_se": "",
                # capability measured only on some cells
                "perplexity": round(12.3 + 0.8 * coef * coef * strength, 2) if coef != -2.0 else "",
                "quiz_accuracy": "" if layer == 6 else round(0.62 - 0.02 * abs(coef) * strength, 3),
            })
    with open(folder / "cells.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    if answers:
        lines = []
        conditions: list[tuple[int | None, float]] = [(None, 0.0)]
        conditions += [(layer, coef) for layer in LAYERS for coef in COEFS]
        for cond_layer, coef in conditions:
            cell = "base" if cond_layer is None else f"L{cond_layer}_c{coef:+g}"
            for q in range(3):
                for r in range(2):
                    text = EVIL_ANSWER if (cond_layer == 18 and coef == 2.0 and q == 0 and r == 0) else \
                        f"answer to question {q} at {cell}, rollout {r}"
                    lines.append(json.dumps({
                        "cell": cell, "layer": cond_layer, "coef": coef, "question_idx": q, "rollout": r,
                        "question": f"Question number {q}?", "answer": text,
                        "trait_score": None if r == 1 else 42.0, "coherence": 80.0}))
        (folder / "answers.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({
            "kind": "sweep",
            "settings": {"trait": "evil", "judge": "contrast", "vector": "evil.pv.safetensors",
                         "layers": LAYERS, "coefs": COEFS, "n_questions": 3},
            "versions": {"personavec": "0.1.0", "torch": "2.4.0", "python": "3.11.7"},
            "command": ["personavec", "sweep", "evil.pv.safetensors", "--layers", "6,12,18"]}),
            encoding="utf-8")
    if choice:
        (folder / "choice.json").write_text(json.dumps({
            "best_layer": 18, "best_coef": 2.0, "coherence_threshold": 50.0,
            "criterion": "highest trait score with coherence >= 50", "judge": "contrast", "trait": "evil"}),
            encoding="utf-8")
    return folder


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _readable(png: bytes) -> None:
    assert png.startswith(PNG_SIGNATURE)
    from matplotlib.image import imread

    array = imread(io.BytesIO(png), format="png")
    assert array.ndim == 3 and array.shape[0] > 50 and array.shape[1] > 50


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run")
    before = {p.name for p in run.iterdir()}
    out = write_report(run)
    assert out == run / "report.html" and out.is_file()
    html = out.read_text(encoding="utf-8")

    images = _images(html)
    assert len(images) >= 4
    for png in images:
        _readable(png)

    # nothing is fetched from the network: no remote src/href, no external stylesheet or script
    assert 'src="http' not in html and "href=\"http" not in html
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html.lower()

    # the answer's markup is shown as text, never run
    assert "&lt;script&gt;alert(" in html
    assert "<script>alert(" not in html

    assert "Chosen condition" in html
    assert "layer <b>18</b>" in html and "+2" in html
    text = visible_text(html)  # what a reader sees: not a match inside an image's base64
    assert "layer 18 (output of decoder block 18; 0 = embeddings), coefficient +2 " in text
    assert "highest trait score with coherence &gt;= 50" in html
    assert "output of decoder block L" in html
    assert 'class="chosen"' in html                 # highlighted table row
    assert "evil.pv.safetensors" in html and "torch" in html  # manifest settings and versions
    assert "evil.pv.safetensors" in text and "torch" in text and "2.4.0" in text
    # examples: only the chosen layer (plus the unsteered baseline), first two questions
    assert "layer 18, coef +2 — chosen" in html
    assert "layer 6, coef" not in html
    assert "Question number 1?" in html and "Question number 2?" not in html

    after = {p.name for p in run.iterdir()}
    assert after == before | {"report.html"}        # no stray temporary files


def test_report_without_optional_files(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "bare", choice=False, manifest=False, answers=False)
    html = write_report(run).read_text(encoding="utf-8")
    assert "Chosen condition" not in html and "Example answers" not in html and "<h2>Run</h2>" not in html
    assert "<h2>Cells</h2>" in html
    assert len(_images(html)) >= 4
    assert sorted(p.name for p in run.iterdir()) == ["cells.csv", "report.html"]


def test_report_examples_every_layer_without_choice(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "eval", choice=False)
    html = write_report(run).read_text(encoding="utf-8")
    for layer in LAYERS:
        assert f"layer {layer}, coef +4" in html
    assert "&lt;script&gt;" in html


def test_missing_cells_is_a_run_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(RunError, match=r"has no cells\.csv: run personavec sweep or eval first"):
        write_report(folder)
    assert list(folder.iterdir()) == []
    with pytest.raises(RunError, match=r"has no cells\.csv"):
        write_report(tmp_path / "does-not-exist")


def test_malformed_cells_is_a_run_error(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "cells.csv").write_text("layer,coef,trait_mean\n18,2,lots\n", encoding="utf-8")
    with pytest.raises(RunError, match="line 2: trait_mean='lots'"):
        write_report(folder)
    assert not (folder / "report.html").exists()


def test_plots_skip_empty_metrics(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "run", answers=False)
    _, rows = read_cells(run / "cells.csv")
    assert rows[0]["layer"] is None and rows[1]["layer"] == 6
    emptied = [{**r, "coherence_mean": None, "coherence_se": None, "perplexity": None, "quiz_accuracy": None}
               for r in rows]
    assert plots.metric_vs_coef(emptied, "coherence_mean", "coherence") is None
    assert plots.heatmap(emptied, "coherence_mean") is None
    assert plots.capability_vs_coef(emptied) is None
    for png in (plots.metric_vs_coef(rows, "trait_mean", "trait score"),
                plots.heatmap(rows, "trait_mean"),
                plots.capability_vs_coef(rows)):
        assert png is not None
        _readable(png)


def test_heatmap_falls_back_to_raw_values_without_coef_zero() -> None:
    rows: list[dict[str, float | int | None]] = [
        {"layer": layer, "coef": coef, "trait_mean": float(layer + coef)} for layer in (4, 8) for coef in (1.0, 2.0)]
    png = plots.heatmap(rows, "trait_mean")
    assert png is not None and png.startswith(PNG_SIGNATURE)
