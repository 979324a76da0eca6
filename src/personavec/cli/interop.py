"""Interop commands: `traits import` (the reference implementation's trait JSON files), `vector push`
(a Hugging Face hub repo), and the .pt / pretrained-folder branches of `vector import` / `vector export`
(called from cli/vectors.py, which owns those command names)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import PersonavecError
from ._common import JsonOpt, emit_json, guard, load, out, warn
from .traits import traits_app
from .vectors import vector_app


@traits_app.command("import")
def traits_import(
    source: Annotated[Path, typer.Argument(help="The reference implementation's data_generation folder (or the "
                                           "repository root, or trait_data_extract/), or one trait JSON file.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Trait file to write (.yaml).")],
    name: Annotated[str | None, typer.Option(help="Trait to import when the folder holds several; also the "
                                             "name written (default: the JSON file's name).")] = None,
    description: Annotated[str | None, typer.Option(help="Description (default: the first paragraph of the "
                                                    "eval_prompt).")] = None,
    assistant_prefix: Annotated[bool, typer.Option(help="Prepend 'You are a/an NAME assistant.' to each "
                                                   "instruction, as the reference's --assistant_name does.")] = True,
    pos_name: Annotated[str | None, typer.Option(help="Assistant name for the positive prompts (default: the "
                                                 "trait).")] = None,
    neg_name: Annotated[str, typer.Option(help="Assistant name for the negative prompts.")] = "helpful",
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert the reference's trait_data_extract/T.json + trait_data_eval/T.json into one validated trait YAML."""
    from ..interop.reference_impl import import_reference_traits

    guard({"SOURCE": source}, files={"--out": out_path})
    trait, path = import_reference_traits(source, out_path, name=name, description=description,
                                          assistant_prefix=assistant_prefix, pos_name=pos_name, neg_name=neg_name,
                                          overwrite=force)
    if as_json:
        emit_json({"out": path, "name": trait.name, "pairs": len(trait.pairs),
                   "extraction_questions": len(trait.extraction_questions),
                   "evaluation_questions": len(trait.evaluation_questions)})
        return
    out.print(f"wrote {path}: trait '{trait.name}', {len(trait.pairs)} prompt pairs, "
              f"{len(trait.extraction_questions)} extraction and {len(trait.evaluation_questions)} evaluation "
              f"questions, rubric from eval_prompt; no reference answers (the measure falls back to the contrast "
              f"judge). Next: personavec extract --trait {path} --out VECTOR")


def import_reference(source: Path, out_path: Path, *, trait: str | None, model: str | None, layer: int | None,
                     device: str | None, dtype: str | None, layers_path: str | None, as_json: bool = False) -> None:
    """`vector import F.pt`: the reference's {trait}_response_avg_diff.pt and its siblings onto MODEL."""
    from ..interop.reference_impl import import_reference_vector, read_reference_files

    read_reference_files(source)  # fail on a bad file before paying for the model
    m = load(model, device, dtype, layers_path)
    vec = import_reference_vector(source, m, trait=trait, layer=layer)
    vec.save(out_path)
    hint = vec.meta["imported_from"]["model_hint"]
    if hint and hint not in (m.model_id, Path(m.model_id).name, m.source):
        warn(f"note: the file sits in a folder named '{hint}'; imported onto {m.model_id} (same shape)")
    files = {pos: d["path"] for pos, d in vec.meta["imported_from"]["files"].items()}
    if as_json:
        emit_json({"out": out_path, "trait": vec.trait, "model_id": m.model_id, "layer": vec.layer,
                   "shape": [vec.n_layers + 1, vec.hidden_size], "files": files})
        return
    found = ", ".join(f"{pos} ({Path(f).name})" for pos, f in files.items())
    out.print(f"wrote {out_path}: trait '{vec.trait}', positions {found}, shape [{vec.n_layers + 1}, "
              f"{vec.hidden_size}]; layer L is the reference's --layer L (output of decoder block L), chosen layer "
              f"{vec.layer}" + ("" if layer is not None else " (default; pass --layer to record yours)"))


def export_folder(vec: Any, out_path: Path, fmt: str, as_json: bool = False) -> None:
    """`vector export --format pretrained|reference`: a folder (model card) or the reference's .pt files."""
    if fmt == "pretrained":
        vec.save_pretrained(out_path)
        if as_json:
            emit_json({"out": out_path, "format": fmt, "trait": vec.trait, "layer": vec.layer,
                       "files": [out_path / n for n in ("vector.pv.safetensors", "config.json", "README.md")]})
            return
        out.print(f"wrote {out_path}/: vector.pv.safetensors, config.json and README.md (model card: trait "
                  f"'{vec.trait}', layer {vec.layer}); load it with PersonaVector.from_pretrained('{out_path}') or "
                  f"--vector {out_path}; publish it with: personavec vector push {out_path} OWNER/NAME")
        return
    from ..interop.reference_impl import export_reference_vector

    files = export_reference_vector(vec, out_path)
    if as_json:
        emit_json({"out": out_path, "format": fmt, "trait": vec.trait, "layer": vec.layer, "files": files})
        return
    out.print(f"wrote {', '.join(str(f) for f in files)}: rows in the same numbering, so the reference's "
              f"eval_persona.py --vector_path {files[0]} --layer {vec.layer} steers the same layer")


@vector_app.command("push")
def vector_push(
    vector: Annotated[Path, typer.Argument(help="Vector file or pretrained folder.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repo, owner/name (created if needed).")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token (default: $HF_TOKEN or the cached login).")] = None,
    message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a vector to the Hugging Face hub as a folder with a model card (needs huggingface_hub)."""
    from ..vectors import PersonaVector

    vec = PersonaVector.load(vector)
    if "/" not in repo_id:
        raise PersonavecError(f"'{repo_id}' is not a hub id like 'owner/name'")
    url = vec.push_to_hub(repo_id, private=private or None, token=token, commit_message=message)
    if as_json:
        emit_json({"repo_id": repo_id, "url": url, "trait": vec.trait})
        return
    out.print(f"pushed '{vec.trait}' to {repo_id}: {url}; load it with PersonaVector.from_pretrained('{repo_id}')")
