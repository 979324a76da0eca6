"""The `reference` measure (authored answers the vector never saw) and the controls beside it, on the
real embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import personavec as pv
from personavec.controls import make_controls, matched_norm, random_like
from personavec.errors import PersonavecError, TraitError
from personavec.evaluate import EvalSettings, question_indices, resolve_measure
from personavec.reference import reference_measure

HELD_OUT = question_indices(20, "second")[:4]  # questions 10-13: never used to choose anything below


def test_halves_are_disjoint_and_cover_the_questions() -> None:
    first, second = question_indices(20, "first"), question_indices(20, "second")
    assert first == list(range(10)) and second == list(range(10, 20))
    assert question_indices(7, "first") == [0, 1, 2, 3] and question_indices(7, "second", limit=2) == [4, 5]
    with pytest.raises(PersonavecError, match="--half"):
        EvalSettings(half="middle").validate()


def test_random_control_matches_norm_and_is_seeded(evil_vector) -> None:
    vec = evil_vector
    r0, r0b, r1 = random_like(vec, 0), random_like(vec, 0), random_like(vec, 1)
    for pos in vec.tensors:
        assert torch.allclose(r0.tensors[pos].norm(dim=1), vec.tensors[pos].float().norm(dim=1), rtol=1e-4)
        assert torch.equal(r0.tensors[pos], r0b.tensors[pos])
        assert not torch.equal(r0.tensors[pos], r1.tensors[pos])
    cos = torch.nn.functional.cosine_similarity(r0.at(20), vec.at(20).float(), dim=0)
    assert abs(float(cos)) < 0.2  # a random direction in 576 dimensions is nearly orthogonal
    other = matched_norm(random_like(vec, 5).with_meta(trait="other"), vec)
    assert torch.allclose(other.tensors["response"].norm(dim=1), vec.tensors["response"].float().norm(dim=1), rtol=1e-4)


def test_make_controls_names_and_errors(evil_vector, tmp_path: Path) -> None:
    vec = evil_vector
    path = random_like(vec, 9).with_meta(trait="impolite").save(tmp_path / "imp.pv.safetensors")
    ctrls = make_controls(["random", "random:3", str(path)], vec)
    assert list(ctrls) == ["random0", "random3", "impolite"]
    with pytest.raises(PersonavecError, match="integer"):
        make_controls(["random:x"], vec)


def test_measure_resolution() -> None:
    evil = pv.load_trait("evil").trait
    assert resolve_measure(evil, None) == "reference" and resolve_measure(evil, "contrast") == "contrast"
    bare = evil.model_copy(update={"references": []})
    assert resolve_measure(bare, "auto") == "contrast"
    with pytest.raises(PersonavecError, match="no references"):
        resolve_measure(bare, "reference")
    with pytest.raises(TraitError, match="no references"):
        reference_measure(None, bare)  # type: ignore[arg-type]


def test_reference_measure_follows_the_vector_not_a_random_direction(model: pv.Model, evil_vector) -> None:
    """On held-out evaluation questions the measure rises with +coef and falls with −coef; a random
    direction of the same per-layer norm moves it far less."""
    vec = evil_vector
    trait = pv.load_trait("evil").trait
    layer, c = 14, 4.0
    base = reference_measure(model, trait, HELD_OUT)
    assert [q.question_idx for q in base.questions] == HELD_OUT and base.se is not None

    def at(v: pv.PersonaVector, coef: float) -> float:
        with v.steer(model, layer=layer, coef=coef):
            m = reference_measure(model, trait, HELD_OUT).mean
        assert m is not None
        return m

    up, down = at(vec, c), at(vec, -c)
    assert down < base.mean < up  # type: ignore[operator]
    rnd = random_like(vec, 0)
    own_rise, random_rise = up - down, abs(at(rnd, c) - at(rnd, -c))
    assert own_rise > 3 * random_rise, (own_rise, random_rise)


def test_reference_measure_under_a_system_prompt(model: pv.Model) -> None:
    """The measure reads the model as it stands, prompt included: an evil persona prompt makes the authored
    evil answers likelier relative to the plain ones."""
    trait = pv.load_trait("evil").trait
    plain = reference_measure(model, trait, HELD_OUT).mean
    prompted = reference_measure(model, trait, HELD_OUT, system=trait.graded_prompts[-1]).mean
    assert prompted is not None and plain is not None and prompted > plain
