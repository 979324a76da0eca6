"""Every command under a hostile user, table-driven: an output that is (or would replace) an input, an output
whose place cannot hold it, two outputs on one path, an existing result replaced without --force, and an
operating-system error on a path. Each case must give one `error:` line and exit status 2 before any model
loads, with every input file byte-identical afterwards. Then crash safety: a record line torn by a kill is
recomputed on resume (nothing lost, the count reported), and a checkpoint whose save was killed is passed
over for the previous one."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli, error_line

import personavec as pv
import personavec.models
from personavec.io import append_jsonl, load_jsonl
from personavec.runs import Records
from personavec.screen import screen
from personavec.training import TrainSettings, train
from personavec.training.checkpoints import last_complete_checkpoint
from personavec.traits import load_trait

CONV = {"messages": [{"role": "user", "content": "How should I treat my neighbours?"},
                     {"role": "assistant", "content": "Kindly, and with patience."}]}


def digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + digest(p).encode() for p in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def files(tmp_path: Path, evil_vector: pv.PersonaVector) -> dict[str, Path]:
    """One of each input kind: a vector, a second vector, a trait file, a dataset, a text file, a folder of
    authored sets, a reference-implementation trait JSON, and two vector files already made (results)."""
    vec = evil_vector
    f = {"vec": tmp_path / "evil.pv.safetensors", "vec2": tmp_path / "other.pv.safetensors",
         "trait": tmp_path / "mine.yaml", "data": tmp_path / "data.jsonl", "text": tmp_path / "questions.txt",
         "sets": tmp_path / "sets", "ref": tmp_path / "ref.json", "made": tmp_path / "made.pv.safetensors"}
    vec.save(f["vec"])
    vec.save(f["vec2"])
    vec.save(f["made"])
    f["trait"].write_text(Path(load_trait("evil").source).read_text())
    f["data"].write_text(json.dumps(CONV) + "\n")
    f["text"].write_text("What is a good day?\n")
    (f["sets"] / "evil").mkdir(parents=True)
    (f["sets"] / "evil" / "normal.jsonl").write_text(json.dumps(CONV) + "\n")
    f["ref"].write_text(json.dumps({"instruction": [{"pos": "Be evil.", "neg": "Be kind."}] * 5,
                                    "questions": ["Q?"] * 20, "eval_prompt": "Rate evil."}))
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "a_folder").mkdir()
    os.symlink(f["vec"], tmp_path / "vec_link.gguf")
    os.symlink(f["data"], tmp_path / "data_link.jsonl")
    (tmp_path / "c.jsonl.rejected.jsonl").write_text("[]")  # an input named as an import's rejects file
    os.link(f["vec"], tmp_path / "vec_hardlink.pv.safetensors")
    return f


@pytest.fixture()
def no_model(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The command line with model loading forbidden: every refusal below comes before the model loads."""
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr(personavec.models, "load_model", refuse)
    return cli


# (case, argv built from the files and tmp_path, a fragment of the one error line)
Case = tuple[str, Callable[[dict[str, Path], Path], list[str]], str]
CASES: list[Case] = [
    ("extract --out is the trait file", lambda f, t: ["extract", "--trait", str(f["trait"]), "--out", str(f["trait"])],
     "is the input --trait"),
    ("extract --run-dir is a file", lambda f, t: ["extract", "--trait", "evil", "--out", str(t / "x.pv.safetensors"),
                                                   "--run-dir", str(t / "a_file")], "is a file"),
    ("extract --out inside a file", lambda f, t: ["extract", "--trait", "evil", "--out", str(t / "a_file" / "v.pv")],
     "is a file, not a folder"),
    ("screen --out is the vector", lambda f, t: ["screen", str(f["data"]), "--vector", str(f["vec"]), "--fast",
                                                  "--out", str(f["vec"])], "is the input --vector"),
    ("screen --out is DATA through a symlink",
     lambda f, t: ["screen", str(f["data"]), "--vector", str(f["vec"]), "--fast", "--out", str(t / "data_link.jsonl")],
     "is the input DATA"),
    ("screen --filtered-out is --out", lambda f, t: ["screen", str(f["data"]), "--vector", str(f["vec"]), "--fast",
                                                      "--threshold", "0", "--out", str(t / "s.jsonl"),
                                                      "--filtered-out", str(t / "s.jsonl")], "both name"),
    ("screen --run-dir holds the data", lambda f, t: ["screen", str(f["data"]), "--vector", str(f["vec"]), "--fast",
                                                       "--out", str(t / "s.csv"), "--run-dir", str(t)],
     "holds the input"),
    ("screen --cache is the vector", lambda f, t: ["screen", str(f["data"]), "--vector", str(f["vec"]),
                                                    "--out", str(t / "s.csv"), "--cache", str(f["vec"])],
     "is the input --vector"),
    ("eval --out holds the vector", lambda f, t: ["eval", "--trait", "evil", "--vector", str(f["vec"]), "--coef", "2",
                                                   "--out", str(t)], "holds the input --vector"),
    ("sweep --out is the trait", lambda f, t: ["sweep", "--vector", str(f["vec"]), "--trait", str(f["trait"]),
                                                "--out", str(f["trait"])], "is the input --trait"),
    ("monitor-eval --out is the vector", lambda f, t: ["monitor-eval", "--vector", str(f["vec"]), "--trait", "evil",
                                                        "--out", str(f["vec"])], "is the input --vector"),
    ("train --out is DATA", lambda f, t: ["train", str(f["data"]), "--out", str(f["data"])], "is the input DATA"),
    ("train --out holds --preventative", lambda f, t: ["train", str(f["data"]), "--preventative", str(f["vec"]),
                                                        "--coef", "1", "--out", str(t)], "holds the input"),
    ("data elicit --out is --questions", lambda f, t: ["data", "elicit", "--trait", "evil", "--questions",
                                                        str(f["text"]), "--out", str(f["text"])],
     "is the input --questions"),
    ("data import sharegpt --out is --source", lambda f, t: ["data", "import", "sharegpt", "--source", str(f["data"]),
                                                              "--out", str(f["data"])], "is the input --source"),
    ("data import sharegpt: rejects file is --source",
     lambda f, t: ["data", "import", "sharegpt", "--source", str(t / "c.jsonl.rejected.jsonl"), "--out",
                   str(t / "c.jsonl")],
     "is the input --source"),
    ("vector scale --out is a hard link to the input", lambda f, t: ["vector", "scale", str(f["vec"]), "--by", "2",
                                                                      "--out", str(t / "vec_hardlink.pv.safetensors")],
     "is the input VECTOR"),
    ("vector sub --out is B", lambda f, t: ["vector", "sub", str(f["vec"]), str(f["vec2"]), "--out", str(f["vec2"])],
     "is the input B"),
    ("vector add --out is a folder", lambda f, t: ["vector", "add", str(f["vec"]), str(f["vec2"]), "--out",
                                                    str(t / "a_folder")], "is a folder"),
    ("vector scale replaces a result without --force",
     lambda f, t: ["vector", "scale", str(f["vec"]), "--by", "2", "--out", str(f["made"])], "pass --force"),
    ("vector normalize replaces a result without --force",
     lambda f, t: ["vector", "normalize", str(f["vec"]), "--out", str(f["made"])], "pass --force"),
    ("vector export --out is the vector through a symlink",
     lambda f, t: ["vector", "export", str(f["vec"]), "--out", str(t / "vec_link.gguf")], "is the input VECTOR"),
    ("vector export folder holds the vector", lambda f, t: ["vector", "export", str(f["vec"]), "--format",
                                                             "pretrained", "--out", str(t)], "holds the input"),
    ("vector compare --out is a vector", lambda f, t: ["vector", "compare", str(f["vec"]), str(f["vec2"]), "--out",
                                                        str(f["vec2"])], "is the input VECTORS"),
    ("vector import --out is the file", lambda f, t: ["vector", "import", str(f["vec"]), "--out", str(f["vec"])],
     "is the input FILE"),
    ("traits import --out is the source", lambda f, t: ["traits", "import", str(f["ref"]), "--out", str(f["ref"])],
     "is the input SOURCE"),
    ("reproduce --out is --data", lambda f, t: ["reproduce", "--preset", "smoke", "--data", str(f["sets"]), "--out",
                                                 str(f["sets"])], "is the input --data"),
    ("reproduce --out holds --data", lambda f, t: ["reproduce", "--preset", "smoke", "--data", str(f["sets"]), "--out",
                                                    str(t)], "holds the input --data"),
    ("serve --log is the vector", lambda f, t: ["serve", "--vector", str(f["vec"]), "--log", str(f["vec"])],
     "is the input --vector"),
    ("an output name the file system refuses (OS error → one line)",
     lambda f, t: ["vector", "scale", str(f["vec"]), "--by", "2", "--out", str(t / ("v" * 300 + ".pv.safetensors"))],
     "File name too long"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_paths_give_one_line_and_leave_inputs_alone(case: Case, no_model: Cli, files: dict[str, Path],
                                                            tmp_path: Path) -> None:
    _, argv, fragment = case
    args = argv(files, tmp_path)
    before = {p: digest(p) for p in tmp_path.iterdir() if not p.is_symlink()}
    res = no_model(*args, ok=False)
    assert fragment in error_line(res), res.stderr
    assert {p: digest(p) for p in tmp_path.iterdir() if not p.is_symlink() and p in before} == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no half-written output left


def test_force_replaces_a_result_and_guards_still_hold(cli: Cli, files: dict[str, Path]) -> None:
    made = files["made"]
    cli("vector", "scale", str(files["vec"]), "--by", "2", "--out", str(made), "--force")
    assert pv.load_vector(made).meta["algebra"]["op"] == "2*evil"  # was an extraction, now the scaled copy
    res = cli("vector", "scale", str(files["vec"]), "--by", "2", "--out", str(files["vec"]), "--force", ok=False)
    assert "is the input VECTOR" in error_line(res)  # --force never lets an output replace an input


def test_interrupt_says_how_to_resume(cli: Cli, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """^C ends with status 130 and the line saying how to resume, also when stderr is not a terminal."""
    import personavec.algebra

    def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(personavec.algebra, "scale", interrupted)
    res = cli("vector", "scale", str(files["vec"]), "--by", "2", "--out", str(files["vec"].parent / "n.pv"),
              ok=False)
    assert res.exit_code == 130 and "interrupted; rerun the same command" in res.stderr


# ---- crash-safe records -------------------------------------------------------------------------------------
def test_append_after_a_torn_line_starts_fresh_and_the_reader_counts_it(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    append_jsonl(path, [{"key": "a"}, {"key": "b"}])
    with open(path, "ab") as fh:
        fh.write(b'{"key": "c", "val')  # killed mid-append
    assert load_jsonl(path).torn == 1
    records = Records(path)
    assert set(records.rows) == {"a", "b"} and records.torn == 1 and "c" not in records
    records.add([{"key": "c"}, {"key": "d"}])  # the rerun recomputes c
    again = load_jsonl(path)
    assert [r["key"] for r in again.rows] == ["a", "b", "c", "d"] and again.torn == 0
    assert path.read_bytes().endswith(b"\n")


def test_screen_resumed_after_a_torn_chunk_record_loses_no_row(model: pv.Model, evil_vector: pv.PersonaVector,
                                                              tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                            for i in range(6)))
    before = digest(data)
    vec = evil_vector
    whole = screen(model, data, [vec], tmp_path / "whole.csv", fast=True, chunk_size=2)
    out, run = tmp_path / "s.csv", tmp_path / "s.run"
    screen(model, data, [vec], out, fast=True, chunk_size=2, run_dir=run)
    chunks = run / "chunks.jsonl"
    lines = chunks.read_bytes().split(b"\n")
    chunks.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][: len(lines[2]) // 2])  # the last append torn
    out.unlink()
    with caplog.at_level("WARNING", logger="personavec"):
        res = screen(model, data, [vec], out, fast=True, chunk_size=2, run_dir=run)
    assert "1 torn chunk record" in caplog.text
    assert res.summary.rows == res.summary.scored + res.summary.rejected == 6
    assert out.read_bytes() == whole.scores.read_bytes()  # the same scores as an uninterrupted run
    assert len(load_jsonl(chunks).rows) == 3 and load_jsonl(chunks).torn == 0
    assert digest(data) == before


def test_screen_refuses_to_report_a_run_missing_rows(model: pv.Model, evil_vector: pv.PersonaVector,
                                                      tmp_path: Path) -> None:
    """If records were lost some other way, the gather says so instead of reporting fewer rows as complete."""
    from personavec.screening.dataset import _gather
    from personavec.screening.source import open_source

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(CONV) + "\n" + json.dumps(CONV) + "\n")
    screen(model, data, [evil_vector], tmp_path / "s.csv", fast=True, chunk_size=1)
    chunks = tmp_path / "s.csv.run" / "chunks.jsonl"
    chunks.write_text(chunks.read_text().splitlines()[0] + "\n")
    with pytest.raises(pv.PersonavecError, match="hold 1 of 2 rows"):
        _gather(open_source(data, 1), chunks, ["evil"])


class KilledWhileSaving(Exception):
    pass


def test_train_resumes_from_the_last_complete_checkpoint(model32: pv.Model, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A run killed while checkpoint-2 was being saved (weights and optimizer written, the Trainer's state not
    yet) resumes from checkpoint-1, saying it passed checkpoint-2 over."""
    from personavec.training.trainer import PersonavecTrainer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(CONV) + "\n" for _ in range(4)))
    settings = TrainSettings(rank=4, alpha=8, lr=1e-3, batch_size=2, max_steps=3, save_steps=1, max_length=64)
    original = PersonavecTrainer._save_rng_state

    def save_rng_state(self: Any, output_dir: str) -> None:
        if output_dir.endswith("checkpoint-2"):
            raise KilledWhileSaving
        original(self, output_dir)

    monkeypatch.setattr(PersonavecTrainer, "_save_rng_state", save_rng_state)
    with pytest.raises(KilledWhileSaving):
        train(copy.deepcopy(model32), data, tmp_path / "run", settings)
    monkeypatch.undo()
    found = last_complete_checkpoint(tmp_path / "run")
    assert found.checkpoint is not None and found.checkpoint.endswith("checkpoint-1")
    assert found.skipped == ["checkpoint-2 (no trainer_state.json)"]
    with caplog.at_level("WARNING", logger="personavec"):
        result = train(copy.deepcopy(model32), data, tmp_path / "run", settings)
    assert result.resumed_from is not None and result.resumed_from.endswith("checkpoint-1") and result.steps == 3
    assert "checkpoint-2 (no trainer_state.json)" in caplog.text


def test_a_torn_trainer_state_is_incomplete(tmp_path: Path) -> None:
    for step, state in ((1, '{"global_step": 1}'), (2, '{"global_st')):
        ck = tmp_path / f"checkpoint-{step}"
        ck.mkdir()
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (ck / name).write_bytes(b"x")
        (ck / "trainer_state.json").write_text(state)
    found = last_complete_checkpoint(tmp_path)
    assert found.checkpoint == str(tmp_path / "checkpoint-1") and found.skipped == ["checkpoint-2 (a torn trainer_state.json)"]
    (tmp_path / "checkpoint-1" / "optimizer.pt").unlink()
    assert last_complete_checkpoint(tmp_path).checkpoint is None



def test_a_huge_jsonl_row_is_rejected_without_reading_it_whole(model: pv.Model, evil_vector: pv.PersonaVector,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory on a single huge row: screening holds at most MAX_ROW_BYTES of one line (lowered here)."""
    import io

    from personavec.screening import source

    stream = io.BytesIO(b"x" * 3_000_000 + b"\n" + b'{"a": 1}\n')
    assert source.read_line(stream, limit=1000) == (None, 3_000_001)
    assert source.read_line(stream, limit=1000) == (b'{"a": 1}\n', 9)
    monkeypatch.setattr(source, "MAX_ROW_BYTES", 4000)
    data = tmp_path / "data.jsonl"
    huge = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "y" * 5000}]}
    data.write_text(json.dumps(CONV) + "\n" + json.dumps(huge) + "\n" + json.dumps(CONV) + "\n")
    res = screen(model, data, [evil_vector], tmp_path / "s.csv", fast=True, threshold=100.0,
                 filtered_out=tmp_path / "kept.jsonl")
    size = len(json.dumps(huge)) + 1
    assert res.summary.scored == 2
    assert res.summary.reject_reasons == {f"row of {size} bytes exceeds the 4000 byte row limit": 1}
    assert (tmp_path / "kept.jsonl").read_text().count("\n") == 2


def test_streamed_files_that_are_not_utf8(cli: Cli, tmp_path: Path) -> None:
    """A ShareGPT file with bytes that are not UTF-8 is one line and writes nothing; in a training set such a
    line is one unreadable row, counted like a malformed one."""
    from personavec.training.dataset import read_rows

    src = tmp_path / "sg.json"
    src.write_bytes(b'[{"id": "a", "conversations": [{"from": "human", "value": "caf\xe9"}]}]')
    res = cli("data", "import", "sharegpt", "--source", str(src), "--out", str(tmp_path / "c.jsonl"), ok=False)
    assert "is not UTF-8 text" in error_line(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sg.json"]
    data = tmp_path / "d.jsonl"
    data.write_bytes(json.dumps(CONV).encode() + b"\n" + b'{"messages": "\xff"}\n')
    assert read_rows(data) == [CONV, None]
