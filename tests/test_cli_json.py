"""`--json` on every command that prints a result: stdout is exactly one JSON document built from the
command's result (progress and notes go to stderr), `-q` silences progress, and `trait` still spells the
`traits` group. In-process through conftest's `cli` (the console script's entry run by click's test runner, on
the session's embedded models); tiny budgets (one question, a few tokens)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import Result
from conftest import Cli as Invoke
from conftest import largest_rise

import personavec as pv
from personavec.traits import load_trait


def doc(res: Result) -> Any:
    """The one JSON document on stdout (json.loads fails on anything else there)."""
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli_json")


@pytest.fixture(scope="module")
def vec_file(model: pv.Model, folder: Path) -> Path:
    """A seeded random 'evil' vector made for the session's model (every position; layer 10 chosen)."""
    g = torch.Generator().manual_seed(0)
    tensors = {p: torch.randn(model.n_layers + 1, model.hidden_size, generator=g) * 0.2
               for p in ("response", "prompt", "last_prompt")}
    meta = {"trait": "evil", "model_id": model.model_id, "fingerprint": model.fingerprint, "best_layer": 10}
    return pv.PersonaVector(tensors, meta).save(folder / "evil.pv.safetensors")


# ---- no model ----------------------------------------------------------------------------------------------
def test_traits_list_and_show(cli: Invoke) -> None:
    listed = doc(cli("traits", "list", "--json"))["traits"]
    evil = next(t for t in listed if t["name"] == "evil")
    trait = load_trait("evil").trait
    assert evil["evaluation_questions"] == len(trait.evaluation_questions) and evil["pairs"] == len(trait.pairs)
    shown = doc(cli("traits", "show", "evil", "--json"))
    assert shown["trait"]["name"] == "evil" and len(shown["sha256"]) == 64
    assert shown["trait"]["evaluation_questions"] == trait.evaluation_questions


def test_trait_alias_spelling_still_works(cli: Invoke) -> None:
    assert doc(cli("trait", "show", "evil", "--json"))["trait"]["name"] == "evil"
    top = cli("--help").stdout
    assert "traits" in top and "│ trait " not in top  # the alias is hidden
    assert "--install-completion" in top and "--show-completion" in top and "--quiet" in top


def test_vector_info_algebra_and_compare(cli: Invoke, vec_file: Path, model: pv.Model, folder: Path) -> None:
    info = doc(cli("vector", "info", str(vec_file), "--json"))
    assert info["shape"] == [model.n_layers + 1, model.hidden_size]
    assert len(info["norms"]["response"]) == model.n_layers + 1 and info["meta"]["trait"] == "evil"
    scaled = doc(cli("vector", "scale", str(vec_file), "--by", "-2", "--out", str(folder / "neg.pv.safetensors"),
                     "--json"))
    assert scaled["op"] == "-2*evil" and scaled["shape"] == info["shape"] and Path(scaled["out"]).is_file()
    added = doc(cli("vector", "add", str(vec_file), scaled["out"], "--out", str(folder / "sum.pv.safetensors"),
                    "--json"))
    assert added["op"].count("evil") == 2 and added["algebra"]["op"] == added["op"]
    cmp = doc(cli("vector", "compare", str(vec_file), scaled["out"], "--layer", "3,10", "--json"))
    assert [c["layer"] for c in cmp["layers"]] == [3, 10] and cmp["by_layer"] is None
    assert cmp["layers"][1]["cosine"][0][1] == pytest.approx(-1.0, abs=1e-5)  # the vector against −2× itself


def test_vector_export_and_import(cli: Invoke, vec_file: Path, model: pv.Model, folder: Path) -> None:
    gguf = doc(cli("vector", "export", str(vec_file), "--out", str(folder / "evil.gguf"), "--layer", "10",
                   "--coef", "2", "--json"))
    assert gguf["format"] == "gguf" and gguf["layers"] == [{"layer": 10, "direction": 9}] and gguf["coef"] == 2
    back = doc(cli("vector", "import", gguf["out"], "--out", str(folder / "back.pv.safetensors"), "--json"))
    assert back["layers"] == [10] and back["shape"] == [model.n_layers + 1, model.hidden_size]
    pretrained = doc(cli("vector", "export", str(vec_file), "--out", str(folder / "evil-folder"), "--json"))
    assert pretrained["format"] == "pretrained" and all(Path(f).is_file() for f in pretrained["files"])


def test_traits_import_and_new(cli: Invoke, folder: Path) -> None:
    from chat_fake import ScriptedChat
    from openai_fake import serve
    from test_interop_reference import write_reference_traits
    from test_traitgen import DESCRIPTION, fenced, payload

    write_reference_traits(folder / "ref")
    imported = doc(cli("traits", "import", str(folder / "ref"), "--out", str(folder / "grumpy.yaml"), "--json"))
    assert imported["name"] == "grumpy" and imported["pairs"] == 5 and imported["evaluation_questions"] == 2
    fake = ScriptedChat([fenced(payload())])
    with serve(fake):  # type: ignore[arg-type]
        new = doc(cli("traits", "new", "overconfident", "--description", DESCRIPTION, "--api-key", "test-key",
                      "--generator", f"openai:frontier@{fake.url}", "--out", str(folder / "oc.yaml"), "--json"))
    assert new["attempts"] == 1 and new["pairs"] == 5 and load_trait(new["out"]).trait.name == "overconfident"


def test_data_import_sharegpt(cli: Invoke, folder: Path) -> None:
    from test_sharegpt import _write_truncated

    _write_truncated(folder / "slice.json")
    s = doc(cli("data", "import", "sharegpt", "--source", str(folder / "slice.json"), "--out",
                str(folder / "sg.jsonl"), "--json"))
    assert s["written"] == len((folder / "sg.jsonl").read_text().splitlines()) and s["truncated"] is True


# ---- on the model ------------------------------------------------------------------------------------------
def test_generate_and_quiet(cli: Invoke, vec_file: Path) -> None:
    res = cli("generate", "Say hello.", "Name a colour.", "--vector", str(vec_file), "--coef", "-2", "--coef", "0",
              "--max-new-tokens", "3", "--json")
    g = doc(res)
    assert g["coefs"] == [-2.0, 0.0] and g["layer"] == 10 and g["trait"] == "evil"
    assert [p["prompt"] for p in g["prompts"]] == ["Say hello.", "Name a colour."]
    assert [a["coef"] for a in g["prompts"][0]["answers"]] == [-2.0, 0.0]
    assert "coef -2" in res.stderr  # progress goes to stderr
    quiet = cli("-q", "generate", "Say hello.", "--max-new-tokens", "3", "--json")
    assert quiet.stderr == "" and doc(quiet)["coefs"] == [0.0] and doc(quiet)["layer"] is None
    plain = cli("-q", "generate", "Say hello.", "--max-new-tokens", "3")
    assert plain.stderr == "" and "answer:" in plain.stdout


def test_extract(cli: Invoke, model: pv.Model, folder: Path) -> None:
    out = folder / "x.pv.safetensors"
    e = doc(cli("extract", "--trait", "evil", "--out", str(out), "--n-questions", "1", "--n-pairs", "1",
                "--max-new-tokens", "4", "--json"))
    assert e["n_layers"] == model.n_layers and e["shape"] == [model.n_layers + 1, model.hidden_size]
    assert e["counts"]["positive_total"] == 1 and Path(e["out"]).is_file() and Path(e["run_dir"]).is_dir()


def test_eval_sweep_and_report(cli: Invoke, vec_file: Path, folder: Path) -> None:
    run = folder / "eval"
    ev = doc(cli("eval", "--trait", "evil", "--out", str(run), "--vector", str(vec_file), "--coef", "0,3",
                 "--n-questions", "1", "--max-new-tokens", "4", "--json"))
    assert sorted(c["coef"] for c in ev["cells"]) == [0.0, 3.0]
    assert all(c["n"] == 1 and c["measure"] == "reference" for c in ev["cells"])
    assert next(c for c in ev["cells"] if c["coef"] == 3.0)["layer"] == 10
    assert Path(ev["files"]["cells"]).is_file()
    rep = doc(cli("report", str(run), "--json"))
    assert Path(rep["report"]).name == "report.html" and Path(rep["report"]).is_file()
    sw = doc(cli("sweep", "--vector", str(vec_file), "--trait", "evil", "--out", str(folder / "sweep"),
                 "--layers", "8,12", "--coefs", "0,4", "--n-questions", "1", "--max-new-tokens", "4",
                 "--no-update-vector", "--json"))
    # which layer wins, recomputed from the cells: the larger rise of the trait measure over coefficient 0
    best, rise = largest_rise(sw["cells"])
    assert sw["choice"]["best_layer"] == best["layer"] and sw["choice"]["best_coef"] == best["coef"] == 4.0
    assert sw["choice"]["trait_change"] == pytest.approx(rise, abs=1e-5) and sw["vector_updated"] is False
    assert {(c["layer"], c["coef"]) for c in sw["cells"] if c["coef"] != 0} == {(8, 4.0), (12, 4.0)}


def test_monitor_eval(cli: Invoke, vec_file: Path, folder: Path) -> None:
    m = doc(cli("monitor-eval", "--vector", str(vec_file), "--trait", "evil", "--out", str(folder / "mon"),
                "--n-questions", "1", "--max-new-tokens", "4", "--condition", "many_shot", "--shots", "0,1,2",
                "--shot-tokens", "6", "--temperature", "0", "--no-judge-free", "--json"))
    assert m["layer"] == 10 and m["n_points"] == 3 and m["threshold_written"] is False
    assert "overall" in m["pearson"]["trait_score"] and Path(m["files"]["results.json"]).is_file()


def test_screen(cli: Invoke, vec_file: Path, folder: Path) -> None:
    data = folder / "convs.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me a fact ({i})."},
                                                     {"role": "assistant", "content": "Water boils at 100 C."}]})
                            + "\n" for i in range(2)))
    s = doc(cli("screen", str(data), "--vector", str(vec_file), "--out", str(folder / "scores.csv"), "--fast",
                "--threshold", "evil=0", "--no-histograms", "--json"))
    assert s["summary"]["scored"] == 2 and s["summary"]["traits"]["evil"]["layer"] == 10
    assert Path(s["scores"]).is_file()


def test_data_elicit(cli: Invoke, folder: Path) -> None:
    data = yaml.safe_load(Path(load_trait("evil").source).read_text())
    data["name"] = "tiny-evil"
    data["extraction_questions"] = data["extraction_questions"][:5]
    path = folder / "tiny-evil.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    e = doc(cli("data", "elicit", "--trait", str(path), "--out", str(folder / "elicit"), "--rollouts", "1",
                "--n-prompts", "1", "--max-new-tokens", "4", "--json"))
    assert set(e["levels"]) == {"normal", "level1", "level2"}
    assert all(v["rows"] == len(Path(v["path"]).read_text().splitlines()) for v in e["levels"].values())


@pytest.mark.slow
def test_train_and_shift(cli: Invoke, vec_file: Path, folder: Path, model: pv.Model) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Name a colour ({i})."},
                          {"role": "assistant", "content": "Crimson."}]} for i in range(2)]
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = doc(cli("train", str(data), "--out", str(folder / "adapter"), "--max-steps", "1", "--batch-size", "2",
                "--rank", "4", "--save-steps", "1", "--json"))  # float32: a fresh model, not the session's
    assert t["steps"] == 1 and t["dataset"]["kept"] == 2 and math.isfinite(t["last_loss"])
    s = doc(cli("shift", "--adapter", str(folder / "adapter"), "--vector", str(vec_file), "--n-questions", "1",
                "--json"))
    assert len(s["per_layer"]) == model.n_layers + 1 and s["layer"] == 10


def test_json_errors_are_one_line_and_status_2(vec_file: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "personavec.cli", "eval", "--trait", "evil", "--out", "x",
                           "--coef", "1", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stdout == ""
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == ["error: --coef needs --vector"]
