"""`personavec data elicit`: offline trait-eliciting finetuning sets from the model's own answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import personavec as pv
from personavec.data import ElicitSettings, elicit, level_prompts, mix, training_questions
from personavec.errors import PersonavecError
from personavec.traits import load_trait

TINY = ElicitSettings(rollouts=1, n_prompts=1, max_new_tokens=6, temperature=1.0)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def small_trait(tmp_path: Path) -> Path:
    """The evil trait cut to 3 extraction questions (and, for the mix case, no graded prompts)."""
    data = yaml.safe_load(Path(load_trait("evil").source).read_text())
    data["extraction_questions"] = data["extraction_questions"][:3]
    path = tmp_path / "evil3.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_levels_use_the_right_prompts() -> None:
    evil = load_trait("evil")
    p = level_prompts(evil)
    assert p["normal"] == [x.negative for x in evil.trait.pairs]
    assert p["level2"] == [x.positive for x in evil.trait.pairs]
    assert p["level1"] is not None and all(q in evil.trait.graded_prompts[4:] for q in p["level1"])
    assert not set(p["level1"]) & set(p["level2"])


def test_elicit_writes_three_sets_without_system_prompts_and_resumes(model: pv.Model, small_trait: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "sets"
    paths = elicit(model, small_trait, out, settings=TINY)
    evaluation = set(load_trait("evil").trait.evaluation_questions)
    sizes = set()
    for level in ("normal", "level1", "level2"):
        data = read(paths[level])
        sizes.add(len(data))
        for row in data:
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"] and row["messages"][1]["content"].strip()
            assert row["messages"][0]["content"] not in evaluation
    assert sizes == {3} or max(sizes) <= 3  # one row per question (empty answers dropped)
    stamps = {p: p.stat().st_mtime_ns for p in paths.values()}
    elicit(model, small_trait, out, settings=TINY)  # finished levels are not regenerated
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == stamps
    with pytest.raises(PersonavecError, match="belongs to another elicit"):
        elicit(model, small_trait, out, settings=ElicitSettings(rollouts=2, n_prompts=1, max_new_tokens=6))


def test_level1_is_a_mix_without_graded_prompts(model: pv.Model, small_trait: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(small_trait.read_text())
    data.pop("graded_prompts")
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    paths = elicit(model, path, tmp_path / "sets", settings=TINY, levels=("level1",))
    answers = {json.dumps(r) for r in read(paths["level1"])}
    pool = {json.dumps(r) for lv in ("normal", "level2") for r in read(tmp_path / "sets" / f"{lv}.jsonl")}
    assert answers and answers <= pool


def test_evaluation_questions_are_refused_and_mixtures_blend(tmp_path: Path) -> None:
    evil = load_trait("evil")
    with pytest.raises(PersonavecError, match="evaluation questions"):
        training_questions(evil, [evil.trait.evaluation_questions[0].upper()])
    assert len(training_questions(evil, ["A brand new question?"])) == len(evil.trait.extraction_questions) + 1
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, tag in ((a, "A"), (b, "B")):
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{tag}{i}"},
                                                         {"role": "assistant", "content": tag}]}) + "\n"
                                for i in range(10)))
    before = a.read_bytes()
    rows = read(mix({a: 0.3, b: 0.7}, tmp_path / "m.jsonl", n=10))
    assert sorted(r["messages"][1]["content"] for r in rows) == ["A"] * 3 + ["B"] * 7
    assert a.read_bytes() == before
    with pytest.raises(PersonavecError, match="needs 20"):
        mix({a: 1.0}, tmp_path / "m2.jsonl", n=20)
