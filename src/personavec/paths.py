"""The one output guard: every command names its inputs and outputs once, and an output that is, or would
replace, an input is refused before any work starts (symlinks, hard links and relative paths resolved). It
also refuses outputs whose place cannot hold them (a folder where a file goes, a file where a folder goes, a
parent that is a file) and two outputs on one path, so such runs fail in one line before the model loads."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import PersonavecError


@dataclass(frozen=True)
class Output:
    """A path a command writes: a file, or a folder it fills (everything inside counts as written by it)."""

    option: str
    path: Path
    folder: bool = False


def existing_paths(values: Iterable[str | os.PathLike[str] | None]) -> list[Path]:
    """The values that name an existing file or folder: a spec such as a trait name, a hub id or 'random'
    names no path and is left out."""
    return [Path(v) for v in values if v is not None and str(v) and Path(v).exists()]


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also a hard link
    return a.resolve() == b.resolve()


def _inside(child: Path, folder: Path) -> bool:
    return child.resolve().is_relative_to(folder.resolve())


def _check_place(o: Output) -> None:
    """The output's own path and its nearest existing ancestor can hold what is written there."""
    if o.path.exists():
        if o.folder and not o.path.is_dir():
            raise PersonavecError(f"{o.option} '{o.path}' is a file, and a folder is written there; name a folder")
        if not o.folder and o.path.is_dir():
            raise PersonavecError(f"{o.option} '{o.path}' is a folder; name a file")
        return
    for parent in o.path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise PersonavecError(f"{o.option} '{o.path}': '{parent}' on its path is a file, not a folder; "
                                      "choose another path")
            return


def check_outputs(inputs: Mapping[str, Sequence[Path]], outputs: Sequence[Output]) -> None:
    """Refuse (one line) any output that is an input, would replace one (an input inside an output folder),
    shares its path with another output, or cannot be written where it is. `inputs` maps each option to the existing paths it named (see `existing_paths`)."""
    named = [(option, p) for option, paths in inputs.items() for p in paths if p.exists()]
    for i, o in enumerate(outputs):
        for option, p in named:
            if _same(o.path, p):
                raise PersonavecError(f"{o.option} '{o.path}' is the input {option}; personavec never overwrites "
                                      "an input: name a new path")
            if o.folder and _inside(p, o.path):
                raise PersonavecError(f"{o.option} '{o.path}' holds the input {option} '{p}', and the command "
                                      "writes into that folder; move the input or name another folder")
        _check_place(o)
        for other in outputs[i + 1:]:
            if _same(o.path, other.path):
                raise PersonavecError(f"{o.option} and {other.option} both name '{o.path}'; give each its own path")


def refuse_existing(path: Path, option: str = "--out", force: bool = False) -> None:
    """Refuse to replace an existing result that no rerun would give back, unless asked to (--force)."""
    if path.exists() and not force:
        raise PersonavecError(f"{option} '{path}' already exists; choose another {option} or pass --force to "
                              "replace it")
