"""OpenAI-compatible server with per-request steering and persona monitoring (`personavec serve`):
chat completions, legacy completions with echo/logprobs (lm-evaluation-harness's `local-completions`),
models; steered model names for clients that send fixed bodies."""

from .app import ServeSettings, create_app, name_vectors
from .background import serve_in_thread
from .engine import Engine, Job, Result, SteerTerm
from .schemas import parse_steered_model

__all__ = ["Engine", "Job", "Result", "ServeSettings", "SteerTerm", "create_app", "name_vectors",
           "parse_steered_model", "serve_in_thread"]
