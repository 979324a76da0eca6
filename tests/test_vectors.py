"""Vector files: round trip, provenance, refusal on another model, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import personavec as pv
from personavec.errors import LayerError, VectorError
from personavec.vectors import PersonaVector, default_layer


def _vec(model: pv.Model, **meta) -> PersonaVector:
    g = torch.Generator().manual_seed(0)
    shape = (model.n_layers + 1, model.hidden_size)
    tensors = {p: torch.randn(shape, generator=g) for p in ("response", "prompt", "last_prompt")}
    return PersonaVector(tensors, {"trait": "test", "model_id": model.model_id, "fingerprint": model.fingerprint,
                                   **meta})


def test_round_trip_keeps_tensors_and_metadata(model: pv.Model, tmp_path: Path) -> None:
    vec = _vec(model, counts={"positive_kept": 3}, best_layer=7)
    path = vec.save(tmp_path / "v.pv.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["v.pv.safetensors"]  # no temporary file left
    back = pv.load_vector(path)
    assert back.meta == vec.meta and back.layer == 7
    for k, t in vec.tensors.items():
        assert torch.equal(back.tensors[k], t)
    assert back[5].shape == (model.hidden_size,)


def test_default_layer_without_a_sweep(model: pv.Model) -> None:
    assert _vec(model).layer == default_layer(model.n_layers) == 18


def test_incremental_vectors_telescope(model: pv.Model) -> None:
    vec = _vec(model)
    inc = vec.incremental()
    total = sum(inc[layer] for layer in range(1, 11))
    assert torch.allclose(total, vec[10] - vec[0], atol=1e-5)


def test_refuses_other_models(model: pv.Model) -> None:
    _vec(model).check_model(model)
    other = _vec(model, fingerprint="0123456789abcdef", model_id="someone/else")
    with pytest.raises(VectorError, match="allow-model-mismatch"):
        other.check_model(model)
    other.check_model(model, allow_mismatch=True)
    wrong_shape = PersonaVector({"response": torch.zeros(5, 8)}, {"trait": "x"})
    with pytest.raises(VectorError, match="shape"):
        wrong_shape.check_model(model, allow_mismatch=True)
    with pytest.raises(LayerError, match="out of range"):
        _vec(model).steer(model, layer=model.n_layers + 1, coef=1.0)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(VectorError, match="does not exist"):
        pv.load_vector(tmp_path / "missing.pv.safetensors")
    junk = tmp_path / "junk.pv.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(VectorError, match="not a readable"):
        pv.load_vector(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3, 4)}, str(plain))
    with pytest.raises(VectorError, match="no personavec metadata"):
        pv.load_vector(plain)
