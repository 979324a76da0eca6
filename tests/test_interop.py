"""llama.cpp control vectors: the GGUF a personavec vector becomes (read back with the `gguf` reader as
llama.cpp reads it), the layer numbering checked on the real model (direction.k acts on the output of
0-based block k = personavec layer k + 1), value-exact round trips, repeng-style files, and bad files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from conftest import Cli, error_line

import personavec as pv
from personavec.errors import VectorError
from personavec.interop.gguf import (
    export_gguf,
    from_llama_cpp,
    import_gguf,
    read_control_vector,
    to_llama_cpp,
)
from personavec.models import embedded_gguf


def model_vector(model: pv.Model, seed: int = 0, scale: float = 4.0) -> pv.PersonaVector:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(model.n_layers + 1, model.hidden_size, generator=g)
    t = scale * t / t.norm(dim=1, keepdim=True)
    return pv.PersonaVector({"response": t, "prompt": -t}, {
        "trait": "evil", "model_id": model.model_id, "fingerprint": model.fingerprint,
        "n_layers": model.n_layers, "hidden_size": model.hidden_size, "best_layer": 18})


def field_value(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    part = f.parts[f.data[0]]
    return bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else part[0]


def test_numbering_conversion_bounds() -> None:
    assert [to_llama_cpp(L, 30) for L in (2, 18, 30)] == [1, 17, 29]
    assert [from_llama_cpp(k, 30) for k in (1, 17, 29)] == [2, 18, 30]
    for bad in (0, 1, 31):
        with pytest.raises(VectorError, match=r"2\.\.30"):
            to_llama_cpp(bad, 30)
    for bad in (0, 30):
        with pytest.raises(VectorError, match=r"direction.1..direction.29"):
            from_llama_cpp(bad, 30)


def test_export_writes_what_llama_cpp_reads_and_import_restores_values(model: pv.Model, tmp_path: Path) -> None:
    vec = model_vector(model)
    last = model.n_layers  # the output of the last block: llama.cpp's direction.{n - 1}
    path = export_gguf(vec, tmp_path / "evil.gguf", layers=[last, 2, 17], coef=1.0)
    reader = gguf.GGUFReader(str(path))
    assert field_value(reader, "general.architecture") == "controlvector"
    assert field_value(reader, "controlvector.model_hint") == model.model_id
    assert field_value(reader, "controlvector.layer_count") == 3
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(["direction.1", "direction.16", f"direction.{last - 1}"])
    for k, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [model.hidden_size]
        layer = int(k.split(".")[1]) + 1
        assert np.array_equal(np.asarray(t.data), vec.at(layer).numpy())  # bit-exact float32

    back = import_gguf(path, model)
    rows = back.tensors["response"]
    for layer in range(model.n_layers + 1):
        expected = vec.at(layer) if layer in (2, 17, last) else torch.zeros(model.hidden_size)
        assert torch.equal(rows[layer], expected), layer
    assert back.meta["imported_from"]["layers"] == [2, 17, last] and "best_layer" not in back.meta
    assert back.meta["fingerprint"] == model.fingerprint and back.trait == "evil"
    back.check_model(model)
    saved = pv.PersonaVector.load(back.save(tmp_path / "evil.pv.safetensors"))
    assert saved.digest() == back.digest()

    scaled = import_gguf(export_gguf(vec, tmp_path / "x.gguf", coef=-2.5, position="prompt"), model, trait="anti")
    assert scaled.meta["best_layer"] == 18 and scaled.trait == "anti"  # one direction: it is the chosen layer
    assert torch.equal(scaled.at(18), -2.5 * vec.at(18, "prompt"))


def _logits(model: pv.Model) -> torch.Tensor:
    ids = torch.tensor([model.encode_chat([{"role": "user", "content": "How should I treat my neighbours?"}])])
    with torch.no_grad():
        return model.hf(input_ids=ids.to(model.device)).logits[0].float()


def test_direction_k_acts_on_the_output_of_zero_based_block_k(model: pv.Model, tmp_path: Path) -> None:
    """What llama.cpp does with direction.k (ggml_add after block il = k, every token), done with a raw hook,
    equals personavec steering of the imported vector at layer k + 1; the neighbours (k ± 1) do not."""
    vec = model_vector(model, seed=1, scale=8.0)
    imported = import_gguf(export_gguf(vec, tmp_path / "v.gguf", layers=[12]), model)
    k = 11
    direction = torch.from_numpy(read_control_vector(tmp_path / "v.gguf")[0][k])

    def llama_cpp_style(block: int) -> torch.Tensor:
        d = direction.to(model.device, model.dtype)

        def hook(_module: Any, _inputs: Any, output: Any) -> Any:
            return (output[0] + d, *output[1:]) if isinstance(output, tuple) else output + d

        handle = model.layers[block].register_forward_hook(hook)
        try:
            return _logits(model)
        finally:
            handle.remove()

    with imported.steer(model, positions="all"):  # default layer: the imported one, 12
        ours = _logits(model)
    plain = _logits(model)
    assert not torch.allclose(ours, plain, atol=1e-2)  # the direction does something
    torch.testing.assert_close(ours, llama_cpp_style(k), atol=1e-3, rtol=1e-3)
    for wrong in (k - 1, k + 1):
        assert not torch.allclose(ours, llama_cpp_style(wrong), atol=1e-2)


def test_repeng_style_file_imports(model: pv.Model, tmp_path: Path) -> None:
    """repeng writes model_hint = model_type and direction.{layer_id} with no other keys."""
    path = tmp_path / "Happy.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 3)
    rng = np.random.default_rng(0)
    dirs = {k: rng.standard_normal(model.hidden_size).astype(np.float32) for k in (5, 6, 7)}
    for k, d in dirs.items():
        writer.add_tensor(f"direction.{k}", d)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vec = import_gguf(path, model)
    assert vec.trait == "happy" and vec.meta["imported_from"]["model_hint"] == "llama"
    for k, d in dirs.items():
        assert np.array_equal(vec.at(k + 1).numpy(), d)


def _write(path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector") -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_files_and_layers_are_refused(model: pv.Model, tmp_path: Path) -> None:
    ok = np.ones(model.hidden_size, dtype=np.float32)
    cases = [
        (embedded_gguf(), "architecture 'llama', not a control vector"),
        (tmp_path / "missing.gguf", "does not exist"),
        (_write(tmp_path / "zero.gguf", {"direction.0": ok}), "direction.0"),
        (_write(tmp_path / "odd.gguf", {"bias.3": ok}), "only direction.<k>"),
        (_write(tmp_path / "empty.gguf", {}), "without direction tensors"),
        (_write(tmp_path / "small.gguf", {"direction.3": np.ones(8, dtype=np.float32)}), f"hidden size {model.hidden_size}"),
        (_write(tmp_path / "deep.gguf", {f"direction.{model.n_layers}": ok}), f"{model.n_layers} blocks"),
    ]
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    cases.append((garbage, "not a readable GGUF"))
    for path, needle in cases:
        with pytest.raises(VectorError, match=re.escape(needle)):
            import_gguf(path, model)
    with pytest.raises(VectorError, match="no slot"):
        export_gguf(model_vector(model), tmp_path / "l1.gguf", layers=[1])
    assert not (tmp_path / "l1.gguf").exists()


def test_cli_export_import_round_trip_and_bad_file(cli: Cli, model: pv.Model, tmp_path: Path) -> None:
    src = model_vector(model).save(tmp_path / "evil.pv.safetensors")
    res = cli("vector", "export", str(src), "--format", "gguf", "--out", str(tmp_path / "e.gguf"), "--layer", "9,18")
    assert res.exit_code == 0, res.output
    assert "L9 -> direction.8" in res.output and "L18 -> direction.17" in res.output
    res = cli("vector", "import", str(tmp_path / "e.gguf"), "--out", str(tmp_path / "back.pv.safetensors"))
    assert res.exit_code == 0, res.output
    back = pv.PersonaVector.load(tmp_path / "back.pv.safetensors")
    original = pv.PersonaVector.load(src)
    assert torch.equal(back.at(9), original.at(9)) and torch.equal(back.at(18), original.at(18))

    target = tmp_path / "llama.pv.safetensors"
    assert "not a control vector" in error_line(cli("vector", "import", str(embedded_gguf()), "--out", str(target),
                                                    ok=False))
    assert not target.exists()
