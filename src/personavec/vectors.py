"""PersonaVector: per-layer trait directions plus the provenance that says where they came from.

File format (safetensors): one float32 tensor per capture position ("response", "prompt",
"last_prompt"), each of shape [n_layers + 1, hidden]; row 0 is the embedding output, row L the output
of decoder block L (1-based, the paper's convention). Metadata key "personavec" holds a JSON object:
model_id, fingerprint, hidden_size, n_layers, trait, trait_sha256, judge, threshold, counts, version,
created, layer_convention, and optionally best_layer / best_coef chosen by a sweep; and format_version, the
version of this file layout (absent in files written before it existed: those are format 1). Loading a file
of a newer format than FORMAT_VERSION is refused. The format version belongs to the file, not the vector:
`save` writes it and `load` takes it out of `meta`."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import VectorError
from .io import atomic_path
from .layers import check_layer

if TYPE_CHECKING:
    from .models import Model
    from .steering import Handle, Positions

LAYER_CONVENTION = "index 0 = embedding output; index L = output of decoder block L (1-based)"
META_KEY = "personavec"
# The vector file layout this code writes and the newest it reads. Raise it when a change would make older
# personavec releases misread a file (a renamed tensor, a changed layer convention), not for new metadata keys.
FORMAT_VERSION = 1


def default_layer(n_layers: int) -> int:
    """Where to steer before a sweep has chosen: about 60% of the depth (the paper's layers 20/28 and 16/32
    for Qwen2.5-7B and Llama-3.1-8B fall at 50-70%)."""
    return max(1, min(n_layers, round(0.6 * n_layers)))


@dataclass
class PersonaVector:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- identity -------------------------------------------------------------------------------
    @property
    def trait(self) -> str:
        return str(self.meta.get("trait", "unknown"))

    @property
    def n_layers(self) -> int:
        return next(iter(self.tensors.values())).shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return next(iter(self.tensors.values())).shape[1]

    @property
    def layer(self) -> int:
        """The layer to steer by default: the sweep's choice, else about 60% of the depth."""
        return int(self.meta.get("best_layer") or default_layer(self.n_layers))

    def __getitem__(self, layer: int) -> torch.Tensor:
        """The response-mean vector at `layer` (0..n_layers)."""
        return self.at(layer)

    def at(self, layer: int, position: str = "response") -> torch.Tensor:
        if position not in self.tensors:
            raise VectorError(f"this vector has no '{position}' tensor; it has {', '.join(self.tensors)}")
        if not 0 <= layer <= self.n_layers:
            raise VectorError(f"layer {layer} is out of range 0..{self.n_layers}")
        return self.tensors[position][layer]

    def incremental(self, position: str = "response") -> dict[int, torch.Tensor]:
        """v_L − v_{L−1} for every layer L ≥ 1: steering all layers with these adds each layer's own part."""
        t = self.tensors[position]
        return {layer: t[layer] - t[layer - 1] for layer in range(1, self.n_layers + 1)}

    # ---- compatibility ---------------------------------------------------------------------------
    def check_model(self, model: Model, allow_mismatch: bool = False) -> None:
        """Refuse a model of another shape always, and of other weights unless `allow_mismatch`."""
        if self.n_layers != model.n_layers or self.hidden_size != model.hidden_size:
            raise VectorError(f"vector '{self.trait}' has shape [{self.n_layers + 1}, {self.hidden_size}] but model "
                              f"{model.model_id} needs [{model.n_layers + 1}, {model.hidden_size}]; extract a vector "
                              "for this model")
        fp = self.meta.get("fingerprint")
        if fp and fp != model.fingerprint and not allow_mismatch:
            raise VectorError(f"vector '{self.trait}' was extracted from {self.meta.get('model_id')} (weights {fp}), "
                              f"not from {model.model_id} (weights {model.fingerprint}); pass "
                              "--allow-model-mismatch (allow_mismatch=True) to apply it anyway")

    # ---- steering --------------------------------------------------------------------------------
    def steer(self, model: Model, layer: int | Sequence[int] | str | None = None, coef: float = 1.0,
              positions: Positions = "response", position: str = "response",
              allow_mismatch: bool = False) -> Handle:
        """Add coef × v[L] at `layer` (default: self.layer), a list of layers, or "all" (incremental
        vectors at every layer). Returns a handle usable as a context manager."""
        from .steering import steer

        return steer(model, self.layer_vectors(model, layer, position, allow_mismatch), coef=coef,
                     positions=positions)

    def layer_vectors(self, model: Model, layer: int | Sequence[int] | str | None = None,
                      position: str = "response", allow_mismatch: bool = False) -> dict[int, torch.Tensor]:
        """{layer: vector} that `steer` adds for `layer` (default self.layer, a list, or "all": incremental
        vectors at every layer), checked against the model; engines carry the same mapping as data."""
        self.check_model(model, allow_mismatch)
        if layer == "all":
            return self.incremental(position)
        if isinstance(layer, str):
            raise VectorError(f"layer must be an integer, a list of integers or 'all', got {layer!r}")
        layers = [self.layer] if layer is None else [layer] if isinstance(layer, int) else list(layer)
        if not layers:
            raise VectorError("layer list is empty; name at least one layer")
        return {check_layer(ly, model.n_layers): self.at(ly, position) for ly in layers}

    # ---- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        if Path(path).is_dir():  # a pretrained folder: rewrite it whole (vector, config, card)
            return self.save_pretrained(path) / "vector.pv.safetensors"
        final = Path(path)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.tensors.items()}
        for name, t in tensors.items():  # never write a file that `load` would refuse
            check_finite(t, f"the vector for '{final}' (tensor '{name}')",
                         fix="nothing was written (did a scale or a sum overflow float32? use smaller factors)")
        with atomic_path(final) as tmp:
            meta = {**self.meta, "format_version": FORMAT_VERSION}
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str)})
        return final

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PersonaVector:
        from safetensors import safe_open

        p = Path(path)
        if p.is_dir():  # a folder written by save_pretrained
            return cls.from_pretrained(p)
        if not p.is_file():
            raise VectorError(f"vector file '{p}' does not exist; create it with 'personavec extract'")
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta_raw = (fh.metadata() or {}).get(META_KEY)
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as exc:
            raise VectorError(f"'{p}' is not a readable safetensors vector file ({type(exc).__name__})") from None
        if meta_raw is None or not tensors:
            raise VectorError(f"'{p}' has no personavec metadata; it was not written by personavec")
        try:
            meta = json.loads(meta_raw)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise VectorError(f"'{p}' has malformed personavec metadata (not a JSON object); it was not written by "
                              "personavec or was edited: re-extract or re-export it")
        check_format_version(meta.pop("format_version", 1), p)  # before the layout checks a newer format may fail
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise VectorError(f"'{p}' holds tensors of shapes {sorted(shapes)}; expected one [n_layers + 1, hidden]")
        for name, t in tensors.items():
            check_finite(t, f"'{p}' (tensor '{name}')")
        _check_choice(meta, next(iter(shapes))[0] - 1, p)
        return cls(tensors=tensors, meta=meta)

    # ---- Hugging Face style folders (personavec.interop.pretrained) --------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str], *, repo_id: str | None = None) -> Path:
        """Write a folder: the vector file, config.json and a generated README.md model card (front matter
        for the hub; trait, model, layer and its numbering, how it was made, measured figures)."""
        from .interop.pretrained import save_pretrained

        return save_pretrained(self, directory, repo_id=repo_id)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike[str], *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | None = None,
                        local_files_only: bool = False) -> PersonaVector:
        """A folder written by save_pretrained (or a vector file), else a Hugging Face hub id ('owner/name')
        downloaded with huggingface_hub.snapshot_download."""
        from .interop.pretrained import from_pretrained

        return from_pretrained(source, revision=revision, cache_dir=cache_dir, token=token,
                               local_files_only=local_files_only)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, revision: str | None = None) -> str:
        """Upload the save_pretrained folder to the hub model repo `repo_id` (created if needed); needs
        huggingface_hub. Returns the commit URL."""
        from .interop.pretrained import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message,
                           revision=revision)

    def digest(self) -> str:
        """Hash of the tensors (not the metadata): identifies the directions a run used."""
        h = hashlib.sha256()
        for key in sorted(self.tensors):
            h.update(key.encode())
            h.update(self.tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def with_meta(self, **updates: Any) -> PersonaVector:
        return PersonaVector(tensors=self.tensors, meta={**self.meta, **updates})

    def summary(self) -> dict[str, Any]:
        """Per-layer norms and the metadata, for `personavec vector info`."""
        norms = {p: [round(float(x), 4) for x in t.norm(dim=1)] for p, t in self.tensors.items()}
        return {"meta": self.meta, "shape": [self.n_layers + 1, self.hidden_size], "norms": norms}


def check_format_version(version: Any, path: Path) -> None:
    """Refuse a vector file written in a layout newer than this code knows (or with a malformed version)."""
    from ._version import __version__

    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise VectorError(f"'{path}' has a malformed format_version {version!r}; it was not written by personavec")
    if version > FORMAT_VERSION:
        raise VectorError(f"'{path}' is a vector file of format {version}, newer than personavec {__version__} "
                          f"reads (format {FORMAT_VERSION}); upgrade personavec to load it")


def _check_choice(meta: dict[str, Any], n_layers: int, path: Path) -> None:
    """Refuse a sweep's choice that steering would trip over later: best_layer must be a layer of the vector
    and best_coef a finite number (either may be absent or null)."""
    layer, coef = meta.get("best_layer"), meta.get("best_coef")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= n_layers):
        raise VectorError(f"'{path}' has best_layer {layer!r} in its metadata, not a layer 1..{n_layers}; it was "
                          "edited: re-run 'personavec sweep' or remove the key")
    if coef is not None and (not isinstance(coef, int | float) or isinstance(coef, bool) or not math.isfinite(coef)):
        raise VectorError(f"'{path}' has best_coef {coef!r} in its metadata, not a finite number; it was edited: "
                          "re-run 'personavec sweep' or remove the key")


def check_finite(rows: torch.Tensor, what: str, first_layer: int = 0,
                 fix: str = "the file is corrupt: re-extract or re-export the vector") -> None:
    """Refuse a vector holding NaN or Inf: steering with it would turn every activation after its layer into
    NaN. `rows` is [layers, hidden] (row k is layer `first_layer` + k); the one line names `what` (the file and
    its tensor or direction), the layer and the element, then `fix`. Every vector reader and `save` call this."""
    bad = ~torch.isfinite(rows)
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in bad.nonzero()[0])
    row, col = (index[0], index[-1]) if len(index) > 1 else (0, index[0])
    raise VectorError(f"{what} holds NaN or infinite values, first at layer {first_layer + row} (element {col}: "
                      f"{float(rows[index])}); {fix}")


def name_by_trait(vectors: Sequence[PersonaVector] | Mapping[str, PersonaVector]) -> dict[str, PersonaVector]:
    """{name: vector}: a mapping as given, a sequence named by each vector's trait. Two vectors of one trait
    would be ambiguous (in a request, a column name, a report), so they are refused."""
    if isinstance(vectors, Mapping):
        return dict(vectors)
    named: dict[str, PersonaVector] = {}
    for vec in vectors:
        if vec.trait in named:
            raise VectorError(f"two vectors for trait '{vec.trait}'; pass one vector per trait")
        named[vec.trait] = vec
    return named


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def load_vector(path: str | os.PathLike[str]) -> PersonaVector:
    return PersonaVector.load(path)
