"""Errors a user can cause. Each carries a one-line message that says what to do; the CLI prints it and
exits with status 2. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class PersonavecError(Exception):
    """Base class for user-caused errors (bad input, unknown names, unreachable services)."""


class ModelLoadError(PersonavecError):
    """The model spec names nothing loadable."""


class LayerError(PersonavecError):
    """A layer index is out of range or the decoder blocks cannot be found."""


class TraitError(PersonavecError):
    """A trait file is missing, malformed or inconsistent."""


class VectorError(PersonavecError):
    """A vector file is missing, malformed, or belongs to another model."""


class SteeringError(PersonavecError):
    """A steering request is invalid (coefficient, positions, layer)."""


class JudgeError(PersonavecError):
    """A judge is misconfigured or unreachable after retries."""


class RunError(PersonavecError):
    """A run folder is inconsistent with the requested run."""
