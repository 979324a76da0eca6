"""OpenAI-compatible server with per-request steering and persona monitoring (`personavec serve`)."""

from .app import ServeSettings, create_app, name_vectors
from .background import serve_in_thread
from .engine import Engine, Job, Result, SteerTerm

__all__ = ["Engine", "Job", "Result", "ServeSettings", "SteerTerm", "create_app", "name_vectors",
           "serve_in_thread"]
