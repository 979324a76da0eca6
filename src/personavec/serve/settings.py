"""The operator's settings for one server (`personavec serve` flags, or `create_app`'s argument)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PersonavecError
from .schemas import SteerSpec


@dataclass(frozen=True)
class ServeSettings:
    """Operator settings. `max_batch_size`: requests generated together in one continuous batch (each with its
    own steering). `max_queue`: requests that may wait beyond those (more get 429).
    `max_tokens_limit`: the most completion tokens one request may ask for (also the default).
    `steered_models`: extra model names, each steering every request sent to it with its terms (before
    the request's own `steer`), e.g. {"evil-8": [{"vector": "evil", "coef": 8, "positions": "all"}]};
    `schemas.parse_steered_model` reads the `NAME=VECTOR:COEF[:LAYER][:POSITIONS]` form. `api_key` None
    serves without auth; an empty or blank key is refused (it would let an empty bearer token in, or no one)."""

    api_key: str | None = None
    max_queue: int = 16
    max_batch_size: int = 32
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 512
    log_path: Path | None = None
    log_prompts: bool = False
    model_name: str | None = None  # the name clients pass as `model` (default: the model's id)
    allow_model_mismatch: bool = False
    steered_models: Mapping[str, Sequence[SteerSpec | Mapping[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise PersonavecError("api_key is empty: give a key, or None to serve without auth")
