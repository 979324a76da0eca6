"""Load a trained adapter onto its base model (the one recorded in the run folder, or one you name)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError, PersonavecError

if TYPE_CHECKING:
    from ..models import Model


def adapter_base(adapter: str | Path) -> dict[str, Any]:
    """What the adapter was trained on: {"source", "model_id", "fingerprint"} (from personavec's manifest,
    else peft's base_model_name_or_path)."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise PersonavecError(f"'{folder}' is not an adapter folder (no adapter_config.json); pass the --out of "
                              "'personavec train'")
    manifest = folder / "manifest.json"
    if manifest.is_file():
        s = json.loads(manifest.read_text()).get("settings", {})
        return {"source": s.get("model_source"), "model_id": s.get("model_id"), "fingerprint": s.get("fingerprint")}
    cfg = json.loads((folder / "adapter_config.json").read_text())
    return {"source": cfg.get("base_model_name_or_path"), "model_id": cfg.get("base_model_name_or_path"),
            "fingerprint": None}


def attach_adapter(base: Model, adapter: str | Path, *, merge: bool = False,
                   allow_mismatch: bool = False) -> Model:
    """`base` with the adapter applied (its .hf becomes a PeftModel, or merged weights with `merge`).

    The fingerprint becomes the finetuned weights', so vectors made on the base ask for allow_mismatch."""
    from peft import PeftModel

    from ..models import weight_fingerprint

    info = adapter_base(adapter)
    if info["fingerprint"] and info["fingerprint"] != base.fingerprint and not allow_mismatch:
        raise PersonavecError(f"adapter '{adapter}' was trained on {info['model_id']} (weights {info['fingerprint']}), "
                              f"not on {base.model_id} (weights {base.fingerprint}); pass --base with that model "
                              "or --allow-model-mismatch")
    try:
        peft_model = PeftModel.from_pretrained(base.hf, str(adapter))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelLoadError(f"adapter '{adapter}' does not fit model {base.model_id}: {first}") from None
    peft_model.eval()
    hf = peft_model.merge_and_unload() if merge else peft_model
    hf.requires_grad_(False)
    return dataclasses.replace(base, hf=hf, fingerprint=weight_fingerprint(hf),
                               extra={**base.extra, "adapter": str(adapter), "base_fingerprint": base.fingerprint})


def load_finetuned(adapter: str | Path, base: str | None = None, *, merge: bool = False,
                   device: str | None = None, dtype: str | None = None, layers_path: str | None = None,
                   allow_mismatch: bool = False) -> Model:
    """Load the adapter's base model (or `base`) and apply the adapter."""
    from ..models import load_model

    info = adapter_base(adapter)
    spec = base if base is not None else info["source"]
    if spec in (None, ""):
        raise PersonavecError(f"adapter '{adapter}' does not say its base model; pass --base")
    m = load_model(None if spec == "embedded" else spec, device=device, dtype=dtype, layers_path=layers_path)
    return attach_adapter(m, adapter, merge=merge, allow_mismatch=allow_mismatch)
