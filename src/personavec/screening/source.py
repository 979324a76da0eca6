"""Streaming, chunked reading of a conversation dataset (JSONL or Parquet).

One pass plans the file into fixed chunks of `chunk_size` rows (JSONL: the byte offset of each chunk's first
line; Parquet: row ranges from the footer) and hashes it; each chunk is then read on its own, so memory
holds one chunk (for Parquet: one row group) whatever the dataset size, a resumed run skips finished chunks,
and Ray workers read their chunks themselves. The same chunks are scored by every backend, so the single
process and Ray see identical batches."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..io import atomic_path, sha256_file
from .rows import DatasetError, Parsed, Reject, Schema, parse_row, schema_of

PARQUET_SUFFIXES = (".parquet", ".pq")
#: The longest JSONL row read into memory (bytes); a longer one is rejected, read past a block at a time, so one
#: huge line cannot exhaust memory. Far beyond any model's context: such a row would be rejected anyway.
MAX_ROW_BYTES = 64 << 20


def read_line(fh: BinaryIO, sink: Callable[[bytes], object] | None = None,
              limit: int | None = None) -> tuple[bytes | None, int]:
    """The next line of a binary file and its size in bytes (b"" and 0 at the end); None for the line when it
    is longer than `limit` (default MAX_ROW_BYTES; then only a block at a time is held). Every byte read is
    passed to `sink`."""
    limit = MAX_ROW_BYTES if limit is None else limit
    head = fh.readline(limit + 1)
    if sink is not None:
        sink(head)
    if len(head) <= limit or head.endswith(b"\n"):
        return head, len(head)
    size = len(head)
    while part := fh.readline(1 << 20):
        size += len(part)
        if sink is not None:
            sink(part)
        if part.endswith(b"\n"):
            break
    return None, size


def format_of(path: str | os.PathLike[str]) -> str:
    """"parquet" for .parquet/.pq names, else "jsonl"."""
    return "parquet" if str(path).lower().endswith(PARQUET_SUFFIXES) else "jsonl"


@dataclass(frozen=True)
class ChunkRef:
    """Rows [start, start + count) of the input; `offset` is the JSONL byte offset of row `start`."""

    chunk: int
    start: int
    count: int
    offset: int = -1


@dataclass(frozen=True)
class Source:
    path: str
    format: str
    n_rows: int
    sha256: str
    schema: Schema
    chunks: list[ChunkRef] = field(repr=False)


def precheck(path: str | os.PathLike[str]) -> Path:
    """Fail at once, before any model is loaded, on a missing or zero-byte dataset."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset '{p}' does not exist; pass a JSONL or Parquet file of conversations")
    if p.stat().st_size == 0:
        raise DatasetError(f"dataset '{p}' is empty: no rows to screen")
    return p


def open_source(path: str | os.PathLike[str], chunk_size: int = 256) -> Source:
    """Plan `path` into chunks in one streaming pass; an empty or unreadable file is a DatasetError."""
    p = precheck(path)
    if chunk_size < 1:
        raise DatasetError(f"chunk size must be at least 1, got {chunk_size}")
    fmt = format_of(p)
    src = _plan_parquet(p, chunk_size) if fmt == "parquet" else _plan_jsonl(p, chunk_size)
    if src.n_rows == 0:
        raise DatasetError(f"dataset '{p}' is empty: no rows to screen")
    return src


def _plan_jsonl(p: Path, chunk_size: int) -> Source:
    h = hashlib.sha256()
    chunks: list[ChunkRef] = []
    offset = n = 0
    schema: Schema | None = None
    with open(p, "rb") as fh:
        while True:
            line, size = read_line(fh, h.update)
            if size == 0:
                break
            if n % chunk_size == 0:
                chunks.append(ChunkRef(len(chunks), n, 0, offset))
            if schema is None and line is not None:
                try:
                    value = json.loads(line)
                    if isinstance(value, dict):
                        schema = schema_of(value)
                except ValueError:
                    pass
            offset += size
            n += 1
    counts = [min(chunk_size, n - c.start) for c in chunks]
    chunks = [ChunkRef(c.chunk, c.start, k, c.offset) for c, k in zip(chunks, counts, strict=True)]
    return Source(str(p.resolve()), "jsonl", n, h.hexdigest(), schema or Schema(has_id=False), chunks)


def _parquet_file(p: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(p))
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise DatasetError(f"'{p}' is not a readable Parquet file ({str(exc)[:120]}); "
                           "pass Parquet or a .jsonl file") from None


def _plan_parquet(p: Path, chunk_size: int) -> Source:
    pf = _parquet_file(p)
    names = pf.schema_arrow.names
    if "messages" not in names:
        raise DatasetError(f"'{p}' has no 'messages' column (columns: {', '.join(names[:10])}); "
                           "screening needs chat conversations")
    n = pf.metadata.num_rows
    schema = Schema(has_id=False)
    if n and "id" in names:
        first = next(pf.iter_batches(batch_size=1, columns=["id"]))
        schema = Schema(has_id=first.column(0)[0].is_valid)
    chunks = [ChunkRef(k, start, min(chunk_size, n - start)) for k, start in enumerate(range(0, n, chunk_size))]
    return Source(str(p.resolve()), "parquet", n, sha256_file(p), schema, chunks)


def read_chunk(source: Source, ref: ChunkRef) -> list[Parsed | Reject]:
    """Parse and validate the rows of one chunk."""
    if source.format == "parquet":
        return _read_parquet(source, ref)
    out: list[Parsed | Reject] = []
    with open(source.path, "rb") as fh:
        fh.seek(ref.offset)
        for k in range(ref.count):
            line, size = read_line(fh)
            index = ref.start + k
            if line is None:
                out.append(Reject(index, f"row of {size} bytes exceeds the {MAX_ROW_BYTES} byte row limit"))
                continue
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if not text.strip():
                out.append(Reject(index, "empty line"))
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                out.append(Reject(index, f"malformed JSON: {exc.msg} (line {index + 1}, column {exc.colno})",
                                  text[:200]))
                continue
            except UnicodeDecodeError:
                out.append(Reject(index, f"malformed JSON: not UTF-8 text (line {index + 1})", text[:200]))
                continue
            out.append(parse_row(index, value, source.schema, text))
    return out


@lru_cache(maxsize=2)
def _row_group(path: str, sha: str, group: int, columns: tuple[str, ...]) -> Any:
    """One decoded row group; cached so that sequential chunks of the same group decode it once."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=list(columns))


def _read_parquet(source: Source, ref: ChunkRef) -> list[Parsed | Reject]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(source.path).metadata
    names = set(pq.ParquetFile(source.path).schema_arrow.names)
    columns = tuple(c for c in ("messages", "id") if c in names)
    parts, first = [], 0
    end = ref.start + ref.count
    for g in range(meta.num_row_groups):
        size = meta.row_group(g).num_rows
        if first < end and first + size > ref.start:
            table = _row_group(source.path, source.sha256, g, columns)
            lo = max(ref.start - first, 0)
            parts.append(table.slice(lo, min(end - first, size) - lo))
        first += size
    rows = pa.concat_tables(parts).to_pylist() if parts else []
    return [parse_row(ref.start + k, row, source.schema, json.dumps(row, default=str)[:200])
            for k, row in enumerate(rows)]


def iter_chunks(source: Source, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[tuple[ChunkRef, list[Parsed | Reject]]]:
    for ref in source.chunks:
        if ref.chunk not in skip:
            yield ref, read_chunk(source, ref)


def write_filtered(source: Source, keep: np.ndarray, dest: str | os.PathLike[str]) -> int:
    """Copy the input to `dest` (same format), keeping the rows where `keep[index]` is true; JSONL lines are
    copied byte for byte. Returns the number of rows written."""
    written = 0
    with atomic_path(dest) as tmp:
        if source.format == "jsonl":
            with open(source.path, "rb") as src, open(tmp, "wb") as dst:
                for index in range(source.n_rows):
                    line, _ = read_line(src)  # an over-long row is a reject: never kept
                    if keep[index] and line is not None:
                        dst.write(line if line.endswith(b"\n") else line + b"\n")
                        written += 1
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(source.path)
            offset = 0
            with pq.ParquetWriter(str(tmp), pf.schema_arrow) as writer:
                for batch in pf.iter_batches(batch_size=65536):
                    mask = pa.array(keep[offset:offset + batch.num_rows])
                    kept = batch.filter(mask)
                    writer.write_batch(kept)
                    written += kept.num_rows
                    offset += batch.num_rows
    return written
