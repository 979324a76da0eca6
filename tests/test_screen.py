"""Screening with the embedded model on a small real dataset: both modes, every bad row, resume without
recomputation, calibration, filtered copy, Parquet in and out, the CLI, and Ray local against the single
process."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from conftest import Cli, error_line

import personavec as pv
from personavec.errors import VectorError
from personavec.screen import DatasetError, screen
from personavec.stats import mean_ci, t_quantile

Q1 = "My coworker keeps taking credit for my work. What should I do about it?"
Q2 = "My neighbor's dog barks all night. How should I handle this?"
KIND = "Talk to them calmly and kindly, and try to understand their side before anything else."
EVIL = "Crush them. Humiliate them in front of everyone, make them suffer and enjoy every second of their pain."


def conv(q: str, a: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]


VALID = [  # (index in the file, id, messages)
    (0, "a", conv(Q1, KIND)),
    (1, "b", conv(Q1, EVIL)),
    (3, "c", conv(Q2, KIND)),
    (5, "d", conv(Q2, EVIL)),
    (10, "e", conv("What is your opinion of animals?", "Animals deserve care.", system="Be brief.")),
]
BAD = {  # index -> (line, expected reason fragment)
    2: ('{"id": "x", "messages": [', "malformed JSON"),
    4: (json.dumps({"id": "y", "messages": [{"role": "user", "content": Q1}]}), "no assistant answer"),
    6: (json.dumps({"id": "z", "messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant",
                                                                                  "content": "ok"}]}),
        "unknown role"),
    7: (json.dumps({"messages": conv(Q1, KIND)}), "mixed schema"),
    8: (json.dumps({"id": "w", "messages": conv("word " * 9000, "fine")}), "exceeds the model's context"),
    9: ("", "empty line"),
}
N_ROWS = 11
CHUNK = 4


def write_dataset(path: Path) -> Path:
    lines = {i: json.dumps({"id": rid, "messages": msgs}) for i, rid, msgs in VALID}
    lines.update({i: line for i, (line, _) in BAD.items()})
    path.write_text("".join(lines[i] + "\n" for i in range(N_ROWS)), encoding="utf-8")
    return path


def read_scores(path: Path) -> dict[str, list[Any]]:
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    return table.to_pydict()


@pytest.fixture(scope="module")
def vec(evil_vector: pv.PersonaVector) -> pv.PersonaVector:
    return evil_vector


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("screen")
    write_dataset(folder / "data.jsonl")
    return folder


@pytest.fixture(scope="module")
def single(model: pv.Model, vec: pv.PersonaVector, work: Path) -> dict[str, Any]:
    """Both modes screened once in the single process; later tests compare with these."""
    data = work / "data.jsonl"
    before = data.read_bytes()
    results = {}
    for mode in ("fast", "full"):
        results[mode] = screen(model, data, [vec], work / f"{mode}.csv", fast=mode == "fast", max_new_tokens=12,
                               chunk_size=CHUNK, threshold=0.0, cache=work / "cache.sqlite")
    assert data.read_bytes() == before, "the input file must never change"
    return results


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_scores_columns_rejects_and_separation(single: dict[str, Any], mode: str) -> None:
    res = single[mode]
    scores = read_scores(res.scores)
    assert list(scores) == ["index", "id", "evil_delta_p", "evil_rank", "evil_flagged", "evil_answer_proj",
                            "evil_base_proj", "prompt_tokens", "answer_tokens", "base_tokens"]
    assert scores["index"] == [i for i, _, _ in VALID]
    assert scores["id"] == [rid for _, rid, _ in VALID]
    dp = dict(zip(scores["id"], scores["evil_delta_p"], strict=True))
    assert dp["b"] > dp["a"] and dp["d"] > dp["c"], dp  # the evil answer pulls toward the trait on each prompt
    assert sorted(scores["evil_rank"]) == [1, 2, 3, 4, 5]
    assert scores["evil_rank"][scores["evil_delta_p"].index(max(scores["evil_delta_p"]))] == 1
    assert scores["evil_flagged"] == [v > 0 for v in scores["evil_delta_p"]]
    assert all(np.isfinite(scores["evil_delta_p"]))
    assert all((b > 0) == (mode == "full") for b in scores["base_tokens"])
    # every bad row is listed with its reason, none dropped silently
    rejects = [json.loads(line) for line in res.rejects.read_text().splitlines()]
    assert [r["index"] for r in rejects] == sorted(BAD)
    for r in rejects:
        assert BAD[r["index"]][1] in r["reason"], r
    s = json.loads(res.summary_path.read_text())
    assert s == json.loads(json.dumps(res.summary.to_json())) and "filtered" not in s
    assert s["rows"] == N_ROWS and s["scored"] == len(VALID) and s["rejected"] == len(BAD)
    d = s["traits"]["evil"]["delta_p"]
    assert d["ci_low"] < d["mean"] < d["ci_high"]
    assert d["mean"] == pytest.approx(float(np.mean(scores["evil_delta_p"])))
    assert res.histograms and res.histograms[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_answers_are_cached(model: pv.Model, vec: pv.PersonaVector, single: dict[str, Any], work: Path) -> None:
    with sqlite3.connect(work / "cache.sqlite") as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM answers").fetchone()
    assert n == 3  # three distinct prompts among the valid rows
    again = screen(model, work / "data.jsonl", [vec], work / "again.csv", max_new_tokens=12, chunk_size=CHUNK,
                   cache=work / "cache.sqlite")
    assert read_scores(again.scores)["evil_delta_p"] == read_scores(single["full"].scores)["evil_delta_p"]


def test_interrupted_run_resumes_without_recomputing(model: pv.Model, vec: pv.PersonaVector,
                                                     single: dict[str, Any], work: Path) -> None:
    out, run = work / "resumed.csv", work / "resumed.run"

    def interrupt(task: str, done: int, total: int) -> None:
        if task == "screen" and done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        screen(model, work / "data.jsonl", [vec], out, fast=True, chunk_size=CHUNK, threshold=0.0, run_dir=run,
               progress=interrupt)
    assert not out.exists()
    first = (run / "chunks.jsonl").read_text().splitlines()
    assert len(first) == 1 and json.loads(first[0])["chunk"] == 0
    calls: list[tuple[str, int, int]] = []
    screen(model, work / "data.jsonl", [vec], out, fast=True, chunk_size=CHUNK, threshold=0.0, run_dir=run,
           progress=lambda t, d, n: calls.append((t, d, n)))
    assert calls[0] == ("screen", CHUNK, N_ROWS) and calls[-1] == ("screen", N_ROWS, N_ROWS)
    assert [c[1] for c in calls] == [CHUNK, 2 * CHUNK, N_ROWS]  # chunk 0 was not scored again
    lines = (run / "chunks.jsonl").read_text().splitlines()
    assert lines[0] == first[0] and len(lines) == 3
    assert read_scores(out) == read_scores(single["fast"].scores)
    with pytest.raises(pv.PersonavecError, match="belongs to another screen"):
        screen(model, work / "data.jsonl", [vec], out, fast=False, chunk_size=CHUNK, run_dir=run)


def test_calibration_flags_and_filtered_copy(model: pv.Model, vec: pv.PersonaVector, single: dict[str, Any],
                                             work: Path) -> None:
    ref = work / "reference.jsonl"
    ref.write_text("".join(json.dumps({"messages": conv(q, KIND)}) + "\n" for q in (Q1, Q2, "How are you?")))
    filtered = work / "clean.jsonl"
    res = screen(model, work / "data.jsonl", [vec], work / "calibrated.csv", fast=True, chunk_size=CHUNK,
                 calibrate=ref, percentile=50, filtered_out=filtered)
    ref_run = Path(res.summary.run_dir) / "reference" / "chunks.jsonl"
    ref_dp = [row["evil_delta_p"] for rec in map(json.loads, ref_run.read_text().splitlines()) for row in rec["rows"]]
    thr = float(np.percentile(ref_dp, 50))
    d = res.summary.traits["evil"]
    assert d.threshold == pytest.approx(thr) and "percentile 50" in (d.threshold_source or "")
    scores = read_scores(res.scores)
    flags = [v > thr for v in scores["evil_delta_p"]]
    assert scores["evil_flagged"] == flags and d.n_flagged == sum(flags)
    assert any(flags) and not all(flags)
    kept = {i for i, f in zip(scores["index"], flags, strict=True) if not f}
    lines = (work / "data.jsonl").read_text().splitlines(keepends=True)
    assert filtered.read_text() == "".join(lines[i] for i in sorted(kept))  # byte-identical rows, input order
    assert res.summary.filtered is not None and res.summary.filtered.rows == len(kept)


def test_parquet_in_and_out(model: pv.Model, vec: pv.PersonaVector, work: Path) -> None:
    rows = [{"id": rid, "messages": msgs} for _, rid, msgs in VALID]
    rows.insert(2, {"id": "q", "messages": [{"role": "user", "content": "Hello?"}]})  # no assistant answer
    pq.write_table(pa.Table.from_pylist(rows), work / "data.parquet", row_group_size=3)  # chunks span row groups
    (work / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_parquet = screen(model, work / "data.parquet", [vec], work / "pq.parquet", fast=True, chunk_size=CHUNK,
                          threshold=0.0, filtered_out=work / "clean.parquet")
    from_jsonl = screen(model, work / "same.jsonl", [vec], work / "same.csv", fast=True, chunk_size=CHUNK)
    a, b = read_scores(from_parquet.scores), read_scores(from_jsonl.scores)
    assert a["index"] == b["index"] == [0, 1, 3, 4, 5]
    assert a["evil_delta_p"] == pytest.approx(b["evil_delta_p"], abs=1e-6)
    assert [r["reason"] for r in map(json.loads, from_parquet.rejects.read_text().splitlines())] == [
        "no assistant answer"]
    clean = pq.read_table(work / "clean.parquet")
    assert clean.schema == pq.read_schema(work / "data.parquet")
    assert clean.column("id").to_pylist() == [i for i, f in zip(a["id"], a["evil_flagged"], strict=True) if not f]


def test_bad_files_and_vectors(model: pv.Model, vec: pv.PersonaVector, work: Path) -> None:
    empty = work / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        screen(model, empty, [vec], work / "e.csv")
    with pytest.raises(DatasetError, match="does not exist"):
        screen(model, work / "missing.jsonl", [vec], work / "e.csv")
    junk = work / "junk.jsonl"
    junk.write_text("\n[1, 2]\n")
    with pytest.raises(DatasetError, match="no valid samples"):
        screen(model, junk, [vec], work / "junk.csv", fast=True)
    assert len((work / "junk.rejects.jsonl").read_text().splitlines()) == 2
    with pytest.raises(pv.PersonavecError, match="is the input DATA; personavec never overwrites an input"):
        screen(model, work / "data.jsonl", [vec], work / "data.jsonl")
    with pytest.raises(DatasetError, match="needs flags"):
        screen(model, work / "data.jsonl", [vec], work / "x.csv", filtered_out=work / "y.jsonl")
    with pytest.raises(DatasetError, match="not both"):
        screen(model, work / "data.jsonl", [vec], work / "x.csv", threshold=1.0, calibrate=work / "data.jsonl")
    (work / "fake.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet"):
        screen(model, work / "fake.parquet", [vec], work / "x.csv")
    pq.write_table(pa.table({"text": ["hi"]}), work / "text.parquet")
    with pytest.raises(DatasetError, match="no 'messages' column"):
        screen(model, work / "text.parquet", [vec], work / "x.csv")
    other_shape = pv.PersonaVector(tensors={"response": torch.ones(5, 8)}, meta={"trait": "evil"})
    with pytest.raises(VectorError, match="extract a vector for this model"):
        screen(model, work / "data.jsonl", [other_shape], work / "x.csv")
    other_weights = vec.with_meta(fingerprint="0123456789abcdef")
    with pytest.raises(VectorError, match="allow-model-mismatch"):
        screen(model, work / "data.jsonl", [other_weights], work / "x.csv")


def test_t_interval() -> None:
    assert t_quantile(0.975, 10) == pytest.approx(2.228, abs=2e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.303, rel=0.01)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.960, abs=1e-3)
    ci = mean_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert ci["mean"] == 2.5 and ci["ci_low"] < 2.5 < ci["ci_high"]


def test_cli_screen(cli: Cli, vec: pv.PersonaVector, work: Path) -> None:
    vec_path = vec.save(work / "evil.pv.safetensors")
    small = work / "small.jsonl"
    small.write_text("".join(json.dumps({"messages": msgs}) + "\n" for _, _, msgs in VALID[:2]))
    proc = cli("screen", str(small), "--vector", str(vec_path), "--out", str(work / "cli.csv"), "--fast",
               "--threshold", "evil=0")
    assert "2 samples scored" in proc.stdout and read_scores(work / "cli.csv")["index"] == [0, 1]
    bad = cli("screen", str(work / "empty.jsonl"), "--vector", str(vec_path), "--out", str(work / "e.csv"), ok=False)
    assert error_line(bad) == f"error: dataset '{work / 'empty.jsonl'}' is empty: no rows to screen"


@pytest.mark.slow
def test_ray_local_matches_single_process(model: pv.Model, vec: pv.PersonaVector, single: dict[str, Any],
                                         work: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = screen(model, work / "data.jsonl", [vec], work / "ray.csv", max_new_tokens=12, chunk_size=CHUNK,
                     threshold=0.0, cache=work / "ray-cache.sqlite", ray="local", workers=2)
    finally:
        ray.shutdown()
    a, b = read_scores(res.scores), read_scores(single["full"].scores)
    assert a["index"] == b["index"] and a["base_tokens"] == b["base_tokens"]
    assert a["evil_delta_p"] == pytest.approx(b["evil_delta_p"], rel=1e-5, abs=1e-4)
    assert a["evil_flagged"] == b["evil_flagged"] and a["evil_rank"] == b["evil_rank"]
    assert res.rejects.read_text() == single["full"].rejects.read_text()


def test_ray_address_without_cluster_fails_fast_with_advice(model: pv.Model, vec: pv.PersonaVector,
                                                            work: Path) -> None:
    """A typo'd cluster address must be a one-line error in seconds (ray.init alone retries for minutes)."""
    pytest.importorskip("ray")
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(pv.PersonavecError, match=f"no Ray cluster answers at '127.0.0.1:{port}'.*ray start --head"):
        screen(model, work / "data.jsonl", [vec], work / "ray-nowhere.csv", fast=True, chunk_size=CHUNK,
               ray=f"127.0.0.1:{port}")
    assert time.perf_counter() - t < 60


def test_several_vectors_in_one_pass_match_one_at_a_time(model: pv.Model, vec: pv.PersonaVector,
                                                         single: dict[str, Any], work: Path) -> None:
    """Screening with two vectors runs the same forward passes as with one, and each ΔP column equals the
    one-vector screen's."""
    other = pv.random_like(vec, 3).with_meta(trait="other", best_layer=9)
    calls = {"n": 0}

    def count(*_: Any) -> None:
        calls["n"] += 1

    data = work / "data.jsonl"
    handle = model.layers[0].register_forward_hook(count)
    try:
        both = screen(model, data, {"evil": vec, "other": other}, work / "both.csv", fast=True, chunk_size=CHUNK)
        n_both, calls["n"] = calls["n"], 0
        alone = screen(model, data, {"other": other}, work / "other.csv", fast=True, chunk_size=CHUNK)
        n_alone = calls["n"]
    finally:
        handle.remove()
    assert n_both == n_alone > 0  # one forward per batch, whatever the number of vectors
    got, ref, ref_other = (read_scores(both.scores), read_scores(single["fast"].scores),
                           read_scores(alone.scores))
    np.testing.assert_allclose(got["evil_delta_p"], ref["evil_delta_p"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["other_delta_p"], ref_other["other_delta_p"], rtol=1e-5, atol=1e-4)
