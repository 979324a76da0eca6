"""llama.cpp control vectors (GGUF), the format `llama-cli --control-vector` and repeng read and write.

Layer numbering, the one thing to get right:

  personavec layer L   = output of decoder block L, 1-based (0 = embeddings) = HF ``hidden_states[L]``
  llama.cpp direction.k = added to the output of decoder block k, 0-based (``build_cvec(cur, il)`` with
                          ``il = k`` at the end of block ``il``; ``direction.0`` is rejected by the loader)
  so                     direction.k  <->  personavec layer k + 1       (k = L - 1)

repeng writes ``direction.{layer_id}`` where it adds the direction to ``model.layers[layer_id]``'s output
(0-based), the same convention. Hence only personavec layers 2..n_layers can be exported (llama.cpp has
no slot for the first block's output nor for the embeddings). llama.cpp adds every direction in the file,
at every token (prompt included), times ``--control-vector-scaled`` strength; the exporter bakes a
coefficient into the values, so strength 1 reproduces personavec's ``coef`` with ``positions="all"``.

File layout: architecture ``controlvector``; keys ``controlvector.model_hint`` (the model id) and
``controlvector.layer_count`` (the number of directions, as repeng and llama.cpp's generator write it);
one 1-D float32 tensor ``direction.k`` of length hidden per exported layer; plus ``personavec.*`` keys
(provenance JSON, coefficient, position, layer convention) that other readers ignore."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._version import __version__
from ..errors import VectorError
from ..io import atomic_path
from ..steering import scaled_terms
from ..vectors import LAYER_CONVENTION, PersonaVector, check_finite, now_iso

if TYPE_CHECKING:
    from ..models import Model

ARCH = "controlvector"
GGUF_CONVENTION = "direction.k is added to the output of decoder block k (0-based) = personavec layer k + 1"


def to_llama_cpp(layer: int, n_layers: int) -> int:
    """personavec layer L (output of block L, 1-based) -> llama.cpp direction index k = L - 1."""
    if not 2 <= layer <= n_layers:
        raise VectorError(f"layer {layer} cannot be exported: llama.cpp control vectors reach layers 2..{n_layers} "
                          "(output of block L, 1-based); it has no slot for the embeddings nor the first block")
    return layer - 1


def from_llama_cpp(k: int, n_layers: int) -> int:
    """llama.cpp direction index k (added after 0-based block k) -> personavec layer k + 1."""
    if not 1 <= k <= n_layers - 1:
        raise VectorError(f"direction.{k} has no place in a model with {n_layers} blocks: llama.cpp uses "
                          f"direction.1..direction.{n_layers - 1}")
    return k + 1


def export_gguf(vec: PersonaVector, path: str | os.PathLike[str], layers: list[int] | None = None,
                coef: float = 1.0, position: str = "response") -> Path:
    """Write `coef` × vec[L] for each L in `layers` (default: the vector's chosen layer) as a control vector."""
    import gguf

    chosen = sorted(set(layers if layers else [vec.layer]))
    ks = [to_llama_cpp(ly, vec.n_layers) for ly in chosen]
    # llama.cpp adds the directions in float32: the baked-in coefficient must fit there
    scaled = scaled_terms([(ly, coef, vec.at(ly, position).detach().float().cpu()) for ly in chosen])
    rows = {k: row.numpy() for k, row in zip(ks, scaled, strict=True)}
    final = Path(path)
    with atomic_path(final) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", str(vec.meta.get("model_id", "unknown")))
        writer.add_uint32(f"{ARCH}.layer_count", len(rows))
        writer.add_string("personavec.meta", json.dumps(vec.meta, sort_keys=True, default=str))
        writer.add_string("personavec.layer_convention", GGUF_CONVENTION)
        writer.add_string("personavec.position", position)
        writer.add_float32("personavec.coef", float(coef))
        for k, row in rows.items():
            writer.add_tensor(f"direction.{k}", np.ascontiguousarray(row, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return final


def _string(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    except (TypeError, ValueError, IndexError):
        return None


def read_control_vector(path: str | os.PathLike[str]) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """({k: float32 direction}, {model_hint, personavec meta...}) from a control-vector GGUF; VectorError
    with one line for anything else."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise VectorError(f"GGUF file '{p}' does not exist")
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as exc:  # the reader raises ValueError, struct errors, OSError on garbage
        raise VectorError(f"'{p}' is not a readable GGUF file ({type(exc).__name__})") from None
    arch = _string(reader, "general.architecture")
    if arch != ARCH:
        raise VectorError(f"'{p}' is a GGUF of architecture '{arch}', not a control vector ('{ARCH}'); "
                          "pass a file written by 'personavec vector export', repeng or llama.cpp's cvector-generator")
    directions: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise VectorError(f"'{p}' holds tensor '{t.name}'; a control vector holds only direction.<k> tensors")
        k = int(index)
        if k == 0:
            raise VectorError(f"'{p}' holds direction.0, which llama.cpp rejects (k counts 0-based blocks from 1)")
        data = np.asarray(t.data)
        if data.dtype not in (np.float32, np.float16) or data.size != int(t.n_elements):
            raise VectorError(f"'{p}': tensor {t.name} is {t.tensor_type.name}; control vectors are F32")
        directions[k] = directions.get(k, 0) + data.reshape(-1).astype(np.float32)  # llama.cpp sums repeats
    if not directions:
        raise VectorError(f"'{p}' is a control vector without direction tensors")
    sizes = {d.size for d in directions.values()}
    if len(sizes) != 1:
        raise VectorError(f"'{p}' holds directions of different lengths {sorted(sizes)}")
    for k, d in directions.items():
        check_finite(torch.from_numpy(d)[None], f"'{p}' (direction.{k})", first_layer=k + 1)  # layer = k + 1
    info: dict[str, Any] = {"model_hint": _string(reader, f"{ARCH}.model_hint")}
    raw_meta = _string(reader, "personavec.meta")
    if raw_meta:
        with contextlib.suppress(ValueError):
            info["personavec_meta"] = json.loads(raw_meta)
    field = reader.get_field("personavec.coef")
    if field is not None and field.data:
        info["coef"] = float(field.parts[field.data[0]][0])
    return directions, info


def import_gguf(path: str | os.PathLike[str], model: Model, trait: str | None = None) -> PersonaVector:
    """A PersonaVector for `model` from a control-vector GGUF: direction.k goes to row k + 1 of the 'response'
    tensor, every other row is zero. One direction becomes the vector's chosen layer."""
    directions, info = read_control_vector(path)
    hidden = next(iter(directions.values())).size
    if hidden != model.hidden_size:
        raise VectorError(f"'{path}' has directions of length {hidden} but {model.model_id} has hidden size "
                          f"{model.hidden_size}; import it onto the model it was made for")
    tensor = torch.zeros(model.n_layers + 1, model.hidden_size)
    layers = []
    for k in sorted(directions):
        layer = from_llama_cpp(k, model.n_layers)
        tensor[layer] = torch.from_numpy(directions[k].copy())
        layers.append(layer)
    old = info.get("personavec_meta") or {}
    name = trait or old.get("trait") or Path(path).name.split(".")[0].lower() or "imported"
    meta: dict[str, Any] = {
        "model_id": model.model_id, "fingerprint": model.fingerprint, "hidden_size": model.hidden_size,
        "n_layers": model.n_layers, "layer_convention": LAYER_CONVENTION, "positions": ["response"],
        "trait": name, "created": now_iso(), "version": __version__,
        "imported_from": {"path": str(path), "format": "gguf control vector", "model_hint": info.get("model_hint"),
                          "directions": sorted(directions), "layers": layers, "coef": info.get("coef"),
                          "convention": GGUF_CONVENTION, "personavec_meta": old or None},
    }
    if len(layers) == 1:
        meta["best_layer"] = layers[0]
    return PersonaVector(tensors={"response": tensor}, meta=meta)
