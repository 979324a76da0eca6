"""The reference implementation's files (github.com/safety-research/persona_vectors, Chen et al. 2025):
its persona-vector tensors and its trait JSON files, read into personavec's formats (and vectors written back).

Vectors. ``generate_vec.py`` saves three float32 tensors per trait with ``torch.save``, each of shape
``[n_layers + 1, hidden]``, the positive-minus-negative mean of ``outputs.hidden_states[layer]`` for every
``layer in range(num_hidden_layers + 1)``:

  ``{trait}_response_avg_diff.pt``  mean over the response tokens      -> personavec position "response"
  ``{trait}_prompt_avg_diff.pt``    mean over the prompt tokens        -> "prompt"
  ``{trait}_prompt_last_diff.pt``   the last prompt token              -> "last_prompt"

Layer numbering, checked in their code:

  extraction  row L = Hugging Face ``hidden_states[L]``: 0 = embedding output, L = output of decoder block L
  steering    ``eval/eval_persona.py`` takes ``torch.load(vector_path)[layer]`` and hooks
              ``ActivationSteerer(model, vector, layer_idx=layer - 1)``, whose forward hook on
              ``model.layers[layer - 1]`` adds the vector to that block's output (``activation_steer.py``)
  so          reference row L  <->  personavec row L (output of decoder block L, hook on block L - 1), and their
              ``--layer L`` is personavec's ``layer=L``: the conversion is the identity, stated in
              ``from_reference_layer`` / ``to_reference_layer`` so that every boundary says so.

One difference stays: Hugging Face's last ``hidden_states`` entry has the model's final norm applied, so the
reference's row n_layers is a normed activation while personavec's is the raw output of the last block. Rows
0..n_layers-1 (every layer anyone steers at) mean the same thing in both.

Trait files. ``data_generation/trait_data_extract/{trait}.json`` and ``trait_data_eval/{trait}.json`` each hold
``instruction`` (a list of ``{"pos": ..., "neg": ...}`` system-prompt pairs), ``questions`` (the extraction or the
evaluation questions) and ``eval_prompt`` (the judge prompt, with ``{question}`` and ``{answer}``). Their
pipeline prepends "You are a/an {name} assistant." to each instruction (``--assistant_name``: the trait for
``pos``, "helpful" for ``neg``); the importer does the same by default, so the system prompts are the ones the
reference actually ran."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..errors import TraitError, VectorError
from ..io import atomic_path, sha256_file
from ..vectors import LAYER_CONVENTION, PersonaVector, check_finite, now_iso

if TYPE_CHECKING:
    from ..models import Model
    from ..traits import Trait

FORMAT = "persona_vectors reference implementation (torch .pt, [n_layers + 1, hidden])"
REFERENCE_CONVENTION = ("row L = Hugging Face hidden_states[L] (0 = embeddings, L = output of decoder block L); "
                        "steered by adding row L to the output of model.layers[L-1] (eval_persona.py "
                        "layer_idx=layer-1) = personavec layer L")
LAST_ROW_NOTE = ("the reference's row n_layers is hidden_states[-1], which has the final norm applied; "
                 "personavec's row n_layers is the raw output of the last block")
#: personavec position -> the reference's file suffix
POSITION_FILES = {"response": "response_avg_diff", "prompt": "prompt_avg_diff", "last_prompt": "prompt_last_diff"}
_NAME_RE = re.compile(r"^(?P<trait>.+)_(?P<kind>response_avg_diff|prompt_avg_diff|prompt_last_diff)$")


# ---- layer numbering ---------------------------------------------------------------------------------------
def from_reference_layer(layer: int) -> int:
    """The reference's layer L (row L, steered with layer_idx=L-1) -> personavec layer L: the same number."""
    return layer


def to_reference_layer(layer: int) -> int:
    """personavec layer L (output of decoder block L) -> the reference's ``--layer L``: the same number."""
    return layer


# ---- vectors ---------------------------------------------------------------------------------------------------
def _split_name(path: Path) -> tuple[str, str]:
    """(trait, personavec position) from '{trait}_{kind}.pt'; any other name is a response vector."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    m = _NAME_RE.match(stem)
    if m is None:
        return stem, "response"
    position = next(p for p, kind in POSITION_FILES.items() if kind == m["kind"])
    return m["trait"], position


def read_tensor(path: str | os.PathLike[str]) -> torch.Tensor:
    """One reference vector file as a float32 [rows, hidden] tensor; VectorError with one line otherwise.
    Loaded with ``weights_only=True``: a file that needs arbitrary unpickling is refused, never executed."""
    p = Path(path)
    if not p.is_file():
        raise VectorError(f"vector file '{p}' does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors come in many types
        raise VectorError(f"'{p}' is not a tensor file torch can load safely ({type(exc).__name__}); the reference "
                          "implementation saves one tensor per file with torch.save") from None
    if isinstance(obj, dict) and len(obj) == 1 and torch.is_tensor(next(iter(obj.values()))):
        obj = next(iter(obj.values()))  # a {name: tensor} wrapper around the one tensor
    if not torch.is_tensor(obj):
        raise VectorError(f"'{p}' holds a {type(obj).__name__}, not a tensor; the reference implementation saves "
                          "one [n_layers + 1, hidden] tensor per file")
    if obj.dim() != 2:
        raise VectorError(f"'{p}' holds a tensor of shape {list(obj.shape)}; a reference vector is "
                          "[n_layers + 1, hidden] (row 0 = embeddings)")
    if not obj.is_floating_point():
        raise VectorError(f"'{p}' holds {obj.dtype} values; a reference vector is floating point")
    t = obj.detach().float().contiguous()
    check_finite(t, f"'{p}'")  # row L is personavec layer L
    return t


@dataclass(frozen=True)
class ReferenceFiles:
    """The tensors found for one trait: {personavec position: (file, tensor)}, in response/prompt/last order."""

    trait: str
    files: dict[str, tuple[Path, torch.Tensor]] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        t = next(iter(self.files.values()))[1]
        return int(t.shape[0]), int(t.shape[1])


def read_reference_files(path: str | os.PathLike[str], siblings: bool = True) -> ReferenceFiles:
    """The given file plus, when `siblings`, the other two position files of the same trait beside it. Every
    file is checked on its own and against the given one (one shape for all)."""
    p = Path(path)
    trait, position = _split_name(p)
    found: dict[str, tuple[Path, torch.Tensor]] = {position: (p, read_tensor(p))}
    if siblings and _NAME_RE.match(p.name[: -len(p.suffix)] if p.suffix else p.name):
        for pos, kind in POSITION_FILES.items():
            other = p.with_name(f"{trait}_{kind}{p.suffix}")
            if pos != position and other.is_file():
                found[pos] = (other, read_tensor(other))
    shape = tuple(found[position][1].shape)
    for f, t in found.values():
        if tuple(t.shape) != shape:
            raise VectorError(f"'{f}' has shape {list(t.shape)} but '{p}' has {list(shape)}; the three files of "
                              "one trait come from one model")
    ordered = {pos: found[pos] for pos in POSITION_FILES if pos in found}
    return ReferenceFiles(trait=trait, files=ordered)


def check_shape(files: ReferenceFiles, model: Model) -> None:
    """Refuse tensors that do not fit `model` ([n_layers + 1, hidden]), saying what looks wrong."""
    rows, hidden = files.shape
    want_rows, want_hidden = model.n_layers + 1, model.hidden_size
    first = next(iter(files.files.values()))[0]
    if hidden != want_hidden:
        raise VectorError(f"'{first}' has vectors of length {hidden} but {model.model_id} has hidden size "
                          f"{want_hidden}; import it onto the model it was extracted from (--model)")
    if rows == want_rows - 1:
        raise VectorError(f"'{first}' has {rows} rows but {model.model_id} needs {want_rows} (row 0 = embeddings, "
                          f"rows 1..{model.n_layers} = decoder blocks); the embedding row is missing")
    if rows != want_rows:
        raise VectorError(f"'{first}' has {rows} rows but {model.model_id} has {model.n_layers} decoder blocks and "
                          f"needs {want_rows} (n_layers + 1); import it onto the model it was extracted from (--model)")


def import_reference_vector(path: str | os.PathLike[str], model: Model, *, trait: str | None = None,
                            layer: int | None = None, siblings: bool = True) -> PersonaVector:
    """A PersonaVector for `model` from the reference's ``{trait}_response_avg_diff.pt`` (and its prompt-mean and
    last-prompt-token siblings when they sit beside it). Rows keep their numbers (reference layer L = personavec
    layer L); `layer`, when given, becomes the vector's chosen layer (the reference's ``--layer``)."""
    files = read_reference_files(path, siblings=siblings)
    check_shape(files, model)
    if layer is not None and not 1 <= from_reference_layer(layer) <= model.n_layers:
        raise VectorError(f"--layer {layer} is out of range 1..{model.n_layers} (L = output of decoder block L)")
    rows = model.n_layers + 1
    # personavec row L takes the reference's row to_reference_layer(L) (the same number; said explicitly)
    tensors = {pos: t[[to_reference_layer(r) for r in range(rows)]].clone() for pos, (_, t) in files.files.items()}
    source = Path(path)
    meta: dict[str, Any] = {
        "model_id": model.model_id, "fingerprint": model.fingerprint, "hidden_size": model.hidden_size,
        "n_layers": model.n_layers, "layer_convention": LAYER_CONVENTION, "positions": list(tensors),
        "trait": trait or files.trait, "created": now_iso(), "version": __version__,
        "imported_from": {
            "format": FORMAT, "path": str(source), "sha256": sha256_file(source),
            "files": {pos: {"path": str(f), "sha256": sha256_file(f)} for pos, (f, _) in files.files.items()},
            "model_hint": source.resolve().parent.name or None, "convention": REFERENCE_CONVENTION,
            "note": LAST_ROW_NOTE,
        },
    }
    if layer is not None:
        meta["best_layer"] = from_reference_layer(layer)
    return PersonaVector(tensors=tensors, meta=meta)


def export_reference_vector(vec: PersonaVector, directory: str | os.PathLike[str],
                            trait: str | None = None) -> list[Path]:
    """Write each position as the reference's ``{trait}_{kind}.pt`` (float32 [n_layers + 1, hidden], rows in the
    same numbering) for its ``eval_persona.py --vector_path``. Returns the files written."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise VectorError(f"'{folder}' is a file; the reference format is a folder of .pt files")
    name = trait or vec.trait
    written = []
    for pos, kind in POSITION_FILES.items():
        if pos not in vec.tensors:
            continue
        rows = vec.tensors[pos].detach().float().cpu()
        target = folder / f"{name}_{kind}.pt"
        with atomic_path(target) as tmp:
            # the reference's row k takes personavec's row from_reference_layer(k)
            torch.save(rows[[from_reference_layer(k) for k in range(vec.n_layers + 1)]].clone(), str(tmp))
        written.append(target)
    if not written:
        raise VectorError(f"vector '{vec.trait}' has none of the positions {', '.join(POSITION_FILES)}")
    return written


# ---- trait files -------------------------------------------------------------------------------------------------
EXTRACT_DIR, EVAL_DIR = "trait_data_extract", "trait_data_eval"
_EVAL_HEAD_RE = re.compile(r"^\s*You are evaluating whether the model's response displays the trait:\s*\*\*[^*]*\*\*\.?\s*")


@dataclass
class ReferenceTraitFiles:
    """The raw content of one trait's reference JSON files: {"extract": data, "eval": data} (either may be
    missing) and where each came from."""

    name: str
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def _role(path: Path) -> str | None:
    parent = path.parent.name
    return "extract" if parent == EXTRACT_DIR else "eval" if parent == EVAL_DIR else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TraitError(f"'{path}' is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise TraitError(f"'{path}' is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise TraitError(f"'{path}' holds a JSON {type(data).__name__}; a reference trait file is an object with "
                         "instruction, questions and eval_prompt")
    known = [k for k in ("instruction", "questions", "eval_prompt") if k in data]
    if not known:
        raise TraitError(f"'{path}' has none of the keys instruction, questions, eval_prompt; it is not a reference "
                         "trait file (data_generation/trait_data_extract/TRAIT.json)")
    if "instruction" in data:
        pairs = data["instruction"]
        if not isinstance(pairs, list) or not pairs:
            raise TraitError(f"'{path}': 'instruction' must be a non-empty list of {{\"pos\": ..., \"neg\": ...}}")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, dict) and all(isinstance(pair.get(k), str) and pair[k].strip()
                                                   for k in ("pos", "neg"))):
                raise TraitError(f"'{path}': instruction[{i}] must be an object with non-empty 'pos' and 'neg' "
                                 "strings")
    if "questions" in data and not (isinstance(data["questions"], list)
                                    and all(isinstance(q, str) for q in data["questions"])):
        raise TraitError(f"'{path}': 'questions' must be a list of strings")
    if "eval_prompt" in data and not isinstance(data["eval_prompt"], str):
        raise TraitError(f"'{path}': 'eval_prompt' must be a string")
    return data


def _trait_dirs(folder: Path) -> tuple[Path, Path] | None:
    """(extract dir, eval dir) for a folder that is data_generation/, its parent, or one of the two dirs."""
    for base in (folder, folder / "data_generation"):
        if (base / EXTRACT_DIR).is_dir() or (base / EVAL_DIR).is_dir():
            return base / EXTRACT_DIR, base / EVAL_DIR
    if folder.name in (EXTRACT_DIR, EVAL_DIR):
        return folder.parent / EXTRACT_DIR, folder.parent / EVAL_DIR
    return None


def find_reference_traits(source: str | os.PathLike[str], name: str | None = None) -> ReferenceTraitFiles:
    """Locate and read one trait's JSON files. `source`: a folder (data_generation/, the repository root, or
    trait_data_extract/ / trait_data_eval/; `name` picks the trait when it holds several) or one JSON file (its
    sibling in the other trait_data_* folder is read too when it exists). The files' own name is kept in
    `.name` (a `name` that picks nothing, given one trait, only renames it in reference_trait)."""
    src = Path(source)
    if not src.exists():
        raise TraitError(f"'{src}' does not exist; pass the reference's data_generation folder or a trait JSON file")
    found = ReferenceTraitFiles(name=src.stem)
    if src.is_file():
        role = _role(src)
        if role is None:
            found.data["single"], found.paths["single"] = _read_json(src), src
        else:
            found.data[role], found.paths[role] = _read_json(src), src
            other = "eval" if role == "extract" else "extract"
            sibling = src.parent.parent / (EVAL_DIR if other == "eval" else EXTRACT_DIR) / src.name
            if sibling.is_file():
                found.data[other], found.paths[other] = _read_json(sibling), sibling
        return found
    dirs = _trait_dirs(src)
    if dirs is None:
        raise TraitError(f"'{src}' holds neither {EXTRACT_DIR}/ nor {EVAL_DIR}/; pass the reference's data_generation "
                         "folder or a trait JSON file")
    names = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.json")})
    if name is None or (name not in names and len(names) == 1):  # one trait: `name` only renames it
        if len(names) != 1:
            listed = ", ".join(names[:12]) + (" …" if len(names) > 12 else "")
            raise TraitError(f"'{src}' holds {len(names)} traits ({listed or 'none'}); choose one with --name"
                             if names else f"'{src}' holds no trait JSON files in {EXTRACT_DIR}/ or {EVAL_DIR}/")
        found.name = names[0]
    elif name not in names:
        raise TraitError(f"no trait '{name}' in '{src}'; it holds {', '.join(names) or 'none'}")
    else:
        found.name = name
    for role, d in zip(("extract", "eval"), dirs, strict=True):
        f = d / f"{found.name}.json"
        if f.is_file():
            found.data[role], found.paths[role] = _read_json(f), f
    return found


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _description(eval_prompt: str | None) -> str | None:
    """The trait's definition from their judge prompt: the first paragraph, less the fixed opening."""
    if not eval_prompt:
        return None
    first = eval_prompt.strip().split("\n\n")[0]
    text = _EVAL_HEAD_RE.sub("", first).strip()
    return text or first.strip() or None


def _rubric(eval_prompt: str) -> str:
    """Their prompts are filled with str.format: literal braces are doubled there, single here."""
    return eval_prompt.replace("{{", "{").replace("}}", "}")


def reference_trait(files: ReferenceTraitFiles, *, name: str | None = None, description: str | None = None,
                    assistant_prefix: bool = True, pos_name: str | None = None,
                    neg_name: str = "helpful") -> tuple[Trait, list[str]]:
    """One validated Trait from the reference's extraction and evaluation files, and notes for the file header.
    Pairs come from the extraction file (the evaluation file's when that is all there is), extraction_questions
    from trait_data_extract, evaluation_questions from trait_data_eval, the rubric from the evaluation file's
    eval_prompt (else the extraction file's). A missing part gives one line naming it."""
    from pydantic import ValidationError

    from ..traits import PromptPair, Trait
    from ..traits import _one_line as one_line

    trait_name = (name or files.name).strip()
    safe = re.sub(r"[^a-z0-9_-]+", "_", trait_name.lower()).strip("_-") or "trait"
    if not safe[0].isalpha():
        safe = "t_" + safe
    if "single" in files.paths:
        raise TraitError(f"'{files.paths['single']}' is in neither {EXTRACT_DIR}/ nor {EVAL_DIR}/, so its questions "
                         "cannot be told extraction or evaluation questions, and a trait needs both: pass the "
                         f"data_generation folder, or a file in {EXTRACT_DIR}/ with its {EVAL_DIR}/ partner")
    ext, ev = files.data.get("extract"), files.data.get("eval")
    where = ", ".join(str(p) for p in files.paths.values())
    missing = []
    if ext is None or not ext.get("questions"):
        missing.append(f"extraction questions ({EXTRACT_DIR}/{files.name}.json)")
    if ev is None or not ev.get("questions"):
        missing.append(f"evaluation questions ({EVAL_DIR}/{files.name}.json)")
    pairs_raw = next((d["instruction"] for d in (ext, ev) if d is not None and d.get("instruction")), None)
    prompt = next((d["eval_prompt"] for d in (ev, ext) if d is not None and d.get("eval_prompt")), None)
    if pairs_raw is None:
        missing.append("system-prompt pairs ('instruction')")
    if prompt is None:
        missing.append("the judge prompt ('eval_prompt')")
    desc = description or _description(prompt)
    if desc is None and prompt is not None:
        missing.append("a description (pass --description)")
    if missing:
        raise TraitError(f"{where} lacks what a trait file needs: " + "; ".join(missing))
    assert pairs_raw is not None and prompt is not None and desc is not None
    positive = pos_name or files.name  # their --assistant_name default for pos: the trait as the files name it
    pairs = [PromptPair(positive=(f"You are {_article(positive)} {positive} assistant. " if assistant_prefix else "")
                        + p["pos"].strip(),
                        negative=(f"You are {_article(neg_name)} {neg_name} assistant. " if assistant_prefix else "")
                        + p["neg"].strip()) for p in pairs_raw]
    assert ext is not None and ev is not None
    try:
        trait = Trait(name=safe, description=desc, pairs=pairs, extraction_questions=list(ext["questions"]),
                      evaluation_questions=list(ev["questions"]), rubric=_rubric(prompt))
    except ValidationError as exc:
        raise TraitError(f"{where}: {one_line(exc)}") from None
    notes = [f"Imported by 'personavec traits import' from the persona_vectors reference implementation's files on "
             f"{now_iso()}:"]
    notes += [f"  {role}: {p} (sha256 {sha256_file(p)[:16]})" for role, p in files.paths.items()]
    notes.append("System prompts: " + (f"'You are {_article(positive)} {positive} assistant.' / 'You are "
                                       f"{_article(neg_name)} {neg_name} assistant.' prepended to each pos / neg "
                                       "instruction, as their --assistant_name does." if assistant_prefix
                                       else "the pos / neg instructions as written (no assistant-name prefix)."))
    if ext.get("instruction") and ev.get("instruction") and ext["instruction"] != ev["instruction"]:
        notes.append("The evaluation file's instruction pairs differ from the extraction file's; the extraction "
                     "file's are used.")
    if ext.get("eval_prompt") and ev.get("eval_prompt") and ext["eval_prompt"] != ev["eval_prompt"]:
        notes.append("The two files' eval_prompt differ; the evaluation file's is the rubric.")
    if description is None:
        notes.append("The description is the first paragraph of their eval_prompt.")
    notes.append("No authored reference answers: the offline measure falls back to the contrast judge until "
                 "`references` are added.")
    return trait, notes


def import_reference_traits(source: str | os.PathLike[str], out: str | os.PathLike[str], *, name: str | None = None,
                            description: str | None = None, assistant_prefix: bool = True,
                            pos_name: str | None = None, neg_name: str = "helpful",
                            overwrite: bool = False) -> tuple[Trait, Path]:
    """Read the reference's trait JSON file(s) at `source` and write one validated personavec trait YAML."""
    from ..traitgen import write_trait_file

    target = Path(out)
    if target.exists() and not overwrite:
        raise TraitError(f"'{target}' already exists; choose another --out or pass --force to replace it")
    files = find_reference_traits(source, name)
    trait, notes = reference_trait(files, name=name, description=description, assistant_prefix=assistant_prefix,
                                   pos_name=pos_name, neg_name=neg_name)
    return trait, write_trait_file(trait, target, "\n".join(notes), overwrite=overwrite)
