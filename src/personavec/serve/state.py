"""What the route handlers share: the model, its vectors, the engine and the settings, built once by
`create_app` and kept on `app.state.serve`, so handlers are plain module-level functions."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..models import text_config
from ..vectors import name_by_trait
from .engine import Engine, SteerTerm
from .log import RequestLog
from .settings import ServeSettings
from .terms import steered_models

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector


@dataclass(frozen=True)
class ServeState:
    """The served model and what is derived from it once: its public name, fingerprint, context length and
    vocabulary size, and the steered model names resolved to engine terms."""

    model: Model
    vectors: dict[str, PersonaVector]
    settings: ServeSettings
    engine: Engine
    served: str  # the name clients pass as `model`
    fingerprint: str  # `system_fingerprint` of every response
    context: int  # prompt + completion tokens the model takes
    vocab: int  # token ids 0..vocab-1 are valid prompt tokens
    started: int  # `created` of the model cards
    steered: dict[str, list[SteerTerm]]

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @classmethod
    def build(cls, model: Model, vectors: Mapping[str, PersonaVector] | Sequence[PersonaVector],
              settings: ServeSettings) -> ServeState:
        """Check the vectors fit the model, start nothing (the app's lifespan starts the engine)."""
        named = name_by_trait(vectors)
        for vec in named.values():
            vec.check_model(model, settings.allow_model_mismatch)
        engine = Engine(model, named, max_queue=settings.max_queue,
                        request_log=RequestLog(settings.log_path, settings.log_prompts),
                        max_batch_size=settings.max_batch_size)
        served = settings.model_name or model.model_id
        return cls(model=model, vectors=named, settings=settings, engine=engine, served=served,
                   fingerprint=f"personavec-{__version__}-{model.fingerprint}",
                   context=int(getattr(text_config(model.hf.config), "max_position_embeddings", 0) or 1 << 30),
                   vocab=int(model.hf.get_input_embeddings().num_embeddings), started=int(time.time()),
                   steered=steered_models(named, model, served, settings.steered_models))
