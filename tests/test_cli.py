"""The command line as a user meets it: real subprocesses, real files, exit status 2 and one line for
every bad input, and no partial output file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import personavec as pv
from personavec.traits import load_trait

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "personavec.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def my_trait(tmp_path: Path) -> Path:
    data = yaml.safe_load(Path(load_trait("impolite").source).read_text())
    data["name"] = "rude"
    path = tmp_path / "rude.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_help_and_trait_listing() -> None:
    assert run("--help").returncode == 0
    proc = run("traits", "list")
    assert proc.returncode == 0 and "sycophantic" in proc.stdout
    shown = run("traits", "show", "evil")
    assert shown.returncode == 0 and "evaluation_questions" in shown.stdout


@pytest.mark.slow
def test_users_own_trait_end_to_end(my_trait: Path, tmp_path: Path) -> None:
    before = my_trait.read_bytes()
    out = tmp_path / "rude.pv.safetensors"
    proc = run("extract", "--trait", str(my_trait), "--out", str(out), "--n-questions", "2", "--n-pairs", "5",
               "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert my_trait.read_bytes() == before  # inputs are never modified
    vec = pv.load_vector(out)
    assert vec.trait == "rude" and vec.tensors["response"].shape == (31, 576)
    assert (tmp_path / "rude.pv.safetensors.run" / "rollouts.jsonl").exists()
    info = run("vector", "info", str(out))
    assert info.returncode == 0 and "rude" in info.stdout and "fingerprint" in info.stdout
    gen = run("generate", "--vector", str(out), "--coef", "-2", "--coef", "0", "--coef", "2", "--max-new-tokens", "8",
              "Say hello.")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.count("coef") == 3 and "layer 18" in gen.stdout
    ev = run("eval", "--trait", str(my_trait), "--out", str(tmp_path / "eval"), "--vector", str(out), "--coef", "-2,0,2",
             "--n-questions", "2", "--max-new-tokens", "8", "--control", "random", "--half", "second")
    assert ev.returncode == 0, ev.stderr
    assert "trait (reference)" in ev.stdout and "random0" in ev.stdout
    # header + 3 conditions of the vector + the 2 steered conditions of the random control
    assert (tmp_path / "eval" / "cells.csv").read_text().count("\n") == 6
    rep = run("report", str(tmp_path / "eval"))
    assert rep.returncode == 0 and (tmp_path / "eval" / "report.html").exists()
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "random0" in page and "reference" in page
    assert_user_error(run("report", str(tmp_path / "nothing-here")), "cells.csv")
    assert_user_error(run("eval", "--trait", "evil", "--out", str(tmp_path / "e2"), "--coef", "1"), "--vector")
    assert_user_error(run("eval", "--trait", "evil", "--out", str(tmp_path / "e3"), "--control", "random"), "--vector")
    assert_user_error(run("eval", "--trait", "evil", "--out", str(tmp_path / "e4"), "--half", "middle"), "--half")


def test_bad_inputs_fail_cleanly(tmp_path: Path, model: pv.Model) -> None:
    out = tmp_path / "never.pv.safetensors"
    # trait problems are found before the model loads
    assert_user_error(run("extract", "--trait", str(tmp_path / "missing.yaml"), "--out", str(out)), "unknown trait")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npairs: [\n")
    assert_user_error(run("extract", "--trait", str(bad), "--out", str(out)), "not valid YAML")
    data = yaml.safe_load(Path(load_trait("evil").source).read_text())
    data["evaluation_questions"] = data["extraction_questions"][:3]
    overlap = tmp_path / "overlap.yaml"
    overlap.write_text(yaml.safe_dump(data))
    assert_user_error(run("extract", "--trait", str(overlap), "--out", str(out)), "overlap")
    # vectors that cannot apply, checked before the model loads where the file alone tells
    vec = pv.PersonaVector({"response": torch.ones(model.n_layers + 1, model.hidden_size)},
                           {"trait": "t", "model_id": model.model_id, "fingerprint": "feedfacefeedface"})
    vfile = vec.save(tmp_path / "other.pv.safetensors")
    assert_user_error(run("generate", "--vector", str(vfile), "--layer", "31", "hi"), "out of range")
    assert_user_error(run("generate", "--vector", str(vfile), "--coef", "nan", "hi"), "finite")
    assert_user_error(run("generate", "--vector", str(vfile), "--coef", "inf", "hi"), "finite")
    assert_user_error(run("generate", "--vector", str(vfile), "--max-new-tokens", "4", "hi"), "allow-model-mismatch")
    ok = run("generate", "--vector", str(vfile), "--allow-model-mismatch", "--max-new-tokens", "4", "hi")
    assert ok.returncode == 0, ok.stderr
    small = pv.PersonaVector({"response": torch.ones(5, 16)}, {"trait": "t"}).save(tmp_path / "small.pv.safetensors")
    assert_user_error(run("generate", "--vector", str(small), "--layer", "2", "--allow-model-mismatch", "hi"), "shape")
    assert_user_error(run("vector", "info", str(tmp_path / "nope.pv.safetensors")), "does not exist")
    assert_user_error(run("generate", "--model", "no-such-org/no-such-model", "hi"), "cannot load model")
    assert_user_error(run("generate"), "no prompts")
    # an unreachable judge stops the run before any rollout is generated
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    proc = run("extract", "--trait", "evil", "--out", str(out), "--judge", f"openai:judge@{url}")
    assert_user_error(proc, "unreachable")
    assert not out.exists()
    assert not (tmp_path / "never.pv.safetensors.run" / "rollouts.jsonl").exists()
