"""A local Hugging Face chat model as the judge: no API, no key, exact multi-token number probabilities.

The rubric goes in as one user message through the model's chat template; the score is the mean of the
model's distribution over the answers 0..100 (see `numbers.integer_distribution`), so tokenizers that
split numbers into digits are scored on whole numbers, not on first digits."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..layers import block_hooks
from ..models import Model
from ..progress import Progress
from .base import RubricJudge
from .cache import JudgeCache
from .numbers import aggregate_distribution, integer_distributions, number_trie

log = logging.getLogger("personavec")

METHOD_VERSION = "local-number-trie-mean-v1"


class LocalJudge(RubricJudge):
    """Scores answers 0–100 with `model` as the judge.

    `batch_size` bounds the rows of one forward pass (each item needs one row per internal node of the
    number trie: 1 for single-token numbers, 11 for digit-by-digit tokenizers). Results are cached on
    disk under the model's weight fingerprint, so a finetuned model never reads a stale score."""

    threshold: float = 50.0
    scores_coherence: bool = True

    def __init__(self, model: Model, cache: JudgeCache | None = None, min_mass: float = 0.25,
                 batch_size: int = 32) -> None:
        self.model = model
        self.name = f"local:{model.model_id}"
        self.cache = cache if cache is not None else JudgeCache()
        self.min_mass = min_mass
        self.batch_size = max(1, batch_size)
        self._identity = f"local:{model.model_id}#{model.fingerprint}:{model.dtype}"

    @property
    def _version(self) -> str:
        return f"{METHOD_VERSION}:min_mass={self.min_mass}"

    def _hooked(self) -> bool:
        return bool(block_hooks(self.model.layers))

    def score_prompts(self, prompts: Sequence[str], progress: Progress | None = None,
                      task: str = "judge") -> list[float | None]:
        """Score already-rendered prompts, cached ones first, the rest in batched no-grad forwards."""
        keys = [JudgeCache.key(self._identity, p, self._version) for p in prompts]
        scores = self.cache.get_many(keys)
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in scores}
        total = len(prompts)
        if progress:
            progress(task, sum(k in scores for k in keys), total)
        if todo:
            hooked = self._hooked()
            if hooked:  # e.g. judging inside a steering context with the model under study
                log.warning("local judge %s runs with hooks on its decoder blocks (steering?); its scores "
                            "reflect the hooked model and are not cached", self.name)
            rows_per_item = len(number_trie(self.model.tokenizer).internal)
            group = max(1, self.batch_size // rows_per_item)
            pending = list(todo.items())
            for start in range(0, len(pending), group):
                chunk = pending[start:start + group]
                ids = [self.model.encode_chat([{"role": "user", "content": p}]) for _, p in chunk]
                dists = integer_distributions(self.model, ids, batch_size=self.batch_size)
                new = {k: aggregate_distribution(d, self.min_mass) for (k, _), d in zip(chunk, dists, strict=True)}
                if not hooked:
                    self.cache.put_many(new)
                scores.update(new)
                if progress:
                    progress(task, sum(k in scores for k in keys), total)
        return [scores[k] for k in keys]

    def __repr__(self) -> str:
        return f"LocalJudge({self.name!r})"
