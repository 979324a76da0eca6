"""On-disk cache of judge scores, so a rerun or a resumed run pays for no judgement twice.

sqlite gives atomic commits, safe sharing between processes, and a single file; a lock makes one
connection safe to share between the judge's worker threads. A cached None (the judge refused) is a
result too: at temperature 0 asking again would give the same refusal."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..models import cache_root

MEMORY = ":memory:"


class JudgeCache:
    """Maps a content key to a score (float or None). `path=":memory:"` keeps nothing after the process.

    The file is opened on first use, so constructing a judge creates nothing on disk."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = str(path) if path is not None else str(cache_root() / "judge-cache.sqlite")
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @staticmethod
    def key(identity: str, prompt: str, version: str) -> str:
        """sha256 of the judge's identity, the exact prompt it sees and the scoring method's version."""
        blob = json.dumps([identity, prompt, version], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            if self.path != MEMORY:
                try:  # WAL lets readers and one writer in other processes proceed together
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=NORMAL")
                except sqlite3.DatabaseError:  # e.g. a network filesystem without shared memory
                    pass
            conn.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL, created REAL)")
            conn.commit()
            self._conn = conn
        return self._conn

    def get_many(self, keys: Iterable[str]) -> dict[str, float | None]:
        """The cached entries among `keys`; a missing key is absent, a cached refusal maps to None."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, float | None] = {}
        with self._lock:
            conn = self._connect()
            for start in range(0, len(wanted), 500):  # stay under sqlite's bound-parameter limit
                chunk = wanted[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for k, score in conn.execute(f"SELECT key, score FROM scores WHERE key IN ({marks})", chunk):
                    found[k] = None if score is None else float(score)
        return found

    def put_many(self, entries: Mapping[str, float | None]) -> None:
        """Store and commit at once: an interrupted run keeps every score it already paid for."""
        if not entries:
            return
        now = time.time()
        with self._lock:
            conn = self._connect()
            conn.executemany("INSERT OR REPLACE INTO scores (key, score, created) VALUES (?, ?, ?)",
                             [(k, v, now) for k, v in entries.items()])
            conn.commit()

    def get(self, key: str) -> tuple[bool, float | None]:
        """(found, score): `found` separates a cached None from a miss."""
        found = self.get_many([key])
        return (key in found, found.get(key))

    def put(self, key: str, score: float | None) -> None:
        self.put_many({key: score})

    def __len__(self) -> int:
        with self._lock:
            return int(self._connect().execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def clear(self) -> None:
        with self._lock:
            conn = self._connect()
            conn.execute("DELETE FROM scores")
            conn.commit()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __repr__(self) -> str:
        return f"JudgeCache({self.path!r})"
