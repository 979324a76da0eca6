"""OpenAI-compatible server with per-request steering and persona monitoring (`personavec serve`)."""

from .app import ServeSettings, create_app, name_vectors
from .engine import Engine, Job, Result, SteerTerm

__all__ = ["Engine", "Job", "Result", "ServeSettings", "SteerTerm", "create_app", "name_vectors"]
