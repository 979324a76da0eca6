"""A generated trait written as a trait file the user will review: the built-in files' key order, the
rubric as a literal block, an optional comment header, written atomically and only if it loads back."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import TraitError
from ..io import write_text
from ..traits.schema import Trait

KEY_ORDER = ("name", "description", "pairs", "extraction_questions", "evaluation_questions", "rubric",
             "graded_prompts", "references")


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the rubric) as literal blocks, readable for the review the user should do."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_BlockDumper.add_representer(str, _str)


def trait_yaml(trait: Trait, header: str = "") -> str:
    """The trait as a trait file (same key order as the built-in files), with an optional comment header."""
    data = trait.model_dump(exclude_defaults=True)
    data = {k: data[k] for k in KEY_ORDER if k in data}
    body = yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=110,
                     default_flow_style=False)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + body


def write_trait_file(trait: Trait, path: str | os.PathLike[str], header: str = "", *,
                     overwrite: bool = False) -> Path:
    """Write atomically; refuse to replace an existing file unless `overwrite`. Reparsed before returning."""
    from ..traits import parse_trait

    final = Path(path)
    if final.exists() and not overwrite:
        raise TraitError(f"'{final}' already exists; choose another --out or pass --force to replace it")
    text = trait_yaml(trait, header)
    parse_trait(text, str(final))  # what we write must load back
    write_text(final, text)
    return final
