"""The `persona` field of a response: per loaded vector, the last-prompt-token projection (a prediction
made before the answer is written), the mean projection over the response tokens, and a flag.

Readings come from `projection.watch` hooks on the forward passes that generate the answer, so they cost
no extra pass and see the residual stream the model actually ran on (steering included, when a request
steers at the reading layer). Each vector is read at the layer `monitor-eval` calibrated it on
(meta["monitor"]["layer"]), else at its chosen layer (`PersonaVector.layer`). `flagged` is true when the
prompt projection reaches the calibrated threshold (meta["monitor"]["threshold"]) or the response
projection reaches meta["monitor"]["response_threshold"], false when neither does, and null when the
vector carries no calibration (run `personavec monitor-eval` to add one)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..projection import Watch, directions
from ..vectors import PersonaVector


def monitor_meta(vector: PersonaVector) -> dict[str, Any]:
    meta = vector.meta.get("monitor")
    return meta if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class PersonaMonitor:
    names: list[str]
    dirs: dict[str, tuple[int, torch.Tensor]]  # name -> (layer, unit vector), as `projection.watch` takes
    thresholds: dict[str, tuple[float | None, float | None]]  # name -> (prompt, response) thresholds

    @classmethod
    def build(cls, vectors: Mapping[str, PersonaVector]) -> PersonaMonitor:
        dirs: dict[str, tuple[int, torch.Tensor]] = {}
        thresholds: dict[str, tuple[float | None, float | None]] = {}
        for name, vec in vectors.items():
            meta = monitor_meta(vec)
            layer = int(meta["layer"]) if isinstance(meta.get("layer"), int) else vec.layer
            position = str(meta.get("vector_position", "response"))
            dirs.update(directions({name: vec}, layer, position))
            thresholds[name] = (_number(meta.get("threshold")), _number(meta.get("response_threshold")))
        return cls(names=list(vectors), dirs=dirs, thresholds=thresholds)

    def readings(self, record: Watch | None) -> dict[str, dict[str, Any]]:
        """{name: {layer, prompt_projection, response_projection, threshold, flagged}} from a watch over one
        generation: step 0 is the prefill (its last position is the last prompt token), each later step
        holds one generated token's activation."""
        if record is None or not record.steps:
            return {}
        return self.readings_from(record.steps[0][0, -1], [s[0, 0] for s in record.steps[1:]])

    def readings_from(self, prompt: torch.Tensor, later: list[torch.Tensor]) -> dict[str, dict[str, Any]]:
        """The same from one request's readings: `prompt` [n_names] at its last prompt token, `later` one
        [n_names] per generated token fed back (a batched server collects them row by row)."""
        response = torch.stack(later).mean(0) if later else None
        out: dict[str, dict[str, Any]] = {}
        for k, name in enumerate(self.names):
            p = _finite(float(prompt[k]))
            r = _finite(float(response[k])) if response is not None else None
            p_thr, r_thr = self.thresholds[name]
            flagged = None if p_thr is None and r_thr is None else _crosses(p, p_thr) or _crosses(r, r_thr)
            out[name] = {"layer": self.dirs[name][0], "prompt_projection": p, "response_projection": r,
                         "threshold": p_thr, "response_threshold": r_thr, "flagged": flagged}
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _crosses(value: float | None, threshold: float | None) -> bool:
    return value is not None and threshold is not None and value >= threshold


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None
