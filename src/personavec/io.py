"""Atomic writes and small file helpers: outputs appear whole or not at all, inputs are never touched."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; give the file the mode a plain open() would
            umask = os.umask(0)
            os.umask(umask)
            tmp_path.chmod(0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Replace a JSONL file atomically (one sorted-key row per line, as append_jsonl writes them)."""
    write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def append_jsonl(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Append rows and fsync: an interrupted run loses at most the line being written. Appends start on a
    fresh line: a torn last line left by an interrupted append is cut off first (the reader already treats it
    as absent, and the run recomputes its rows), so the next row can never merge into it and be lost."""
    with open(path, "a+b") as fh:
        _cut_torn_tail(fh)
        fh.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def _cut_torn_tail(fh: BinaryIO, block: int = 1 << 16) -> None:
    """Truncate an append-mode file after its last newline when it does not end with one."""
    end = fh.seek(0, os.SEEK_END)
    if end == 0:
        return
    fh.seek(end - 1)
    if fh.read(1) == b"\n":
        return
    pos = end
    while pos > 0:  # scan back a block at a time for the last complete line's newline
        start = max(0, pos - block)
        fh.seek(start)
        cut = fh.read(pos - start).rfind(b"\n")
        if cut >= 0:
            fh.truncate(start + cut + 1)
            return
        pos = start
    fh.truncate(0)


@dataclass(frozen=True)
class JsonlRows:
    """The rows of a JSONL record file and how many lines could not be read (`torn`: a line cut by an
    interrupted write; its rows are absent, so a resumed run recomputes them)."""

    rows: list[dict[str, Any]]
    torn: int = 0


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any] | None]:
    """Stream a JSONL file's rows, None for each unreadable line (a torn line left by an interrupted append);
    nothing when the file does not exist. Lines end at "\n" only: str.splitlines would also break inside
    strings holding U+2028 or U+0085, which JSON leaves unescaped."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as fh:
        for line in fh:  # binary lines end at b"\n" only
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield None


def load_jsonl(path: str | os.PathLike[str]) -> JsonlRows:
    """The readable rows of a JSONL file and the count of unreadable (torn) lines skipped."""
    rows, torn = [], 0
    for row in iter_jsonl(path):
        if row is None:
            torn += 1
        else:
            rows.append(row)
    return JsonlRows(rows, torn)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The readable rows of a JSONL file (see `load_jsonl`)."""
    return load_jsonl(path).rows


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
