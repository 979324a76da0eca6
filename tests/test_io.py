"""Atomic writes: all-or-nothing, and the file gets the mode a plain open() would give it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from personavec.io import append_jsonl, atomic_path, read_jsonl, write_jsonl, write_text


def test_atomic_write_gets_umask_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "b.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]


def test_read_jsonl_keeps_rows_whose_text_holds_unicode_line_breaks(tmp_path: Path) -> None:
    rows = [{"text": "first\u2028second\x85third"}, {"text": "plain"}]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_jsonl(path) == rows


def test_write_jsonl_replaces_rows_that_append_and_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    rows = read_jsonl(path)
    rows[0]["b"] = "filled"
    write_jsonl(path, rows)
    append_jsonl(path, [{"a": 3}])
    assert read_jsonl(path) == [{"a": 1, "b": "filled"}, {"a": 2}, {"a": 3}]
    assert [p.name for p in tmp_path.iterdir()] == ["runs.jsonl"]
