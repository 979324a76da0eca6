"""The README's layout section names every module of the package, and names no module that is gone: the map a
maintainer reads first must match the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "personavec"


def layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def modules() -> list[Path]:
    return sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")
                  if p.name not in ("__init__.py", "__main__.py") and "traits/library" not in p.as_posix())


def test_every_module_is_named_in_the_layout() -> None:
    block = layout_block()
    names = {w.lstrip("_") for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block)}  # `_common` is named `_common`

    def named(rel: Path) -> bool:
        if len(rel.parts) == 1:  # a top-level module has its own line
            return re.search(rf"^  {re.escape(rel.name)}\b", block, re.M) is not None
        return f"{rel.parts[0]}/" in block and rel.stem.lstrip("_") in names

    assert [str(rel) for rel in modules() if not named(rel)] == [], "README's layout does not name these"


def test_the_layout_names_no_module_that_is_gone() -> None:
    block = layout_block()
    listed = re.findall(r"^  ([a-z_]+\.py)\b", block, re.M)
    folders = re.findall(r"^  ([a-z_]+)/", block, re.M)
    assert listed and folders
    assert [name for name in listed if not (PACKAGE / name).is_file()] == []
    assert [name for name in folders if not (PACKAGE / name).is_dir()] == []
