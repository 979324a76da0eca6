"""Hugging Face style folders: save_pretrained writes the vector file, config.json and a model card whose front
matter the hub reads (library_name, tags, base_model) and whose body states trait, model, layer with its numbering,
how the vector was made and what was measured; from_pretrained / PersonaVector.load read the folder back with
tensors and metadata unchanged; commands that take a vector take the folder. No network: the hub path is
exercised only with local_files_only (its one-line error), push_to_hub only up to its argument check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import Cli, error_line
from typer.testing import CliRunner

import personavec as pv
from personavec.cli import app
from personavec.errors import VectorError
from personavec.interop.pretrained import CARD_FILE, CONFIG_FILE, VECTOR_FILE, model_card
from personavec.vectors import LAYER_CONVENTION

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def swept_vector(n_layers: int = 30, hidden: int = 576, **extra: Any) -> pv.PersonaVector:
    g = torch.Generator().manual_seed(0)
    tensors = {p: torch.randn(n_layers + 1, hidden, generator=g) for p in ("response", "prompt", "last_prompt")}
    meta = {"trait": "evil", "model_id": MODEL_ID, "fingerprint": "0123456789abcdef", "n_layers": n_layers,
            "hidden_size": hidden, "layer_convention": LAYER_CONVENTION,
            "positions": ["response", "prompt", "last_prompt"], "judge": "contrast", "threshold": 0.0,
            "coherence_min": 50.0, "trait_sha256": "f" * 64, "trait_source": "/x/evil.yaml",
            "counts": {"positive_kept": 9, "positive_total": 10, "negative_kept": 8, "negative_total": 10},
            "version": "0.1.0", "created": "2025-08-01T00:00:00+00:00",
            "best_layer": 18, "best_coef": 4.0, "sweep_run": "/runs/sweep", "sweep_judge": "reference",
            "monitor": {"layer": 18, "position": "last_prompt", "threshold": 1.25, "balanced_accuracy": 0.875,
                        "heldout_balanced_accuracy": 0.8125, "r": 0.71, "measure": "reference", "n_answers": 64},
            **extra}
    return pv.PersonaVector(tensors, meta)


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    vec = swept_vector()
    folder = vec.save_pretrained(tmp_path / "evil-vector")
    assert sorted(p.name for p in folder.iterdir()) == sorted([VECTOR_FILE, CONFIG_FILE, CARD_FILE])
    for back in (pv.PersonaVector.from_pretrained(folder), pv.PersonaVector.load(folder),
                 pv.load_vector(str(folder)), pv.PersonaVector.load(folder / VECTOR_FILE)):
        assert list(back.tensors) == list(pv.PersonaVector.load(folder / VECTOR_FILE).tensors)
        assert all(torch.equal(back.tensors[p], vec.tensors[p]) for p in vec.tensors)
        assert back.meta == vec.meta and back.digest() == vec.digest()

    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["format"] == "personavec-pretrained" and cfg["vector_file"] == VECTOR_FILE
    assert cfg["trait"] == "evil" and cfg["model_id"] == MODEL_ID and cfg["layer"] == 18
    assert cfg["shape"] == [31, 576] and cfg["positions"] == ["response", "prompt", "last_prompt"]
    assert cfg["digest"] == vec.digest() and "output of decoder block L" in cfg["layer_convention"]

    card = (folder / CARD_FILE).read_text()
    front = front_matter(card)
    assert front["library_name"] == "personavec" and front["base_model"] == MODEL_ID
    assert {"personavec", "persona-vector", "steering-vector", "evil"} <= set(front["tags"])
    for needle in ("# Persona vector: evil (HuggingFaceTB/SmolLM2-135M-Instruct)",
                   "| trait | evil |", f"| model | {MODEL_ID} (weights fingerprint `0123456789abcdef`) |",
                   "| layer to steer | 18 (chosen by a sweep) |", "| positions | response, prompt, last_prompt |",
                   "index L = output of decoder block L (1-based)", "hook on block L−1", "`--layer 18`",
                   "Judge: `contrast`, threshold 0", "Answers kept: 9/10 positive, 8/10 negative.",
                   "| sweep: chosen layer | 18 |", "| sweep: chosen coefficient | +4 |",
                   "| sweep: trait measure | reference |", "| monitor: balanced accuracy | 0.875 |",
                   "| monitor: held-out balanced accuracy | 0.8125 |", "| monitor: Pearson r, projection vs trait | 0.71 |",
                   "with vec.steer(model, layer=18, coef=4):", "arXiv:2507.21509"):
        assert needle in card, needle
    assert model_card(vec) == card  # generated from the vector alone: the same vector, the same card


def test_card_of_an_unswept_vector_on_a_local_model(tmp_path: Path) -> None:
    vec = pv.PersonaVector({"response": torch.ones(5, 8)}, {"trait": "tiny", "model_id": "my-local-model"})
    folder = vec.save_pretrained(tmp_path / "tiny", repo_id="someone/tiny-vector")
    card = (folder / CARD_FILE).read_text()
    assert "base_model" not in front_matter(card)  # not a hub id: the hub would reject it
    assert "| layer to steer | 2 (default: about 60% of the depth; no sweep recorded) |" in card
    assert "No measurements are recorded" in card and "does not say how this vector was made" in card
    assert 'PersonaVector.from_pretrained("someone/tiny-vector")' in card
    back = pv.PersonaVector.from_pretrained(folder)
    assert torch.equal(back.tensors["response"], vec.tensors["response"]) and back.meta == vec.meta


def test_saving_into_a_folder_rewrites_vector_and_card(tmp_path: Path) -> None:
    """What sweep and monitor-eval --write-threshold do with a vector path: save(path) — a folder stays a folder."""
    vec = pv.PersonaVector({"response": torch.ones(31, 16)}, {"trait": "evil", "model_id": MODEL_ID})
    folder = vec.save_pretrained(tmp_path / "v")
    (folder / "notes.txt").write_text("mine")
    pv.PersonaVector.load(folder).with_meta(best_layer=12, best_coef=2.0, sweep_run="r", sweep_judge="contrast") \
        .save(folder)
    back = pv.PersonaVector.load(folder)
    assert back.layer == 12 and back.meta["best_coef"] == 2.0
    assert "| sweep: chosen layer | 12 |" in (folder / CARD_FILE).read_text()
    assert json.loads((folder / CONFIG_FILE).read_text())["layer"] == 12
    assert (folder / "notes.txt").read_text() == "mine"  # other files are left alone


def test_bad_folders_and_ids_give_one_line(tmp_path: Path) -> None:
    vec = swept_vector(n_layers=4, hidden=8)
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    with pytest.raises(VectorError, match="is a file; save_pretrained writes a folder"):
        vec.save_pretrained(not_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    model_dir = tmp_path / "a-model"
    model_dir.mkdir()
    (model_dir / CONFIG_FILE).write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text("{nope")
    lost = vec.save_pretrained(tmp_path / "lost")
    (lost / VECTOR_FILE).unlink()
    cases = [
        (lambda: pv.PersonaVector.load(empty), "without config.json and vector.pv.safetensors"),
        (lambda: pv.PersonaVector.load(model_dir), "not a personavec folder"),
        (lambda: pv.PersonaVector.load(broken), "is not valid JSON"),
        (lambda: pv.PersonaVector.from_pretrained(lost), "lacks its vector file vector.pv.safetensors"),
        (lambda: pv.PersonaVector.from_pretrained("no such/thing here"), "neither an existing folder nor a hub id"),
        (lambda: pv.PersonaVector.from_pretrained("personavec-test/does-not-exist", cache_dir=str(tmp_path / "hub"),
                                                  local_files_only=True), "the hub download failed"),
        (lambda: vec.push_to_hub("not a repo id"), "is not a hub id like 'owner/name'"),
    ]
    for call, needle in cases:
        with pytest.raises(VectorError, match=needle) as info:
            call()
        assert "\n" not in str(info.value)


def test_cli_export_pretrained_and_folder_as_vector(cli: Cli, tmp_path: Path) -> None:
    src = swept_vector().save(tmp_path / "evil.pv.safetensors")
    runner = CliRunner(env={"COLUMNS": "400"})
    res = runner.invoke(app, ["vector", "export", str(src), "--out", str(tmp_path / "evil-vec")])
    assert res.exit_code == 0, res.output
    assert "vector.pv.safetensors, config.json and README.md" in res.output
    folder = tmp_path / "evil-vec"
    assert "library_name: personavec" in (folder / CARD_FILE).read_text()
    res = runner.invoke(app, ["vector", "info", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["meta"]["best_layer"] == 18
    # the folder goes wherever a vector file goes: back out to GGUF, to the reference's .pt files, into algebra
    res = runner.invoke(app, ["vector", "export", str(folder), "--out", str(tmp_path / "evil.gguf"), "--layer", "18"])
    assert res.exit_code == 0 and "L18 -> direction.17" in res.output
    res = runner.invoke(app, ["vector", "export", str(folder), "--format", "reference", "--out", str(tmp_path / "ref")])
    assert res.exit_code == 0, res.output
    assert torch.equal(torch.load(tmp_path / "ref" / "evil_response_avg_diff.pt", weights_only=True),
                       pv.PersonaVector.load(src).tensors["response"])
    res = runner.invoke(app, ["vector", "scale", str(folder), "--by", "2", "--out", str(tmp_path / "x2.pv.safetensors")])
    assert res.exit_code == 0, res.output

    res = runner.invoke(app, ["vector", "export", str(src), "--format", "pretrained", "--layer", "3",
                              "--out", str(tmp_path / "d")])
    assert res.exit_code != 0 and "apply to --format gguf" in str(res.exception)
    res = runner.invoke(app, ["vector", "export", str(src), "--format", "zip", "--out", str(tmp_path / "d")])
    assert res.exit_code != 0 and "use gguf, pretrained or reference" in str(res.exception)
    res = runner.invoke(app, ["vector", "export", str(src), "--out", str(tmp_path / "evil.bin")])
    assert res.exit_code != 0 and "cannot tell the format" in str(res.exception)
    res = runner.invoke(app, ["vector", "push", str(folder), "no-owner"])
    assert res.exit_code != 0 and "not a hub id like 'owner/name'" in str(res.exception)

    assert "is a folder without config.json" in error_line(cli("vector", "info", str(tmp_path), ok=False))
