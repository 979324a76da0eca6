"""Trait files: load a built-in trait by name or a user's YAML file, validated with a one-line error."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import TraitError
from .schema import MIN_PAIRS, PromptPair, Reference, Trait, normalize_question

__all__ = ["MIN_PAIRS", "LoadedTrait", "PromptPair", "Reference", "Trait", "builtin_traits", "load_trait",
           "normalize_question", "parse_trait"]


@dataclass(frozen=True)
class LoadedTrait:
    """A validated trait with where it came from and the hash of its exact bytes (for provenance)."""

    trait: Trait
    source: str
    sha256: str


def _library() -> dict[str, Path]:
    folder = resources.files(__package__) / "library"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def builtin_traits() -> list[str]:
    return sorted(_library())


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "file"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (+{len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"field '{where}': {msg}{more}"


def parse_trait(text: str, source: str = "<string>") -> Trait:
    """Parse and validate YAML text; raise TraitError naming the source and the first bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TraitError(f"trait file {source}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise TraitError(f"trait file {source}: expected a mapping with name, description, pairs, "
                         "extraction_questions, evaluation_questions and rubric")
    try:
        return Trait.model_validate(data)
    except ValidationError as exc:
        raise TraitError(f"trait file {source}: {_one_line(exc)}") from None


def load_trait(name_or_path: str | Path) -> LoadedTrait:
    """A built-in trait name (e.g. 'evil') or the path of a trait YAML file."""
    path = Path(name_or_path)
    library = _library()
    if str(name_or_path) in library and not path.exists():
        path = library[str(name_or_path)]
    elif not path.exists():
        raise TraitError(f"unknown trait '{name_or_path}': not a built-in ({', '.join(sorted(library))}) "
                         "nor an existing file")
    if path.is_dir():
        raise TraitError(f"trait file {path} is a folder; pass a .yaml file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TraitError(f"trait file {path}: not UTF-8 text") from None
    return LoadedTrait(trait=parse_trait(text, str(path)), source=str(path),
                       sha256=hashlib.sha256(raw).hexdigest())
