"""The command line as a user meets it, in-process through the console script's own entry (conftest's `cli`,
on the session's model): real files, exit status 2 and one line for every bad input, and no partial output
file. (That the installed `personavec` script and `python -m personavec.cli` reach this entry is checked in
real processes by test_algebra and test_cli_json.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Cli, assert_user_error, visible_text

import personavec as pv
from personavec.traits import load_trait


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


def test_help_and_trait_listing(cli: Cli) -> None:
    assert cli("--help").exit_code == 0
    proc = cli("traits", "list")
    assert proc.exit_code == 0 and "sycophantic" in proc.stdout
    shown = cli("traits", "show", "evil")
    assert shown.exit_code == 0 and "evaluation_questions" in shown.stdout


@pytest.mark.slow
def test_users_own_trait_end_to_end(cli: Cli, model: pv.Model, my_trait: Path, tmp_path: Path) -> None:
    before = my_trait.read_bytes()
    out = tmp_path / "rude.pv.safetensors"
    proc = cli("extract", "--trait", str(my_trait), "--out", str(out), "--n-questions", "2", "--n-pairs", "5",
               "--max-new-tokens", "12")
    assert proc.exit_code == 0, proc.stderr
    assert my_trait.read_bytes() == before  # inputs are never modified
    vec = pv.load_vector(out)
    assert vec.trait == "rude" and vec.tensors["response"].shape == (model.n_layers + 1, model.hidden_size)
    assert vec.meta["fingerprint"] == model.fingerprint  # extracted on the embedded default
    assert (tmp_path / "rude.pv.safetensors.run" / "rollouts.jsonl").exists()
    info = cli("vector", "info", str(out))
    assert info.exit_code == 0 and "rude" in info.stdout and "fingerprint" in info.stdout
    gen = cli("generate", "--vector", str(out), "--coef", "-2", "--coef", "0", "--coef", "2", "--max-new-tokens", "8",
              "Say hello.")
    assert gen.exit_code == 0, gen.stderr
    # no sweep yet: the vector steers at about 60% of the model's depth
    assert vec.layer == round(0.6 * model.n_layers)
    assert gen.stdout.count("coef") == 3 and f"layer {vec.layer}" in gen.stdout
    ev = cli("eval", "--trait", str(my_trait), "--out", str(tmp_path / "eval"), "--vector", str(out), "--coef", "-2,0,2",
             "--n-questions", "2", "--max-new-tokens", "8", "--control", "random", "--half", "second")
    assert ev.exit_code == 0, ev.stderr
    assert "trait (reference)" in ev.stdout and "random0" in ev.stdout
    # header + 3 conditions of the vector + the 2 steered conditions of the random control
    assert (tmp_path / "eval" / "cells.csv").read_text().count("\n") == 6
    rep = cli("report", str(tmp_path / "eval"))
    assert rep.exit_code == 0 and (tmp_path / "eval" / "report.html").exists()
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "random0" in visible_text(page) and "reference" in visible_text(page)
    assert_user_error(cli("report", str(tmp_path / "nothing-here"), ok=False), "cells.csv")
    assert_user_error(cli("eval", "--trait", "evil", "--out", str(tmp_path / "e2"), "--coef", "1", ok=False),
                      "--vector")
    assert_user_error(cli("eval", "--trait", "evil", "--out", str(tmp_path / "e3"), "--control", "random", ok=False),
                      "--vector")
    assert_user_error(cli("eval", "--trait", "evil", "--out", str(tmp_path / "e4"), "--half", "middle", ok=False),
                      "--half")


def test_bad_inputs_fail_cleanly(cli: Cli, tmp_path: Path, model: pv.Model) -> None:
    out = tmp_path / "never.pv.safetensors"
    # trait problems are found before the model loads
    assert_user_error(cli("extract", "--trait", str(tmp_path / "missing.yaml"), "--out", str(out), ok=False),
                      "unknown trait")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npairs: [\n")
    assert_user_error(cli("extract", "--trait", str(bad), "--out", str(out), ok=False), "not valid YAML")
    data = yaml.safe_load(Path(load_trait("evil").source).read_text())
    data["evaluation_questions"] = data["extraction_questions"][:3]
    overlap = tmp_path / "overlap.yaml"
    overlap.write_text(yaml.safe_dump(data))
    assert_user_error(cli("extract", "--trait", str(overlap), "--out", str(out), ok=False), "overlap")
    # vectors that cannot apply, checked before the model loads where the file alone tells
    vec = pv.PersonaVector({"response": torch.ones(model.n_layers + 1, model.hidden_size)},
                           {"trait": "t", "model_id": model.model_id, "fingerprint": "feedfacefeedface"})
    vfile = vec.save(tmp_path / "other.pv.safetensors")
    assert_user_error(cli("generate", "--vector", str(vfile), "--layer", str(model.n_layers + 1), "hi", ok=False),
                      "out of range")
    assert_user_error(cli("generate", "--vector", str(vfile), "--coef", "nan", "hi", ok=False), "finite")
    assert_user_error(cli("generate", "--vector", str(vfile), "--coef", "inf", "hi", ok=False), "finite")
    assert_user_error(cli("generate", "--vector", str(vfile), "--max-new-tokens", "4", "hi", ok=False),
                      "allow-model-mismatch")
    ok = cli("generate", "--vector", str(vfile), "--allow-model-mismatch", "--max-new-tokens", "4", "hi")
    assert ok.exit_code == 0, ok.stderr
    small = pv.PersonaVector({"response": torch.ones(5, 16)}, {"trait": "t"}).save(tmp_path / "small.pv.safetensors")
    assert_user_error(cli("generate", "--vector", str(small), "--layer", "2", "--allow-model-mismatch", "hi",
                          ok=False), "shape")
    assert_user_error(cli("vector", "info", str(tmp_path / "nope.pv.safetensors"), ok=False), "does not exist")
    assert_user_error(cli("generate", "--model", "no-such-org/no-such-model", "hi", ok=False), "cannot load model")
    assert_user_error(cli("generate", ok=False), "no prompts")
    # an unreachable judge stops the run before any rollout is generated
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    proc = cli("extract", "--trait", "evil", "--out", str(out), "--judge", f"openai:judge@{url}", ok=False)
    assert_user_error(proc, "unreachable")
    assert not out.exists()
    assert not (tmp_path / "never.pv.safetensors.run" / "rollouts.jsonl").exists()
