"""Judges behind one protocol, chosen by a spec string:

  contrast                 judge-free: log p(answer | positive prompt) − log p(answer | negative prompt)
  local                    the model under study as a logprob judge (0–100)
  local:MODEL              another local model (hub id, folder or .gguf) as a logprob judge
  openai:MODEL             an OpenAI-compatible endpoint ($OPENAI_BASE_URL or the OpenAI API)
  openai:MODEL@URL         the same at a given base URL (vLLM, llama.cpp, Ollama, ...)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import JudgeError
from .base import COHERENCE_RUBRIC, Judge, JudgeItem, render
from .contrast import ContrastJudge

if TYPE_CHECKING:
    from ..models import Model
    from ..traits import Trait

__all__ = ["COHERENCE_RUBRIC", "ContrastJudge", "Judge", "JudgeItem", "make_judge", "render"]


def make_judge(spec: str | None, model: Model, trait: Trait) -> Judge:
    """Build the judge a spec string names (see the module docstring)."""
    if spec is None or spec == "contrast":
        return ContrastJudge(model, trait.pairs)
    kind, _, rest = spec.partition(":")
    if kind == "local":
        from .local import LocalJudge

        if not rest:
            return LocalJudge(model)
        from ..models import load_model

        return LocalJudge(load_model(rest, device=str(model.device)))
    if kind == "openai" and rest:
        from .openai_compat import OpenAIJudge

        name, _, url = rest.partition("@")
        return OpenAIJudge(name, base_url=url or None)
    raise JudgeError(f"unknown judge '{spec}'; use contrast, local, local:MODEL, openai:MODEL or openai:MODEL@URL")
