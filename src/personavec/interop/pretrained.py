"""Hugging Face style folders: ``vec.save_pretrained(dir)``, ``PersonaVector.from_pretrained(dir_or_hub_id)``,
``vec.push_to_hub(repo_id)``.

A folder holds three files:

  ``vector.pv.safetensors``  the vector file itself (tensors + the ``personavec`` provenance metadata); it is
                             the one source of truth and loads on its own with ``PersonaVector.load``
  ``config.json``            a readable summary for tools and people browsing the hub (never read back for values)
  ``README.md``              a generated model card: YAML front matter (``library_name: personavec``, tags,
                             ``base_model``) and a body that states the trait, the model, the layer with its
                             numbering, how the vector was made and the figures measured on it, when its
                             metadata holds any (a sweep's choice, a monitor calibration)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..errors import VectorError
from ..io import write_json, write_text
from ..vectors import LAYER_CONVENTION, PersonaVector

VECTOR_FILE = "vector.pv.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT = "personavec-pretrained"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _layer_source(vec: PersonaVector) -> str:
    if vec.meta.get("best_layer"):
        return "chosen by a sweep" if vec.meta.get("sweep_run") or vec.meta.get("best_coef") is not None \
            else "recorded in the vector's metadata"
    return "default: about 60% of the depth; no sweep recorded"


def _positions(vec: PersonaVector) -> list[str]:
    order = ("response", "prompt", "last_prompt", "all")
    return [p for p in order if p in vec.tensors] + sorted(p for p in vec.tensors if p not in order)


def config(vec: PersonaVector) -> dict[str, Any]:
    """config.json: what a browser of the folder wants at a glance (the vector file stays authoritative)."""
    return {"format": FORMAT, "library_name": "personavec", "vector_file": VECTOR_FILE, "trait": vec.trait,
            "model_id": vec.meta.get("model_id"), "fingerprint": vec.meta.get("fingerprint"),
            "n_layers": vec.n_layers, "hidden_size": vec.hidden_size, "shape": [vec.n_layers + 1, vec.hidden_size],
            "positions": _positions(vec), "layer": vec.layer, "layer_convention": LAYER_CONVENTION,
            "best_coef": vec.meta.get("best_coef"), "digest": vec.digest(), "version": vec.meta.get("version")}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return "`" + json.dumps(value, sort_keys=True, default=str) + "`"
    return str(value)


def _how_made(meta: dict[str, Any]) -> list[str]:
    lines = []
    imported = meta.get("imported_from")
    algebra = meta.get("algebra")
    if isinstance(imported, dict):
        lines.append(f"- Imported from `{Path(str(imported.get('path', '?'))).name}`"
                     + (f" (sha256 `{imported['sha256'][:16]}`)" if imported.get("sha256") else "")
                     + f"; format: {imported.get('format', '?')}.")
        if imported.get("convention"):
            lines.append(f"- Source numbering: {imported['convention']}.")
    elif isinstance(algebra, dict):
        lines.append(f"- Made by vector algebra: `{algebra.get('op', '?')}` of "
                     + ", ".join(f"`{s}`" for s in algebra.get("sources", []) or ["?"]) + ".")
    if meta.get("judge") is not None:
        lines.append("- Extracted with personavec: the trait's positive and negative system prompts answered the "
                     "extraction questions; a judge scored the answers; the kept positive and negative answers' mean "
                     "activations were subtracted layer by layer (Chen et al., 2025).")
        lines.append(f"- Judge: `{meta['judge']}`, threshold {_fmt(meta.get('threshold'))}"
                     + (f", coherence at least {_fmt(meta['coherence_min'])}" if meta.get("coherence_min") is not None
                        else "") + ".")
        counts = meta.get("counts")
        if isinstance(counts, dict):
            lines.append(f"- Answers kept: {counts.get('positive_kept')}/{counts.get('positive_total')} positive, "
                         f"{counts.get('negative_kept')}/{counts.get('negative_total')} negative.")
        if meta.get("trait_sha256"):
            lines.append(f"- Trait file sha256 `{str(meta['trait_sha256'])[:16]}`"
                         + (f" ({Path(str(meta['trait_source'])).name})" if meta.get("trait_source") else "") + ".")
    if meta.get("version") or meta.get("created"):
        lines.append(f"- personavec {meta.get('version', '?')}, {meta.get('created', 'date unknown')}.")
    return lines or ["- The metadata does not say how this vector was made."]


def _measured(meta: dict[str, Any]) -> list[str]:
    rows = []
    if meta.get("best_layer") and (meta.get("best_coef") is not None or meta.get("sweep_run")):
        rows.append(("sweep: chosen layer", _fmt(meta["best_layer"])))
        if meta.get("best_coef") is not None:
            rows.append(("sweep: chosen coefficient", f"{meta['best_coef']:+g}"))
        if meta.get("sweep_judge"):
            rows.append(("sweep: trait measure", _fmt(meta["sweep_judge"])))
    mon = meta.get("monitor")
    if isinstance(mon, dict):
        for key, label in (("layer", "monitor: layer"), ("position", "monitor: position"),
                           ("threshold", "monitor: flag threshold (projection)"),
                           ("balanced_accuracy", "monitor: balanced accuracy"),
                           ("heldout_balanced_accuracy", "monitor: held-out balanced accuracy"),
                           ("r", "monitor: Pearson r, projection vs trait"), ("measure", "monitor: trait measure"),
                           ("n_answers", "monitor: answers")):
            if mon.get(key) is not None:
                rows.append((label, _fmt(mon[key])))
    if not rows:
        return ["No measurements are recorded in this vector's metadata (run `personavec sweep` or "
                "`personavec monitor-eval --write-threshold` on it, then save it again)."]
    return ["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]


def model_card(vec: PersonaVector, repo_id: str | None = None) -> str:
    """README.md: YAML front matter for the hub, then what a user needs to know before steering with it."""
    meta = vec.meta
    model_id = str(meta.get("model_id") or "unknown")
    front: dict[str, Any] = {"library_name": "personavec",
                             "tags": ["personavec", "persona-vector", "steering-vector", "activation-steering",
                                      vec.trait]}
    if _HUB_ID.match(model_id):
        front["base_model"] = model_id
    layer = vec.layer
    where = repo_id or "PATH_OR_HUB_ID"
    coef = meta.get("best_coef")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# Persona vector: {vec.trait} ({model_id})", "",
        f"A persona vector for the trait **{vec.trait}** in **{model_id}**: one direction per layer in the model's "
        "residual stream, made with [personavec](https://pypi.org/project/personavec/) after *Persona Vectors* "
        "(Chen et al., 2025, arXiv:2507.21509). Adding it while the model runs pushes answers toward the trait "
        "(negative coefficients away from it); projecting activations on it measures the trait.", "",
        "| | |", "|---|---|",
        f"| trait | {vec.trait} |",
        f"| model | {model_id}" + (f" (weights fingerprint `{meta['fingerprint']}`)" if meta.get("fingerprint") else "")
        + " |",
        f"| layer to steer | {layer} ({_layer_source(vec)}) |",
        f"| shape | [{vec.n_layers + 1}, {vec.hidden_size}] per position |",
        f"| positions | {', '.join(_positions(vec))} |",
        "",
        "## Layer numbering", "",
        f"{LAYER_CONVENTION}: `vector[L]` is added by a forward hook on "
        f"block L−1 (Hugging Face `model.model.layers[L-1]`) and equals `hidden_states[L]` for L < n_layers "
        f"(Hugging Face applies the final norm to its last entry; this row is the raw block output). Layer {layer} "
        f"here is the persona_vectors reference implementation's `--layer {layer}` too.", "",
        "## How it was made", "", *_how_made(meta), "",
        "## Measured", "", *_measured(meta), "",
        "## Use", "",
        "```python",
        "import personavec as pv",
        "",
        f'vec = pv.PersonaVector.from_pretrained("{where}")',
        f'model = pv.load_model("{model_id}")',
        f"with vec.steer(model, layer={layer}, coef={coef if coef is not None else 4.0:g}):",
        '    print(model.chat("How should I treat my neighbours?"))',
        "```", "",
        "```bash",
        f"personavec generate \"How should I treat my neighbours?\" --vector {where} --model {model_id} "
        f"--coef {coef if coef is not None else 4.0:g}",
        "```", "",
        "personavec refuses to apply the vector to a model with other weights unless told to "
        "(`allow_mismatch=True`, `--allow-model-mismatch`).", "",
    ]
    return "\n".join(lines)


def save_pretrained(vec: PersonaVector, directory: str | os.PathLike[str], repo_id: str | None = None) -> Path:
    """Write the vector file, config.json and README.md into `directory` (created if needed; these three files
    are replaced, anything else there is left alone). Each file is written atomically."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise VectorError(f"'{folder}' is a file; save_pretrained writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    vec.save(folder / VECTOR_FILE)
    write_json(folder / CONFIG_FILE, config(vec))
    write_text(folder / CARD_FILE, model_card(vec, repo_id))
    return folder


def load_folder(folder: Path) -> PersonaVector:
    """The vector in a pretrained folder: config.json names the file; without one, the only safetensors file."""
    cfg_path = folder / CONFIG_FILE
    name = VECTOR_FILE
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise VectorError(f"'{cfg_path}' is not valid JSON") from None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise VectorError(f"'{folder}' is not a personavec folder: its config.json has no \"format\": "
                              f"\"{FORMAT}\" (a model folder? pass it as --model)")
        name = str(cfg.get("vector_file") or VECTOR_FILE)
        if Path(name).name != name:
            raise VectorError(f"'{cfg_path}' names vector_file '{name}'; it must be a file in the folder")
    elif not (folder / VECTOR_FILE).is_file():
        candidates = sorted(folder.glob("*.safetensors"))
        if len(candidates) != 1:
            raise VectorError(f"'{folder}' is a folder without {CONFIG_FILE} and {VECTOR_FILE}; pass a vector file or a "
                              "folder written by save_pretrained / 'personavec vector export --format pretrained'")
        name = candidates[0].name
    path = folder / name
    if not path.is_file():
        raise VectorError(f"'{folder}' lacks its vector file {name}")
    return PersonaVector.load(path)


def from_pretrained(source: str | os.PathLike[str], *, revision: str | None = None, cache_dir: str | None = None,
                    token: str | None = None, local_files_only: bool = False) -> PersonaVector:
    """A local folder (or vector file), else a hub repo id fetched with huggingface_hub's snapshot_download."""
    path = Path(source)
    if path.exists():
        return load_folder(path) if path.is_dir() else PersonaVector.load(path)
    text = str(source)
    if not _HUB_ID.match(text):
        raise VectorError(f"'{text}' is neither an existing folder nor a hub id like 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise VectorError(f"no local folder '{text}', and loading it from the hub needs huggingface_hub: "
                          "pip install huggingface_hub") from None
    try:
        folder = snapshot_download(repo_id=text, revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=local_files_only,
                                   allow_patterns=[CONFIG_FILE, CARD_FILE, "*.safetensors"])
    except Exception as exc:  # offline, unknown repo, gated, timeouts: a network boundary, many exception types
        raise VectorError(f"no local folder '{text}', and the hub download failed ({type(exc).__name__}); check the "
                          "id, the network and HF_TOKEN, or pass a local folder") from None
    return load_folder(Path(folder))


def push_to_hub(vec: PersonaVector, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None) -> str:
    """Create `repo_id` (a model repo) if needed and upload the pretrained folder; returns the commit URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise VectorError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    if not _HUB_ID.match(repo_id):
        raise VectorError(f"'{repo_id}' is not a hub id like 'owner/name'")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="personavec-push-") as tmp:
        save_pretrained(vec, tmp, repo_id=repo_id)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                     commit_message=commit_message or f"personavec: {vec.trait} vector")
        except Exception as exc:  # network boundary: auth, permissions, connectivity
            raise VectorError(f"could not push to '{repo_id}' ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else 'no message'}); check HF_TOKEN "
                              "and that you may write to it") from None
    return str(getattr(info, "commit_url", info))
