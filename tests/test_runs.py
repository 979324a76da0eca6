"""The one resumable record loop: keyed records, pending chunks and their seeds survive an interruption."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from personavec.io import read_jsonl
from personavec.runs import Records, chunk_seed, pending_chunks


@dataclass(frozen=True)
class Item:
    key: str


def test_records_persist_and_live_in_memory_without_a_folder(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    recs = Records(path)
    recs.add([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    assert "a" in recs and recs["b"]["v"] == 2 and len(read_jsonl(path)) == 2
    assert Records(path).rows == recs.rows  # read back on reopening
    cells = Records(None, key="cell")
    cells.add([{"cell": "base", "n": 3}])
    assert "base" in cells and "key" not in cells


def test_an_interrupted_loop_resumes_with_the_same_positions_and_seeds(tmp_path: Path) -> None:
    plan = [Item(f"q{i}") for i in range(7)]
    whole = [(pos, [x.key for x in part]) for pos, part in pending_chunks(plan, Records(None), 3)]
    assert whole == [(0, ["q0", "q1", "q2"]), (3, ["q3", "q4", "q5"]), (6, ["q6"])]
    recs = Records(tmp_path / "rows.jsonl")
    for pos, part in pending_chunks(plan, recs, 3):  # stops after the first chunk
        recs.add([{"key": x.key, "seed": chunk_seed(5, pos)} for x in part])
        break
    again = Records(tmp_path / "rows.jsonl")
    resumed = [(pos, [x.key for x in part]) for pos, part in pending_chunks(plan, again, 3)]
    assert resumed == whole[1:]  # the same chunks at the same positions, hence the same seeds
    assert chunk_seed(5, 3) == 5 + 7919 * 3 and again["q0"]["seed"] == 5
