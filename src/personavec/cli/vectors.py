"""`personavec vector ...`: inspect persona vector files, vector algebra, comparison and GGUF interop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import PersonavecError
from ..paths import refuse_existing
from ._common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LayersPathOpt,
    ModelOpt,
    emit_json,
    guard,
    load,
    out,
    parse_floats,
    warn,
)

vector_app = typer.Typer(no_args_is_help=True, help="Inspect persona vector files.")

MismatchOpt = Annotated[bool, typer.Option(help="Combine vectors made on different weights (same shape).")]
OutVector = Annotated[Path, typer.Option("--out", "-o", help="Vector file to write (.pv.safetensors).")]
TraitNameOpt = Annotated[str | None, typer.Option(help="Trait name recorded in the result (default: from the inputs).")]
ForceOpt = Annotated[bool, typer.Option(help="Replace an existing --out vector file.")]


@vector_app.command("info")
def vector_info(path: Annotated[Path, typer.Argument(help="A .pv.safetensors file.")],
                as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Show a vector's provenance and per-layer norms (layer L = output of decoder block L; 0 = embeddings)."""
    from ..vectors import PersonaVector

    summary = PersonaVector.load(path).summary()
    if as_json:
        emit_json(summary)
        return
    meta = summary["meta"]
    table = Table("field", "value", title=str(path))
    for key in ("trait", "model_id", "fingerprint", "n_layers", "hidden_size", "judge", "threshold", "counts",
                "best_layer", "trait_sha256", "version", "created", "layer_convention"):
        if key in meta:
            table.add_row(key, json.dumps(meta[key]) if isinstance(meta[key], dict) else str(meta[key]))
    table.add_row("shape", str(summary["shape"]))
    out.print(table)
    norms = summary["norms"].get("response") or next(iter(summary["norms"].values()))
    out.print("response-vector norm by layer: " + ", ".join(f"{i}:{n:.1f}" for i, n in enumerate(norms)))


# ---- algebra -----------------------------------------------------------------------------------------------
def check_out(target: Path, inputs: dict[str, Any], force: bool | None = None, folder: bool = False) -> None:
    """Inputs are never modified (see `guard`); with `force` given, an existing vector file (an extraction's
    result, perhaps) is replaced only when it is True."""
    guard(inputs, files={} if folder else {"--out": target}, folders={"--out": target} if folder else {})
    if force is not None:
        refuse_existing(target, force=force)


def load_vectors(paths: list[Path]) -> list[Any]:
    from ..vectors import PersonaVector

    return [PersonaVector.load(p) for p in paths]


def _saved(vec: Any, target: Path, as_json: bool) -> None:
    vec.save(target)
    if as_json:
        emit_json({"out": target, "op": vec.meta["algebra"]["op"], "trait": vec.trait,
                   "shape": [vec.n_layers + 1, vec.hidden_size], "algebra": vec.meta["algebra"]})
        return
    out.print(f"wrote {target}: {vec.meta['algebra']['op']} (trait '{vec.trait}', shape "
              f"[{vec.n_layers + 1}, {vec.hidden_size}])")


@vector_app.command("add")
def vector_add(vectors: Annotated[list[Path], typer.Argument(help="Two or more vector files of one model.")],
               out_path: OutVector, trait: TraitNameOpt = None, allow_model_mismatch: MismatchOpt = False,
               force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Sum vectors layer by layer (e.g. two traits at once)."""
    from ..algebra import add

    if len(vectors) < 2:
        raise PersonavecError("vector add needs two or more vector files")
    check_out(out_path, {"VECTORS": vectors}, force)
    _saved(add(*load_vectors(vectors), trait=trait, sources=[str(p) for p in vectors],
               allow_mismatch=allow_model_mismatch), out_path, as_json)


@vector_app.command("sub")
def vector_sub(a: Annotated[Path, typer.Argument(help="Vector to subtract from.")],
               b: Annotated[Path, typer.Argument(help="Vector to subtract.")],
               out_path: OutVector, trait: TraitNameOpt = None, allow_model_mismatch: MismatchOpt = False,
               force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """A − B layer by layer (e.g. a trait with another's direction taken out)."""
    from ..algebra import subtract

    check_out(out_path, {"A": a, "B": b}, force)
    va, vb = load_vectors([a, b])
    _saved(subtract(va, vb, trait=trait, sources=[str(a), str(b)], allow_mismatch=allow_model_mismatch), out_path,
           as_json)


@vector_app.command("scale")
def vector_scale(vector: Annotated[Path, typer.Argument(help="Vector file.")],
                 by: Annotated[float, typer.Option(help="Factor (negative flips the direction).")],
                 out_path: OutVector, trait: TraitNameOpt = None, force: ForceOpt = False,
                 as_json: JsonOpt = False) -> None:
    """Multiply every layer by a factor."""
    import math

    from ..algebra import scale

    if not math.isfinite(by):
        raise PersonavecError(f"--by must be a finite number, got {by}")
    check_out(out_path, {"VECTOR": vector}, force)
    _saved(scale(load_vectors([vector])[0], by, trait=trait, sources=[str(vector)]), out_path, as_json)


@vector_app.command("normalize")
def vector_normalize(vector: Annotated[Path, typer.Argument(help="Vector file.")], out_path: OutVector,
                     norm: Annotated[float, typer.Option(help="Length of every layer's row.")] = 1.0,
                     trait: TraitNameOpt = None, force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Rescale every layer's row to the same length (directions only)."""
    from ..algebra import normalize

    check_out(out_path, {"VECTOR": vector}, force)
    _saved(normalize(load_vectors([vector])[0], norm, trait=trait, source=str(vector)), out_path, as_json)


@vector_app.command("compare")
def vector_compare(
    vectors: Annotated[list[Path], typer.Argument(help="Two or more vector files of one model.")],
    layer: Annotated[list[str] | None, typer.Option(help="Layer(s) L (output of block L), e.g. 18 or 12,18 "
                                                   "(default: the first vector's chosen layer).")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Heatmap PNG to write.")] = None,
    position: Annotated[str, typer.Option(help="response | prompt | last_prompt")] = "response",
    by_layer: Annotated[bool, typer.Option("--by-layer", help="Also print each pair's cosine at every layer.")] = False,
    allow_model_mismatch: MismatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Cosine similarity between trait vectors per layer: a table, and a heatmap with --out."""
    from ..algebra import cosine_by_layer

    if len(vectors) < 2:
        raise PersonavecError("vector compare needs two or more vector files")
    guard({"VECTORS": vectors}, files={"--out": out_path})
    loaded = load_vectors(vectors)
    layers = [int(x) for x in parse_floats(layer, "--layer") or []] or [loaded[0].layer]
    for ly in layers:
        if not 0 <= ly <= loaded[0].n_layers:
            raise PersonavecError(f"--layer {ly} is out of range 0..{loaded[0].n_layers} (L = output of block L)")
    cos = cosine_by_layer(loaded, position, allow_model_mismatch)
    traits = [v.trait for v in loaded]
    names = traits if len(set(traits)) == len(traits) else [p.name.split(".")[0] for p in vectors]
    if out_path is not None:
        from ..io import atomic_path
        from ..report.compare import cosine_heatmap

        png = cosine_heatmap(names, {ly: cos[ly] for ly in layers}, title=f"persona-vector similarity ({position})")
        with atomic_path(out_path) as tmp:
            tmp.write_bytes(png)
    if as_json:
        emit_json({"names": names, "position": position, "heatmap": out_path,
                   "layers": [{"layer": ly, "cosine": cos[ly]} for ly in layers],
                   "by_layer": cos if by_layer else None})
        return
    for ly in layers:
        table = Table("", *names, title=f"cosine similarity at layer {ly} (output of decoder block {ly})")
        for i, n in enumerate(names):
            table.add_row(n, *[f"{float(cos[ly, i, j]):+.3f}" for j in range(len(names))])
        out.print(table)
    if by_layer:
        table = Table("layer", *[f"{names[i]}·{names[j]}" for i in range(len(names)) for j in range(i + 1, len(names))],
                      title="cosine by layer (layer L = output of block L; 0 = embeddings)")
        for ly in range(cos.shape[0]):
            table.add_row(str(ly), *[f"{float(cos[ly, i, j]):+.3f}" for i in range(len(names))
                                     for j in range(i + 1, len(names))])
        out.print(table)
    if out_path is not None:
        out.print(f"wrote {out_path}")


# ---- interop -----------------------------------------------------------------------------------------------
@vector_app.command("export")
def vector_export(
    vector: Annotated[Path, typer.Argument(help="Vector file or pretrained folder.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="File (.gguf) or folder to write.")],
    fmt: Annotated[str | None, typer.Option("--format", help="gguf (llama.cpp / repeng control vector), pretrained "
                                            "(folder with a model card) or reference (the persona_vectors .pt "
                                            "files). Default: gguf for --out *.gguf, pretrained for a folder or a "
                                            "name without a suffix.")] = None,
    layer: Annotated[list[str] | None, typer.Option(help="personavec layer(s) L to export (2..n; written as "
                                                   "direction.(L-1)); default: the vector's chosen layer.")] = None,
    coef: Annotated[float, typer.Option(help="Coefficient baked into the values.")] = 1.0,
    position: Annotated[str, typer.Option(help="Capture position to export.")] = "response",
    as_json: JsonOpt = False,
) -> None:
    """Write a llama.cpp control vector (llama-cli --control-vector FILE), a Hugging Face style folder with a
    model card, or the reference implementation's .pt files."""
    from ..interop.gguf import export_gguf, to_llama_cpp

    if fmt is None:
        if out_path.suffix.lower() != ".gguf" and out_path.suffix and not out_path.is_dir():
            raise PersonavecError(f"cannot tell the format from --out '{out_path}'; pass --format gguf, pretrained "
                                  "or reference")
        fmt = "gguf" if out_path.suffix.lower() == ".gguf" else "pretrained"
    if fmt not in ("gguf", "pretrained", "reference"):
        raise PersonavecError(f"unknown --format '{fmt}'; use gguf, pretrained or reference")
    check_out(out_path, {"VECTOR": vector}, folder=fmt != "gguf")
    vec = load_vectors([vector])[0]
    if fmt != "gguf":
        if layer or coef != 1.0 or position != "response":
            raise PersonavecError(f"--layer, --coef and --position apply to --format gguf; {fmt} keeps every layer "
                                  "and position as they are")
        from .interop import export_folder

        return export_folder(vec, out_path, fmt, as_json)
    layers = [int(x) for x in parse_floats(layer, "--layer") or []] or [vec.layer]
    export_gguf(vec, out_path, layers=layers, coef=coef, position=position)
    directions = {ly: to_llama_cpp(ly, vec.n_layers) for ly in sorted(set(layers))}
    if as_json:
        emit_json({"out": out_path, "format": "gguf", "trait": vec.trait, "coef": coef, "position": position,
                   "layers": [{"layer": ly, "direction": d} for ly, d in directions.items()]})
        return
    mapping = ", ".join(f"L{ly} -> direction.{d}" for ly, d in directions.items())
    out.print(f"wrote {out_path}: {mapping} (coef {coef:g}); llama.cpp adds it at every token: "
              f"llama-cli -m MODEL.gguf --control-vector {out_path}")


@vector_app.command("import")
def vector_import(
    file: Annotated[Path, typer.Argument(help="A control-vector .gguf (personavec, repeng, llama.cpp), or the "
                                         "persona_vectors reference implementation's TRAIT_response_avg_diff.pt "
                                         "(its prompt_avg / prompt_last files beside it come along).")],
    out_path: OutVector,
    trait: TraitNameOpt = None,
    model: ModelOpt = None,
    layer: Annotated[int | None, typer.Option(help="For .pt files: the layer you steer at (the reference's "
                                              "--layer L = personavec layer L), recorded as the chosen one.")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, layers_path: LayersPathOpt = None,
    force: ForceOpt = False, as_json: JsonOpt = False,
) -> None:
    """Read a llama.cpp control vector (direction.k becomes layer k+1, the output of block k+1) or a reference
    .pt vector (row L stays layer L) onto MODEL."""
    from ..interop.gguf import import_gguf, read_control_vector

    check_out(out_path, {"FILE": file, "--model": model}, force)
    if file.suffix.lower() in (".pt", ".pth"):
        from .interop import import_reference

        return import_reference(file, out_path, trait=trait, model=model, layer=layer, device=device,
                                dtype=dtype, layers_path=layers_path, as_json=as_json)
    if layer is not None:
        raise PersonavecError("--layer applies to .pt imports; a GGUF control vector names its own layers")
    read_control_vector(file)  # fail on a bad file before paying for the model
    m = load(model, device, dtype, layers_path)
    vec = import_gguf(file, m, trait=trait)
    vec.save(out_path)
    layers = vec.meta["imported_from"]["layers"]
    hint = vec.meta["imported_from"]["model_hint"]
    if hint and hint not in (m.model_id, m.source):
        warn(f"note: the file names model '{hint}'; imported onto {m.model_id} (same hidden size)")
    if as_json:
        emit_json({"out": out_path, "trait": vec.trait, "model_id": m.model_id, "layers": layers,
                   "shape": [vec.n_layers + 1, vec.hidden_size], "imported_from": vec.meta["imported_from"]})
        return
    out.print(f"wrote {out_path}: trait '{vec.trait}', layers {', '.join(map(str, layers))} "
              f"(output of block L), shape [{vec.n_layers + 1}, {vec.hidden_size}]")
