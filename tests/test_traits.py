"""Trait files: the built-in library and every way a user's file can be wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from personavec.errors import TraitError
from personavec.traits import builtin_traits, load_trait, normalize_question

PAPER_TRAITS = {"evil", "sycophantic", "hallucinating", "optimistic", "impolite", "apathetic", "humorous"}


def test_builtin_library_has_the_papers_seven_traits() -> None:
    assert set(builtin_traits()) >= PAPER_TRAITS


@pytest.mark.parametrize("name", sorted(PAPER_TRAITS))
def test_builtin_trait_shape(name: str) -> None:
    loaded = load_trait(name)
    t = loaded.trait
    assert t.name == name
    assert len(t.pairs) >= 5
    assert len(t.extraction_questions) == 20 and len(t.evaluation_questions) == 20
    assert not {normalize_question(q) for q in t.extraction_questions} & {
        normalize_question(q) for q in t.evaluation_questions}
    assert "{question}" in t.rubric and "{answer}" in t.rubric
    assert len(loaded.sha256) == 64
    # authored references: every evaluation question, 2 + 2 answers each
    assert [r.question for r in t.references] == t.evaluation_questions
    assert all(len(r.with_trait) >= 2 and len(r.without_trait) >= 2 for r in t.references)
    assert t.reference_for(3) is t.references[3]


def _write(tmp_path: Path, data: dict, name: str = "mine.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _valid() -> dict:
    return yaml.safe_load(Path(load_trait("evil").source).read_text())


def test_user_file_loads_and_is_not_modified(tmp_path: Path) -> None:
    data = _valid()
    data["name"] = "grumpy"
    p = _write(tmp_path, data)
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    loaded = load_trait(p)
    assert loaded.trait.name == "grumpy" and loaded.sha256 == before
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda d: d.update(pairs=d["pairs"][:3]), "at least 5"),
    (lambda d: d.update(evaluation_questions=[*d["evaluation_questions"], d["extraction_questions"][0]]), "overlap"),
    (lambda d: d.update(extraction_questions=[d["extraction_questions"][0]] * 2), "duplicate"),
    (lambda d: d.update(extraction_questions=[]), "at least one question"),
    (lambda d: d.pop("evaluation_questions"), "evaluation_questions"),
    (lambda d: d.update(rubric="Rate {answer} from 0 to 100"), "{question}"),
    (lambda d: d.update(name="Evil Trait!"), "lowercase"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d["references"][0].update(question="Is this an evaluation question?"), "not one of the evaluation"),
    (lambda d: d["references"].append(dict(d["references"][0])), "appears twice"),
    (lambda d: d["references"][1].update(with_trait=d["references"][1]["with_trait"][:1]), "at least 2 answers"),
    (lambda d: d["references"][2].update(without_trait=["Short.", "Also short."]), "match their lengths"),
    (lambda d: d["references"][3].update(with_trait=["", "x"]), "empty answer"),
    (lambda d: d["references"][4].pop("without_trait"), "without_trait"),
])
def test_bad_trait_files_give_one_line_errors(tmp_path: Path, mutate, needle: str) -> None:
    data = _valid()
    mutate(data)
    p = _write(tmp_path, data)
    with pytest.raises(TraitError) as info:
        load_trait(p)
    msg = str(info.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: evil\npairs: [\n")
    with pytest.raises(TraitError, match="not valid YAML at line"):
        load_trait(bad)
    with pytest.raises(TraitError, match="unknown trait"):
        load_trait(tmp_path / "nope.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(TraitError, match="expected a mapping"):
        load_trait(scalar)


def test_references_are_optional(tmp_path: Path) -> None:
    data = _valid()
    data.pop("references")
    assert load_trait(_write(tmp_path, data)).trait.references == []
