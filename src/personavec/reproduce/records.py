"""Typed results shared by the stages (an estimate with its interval, a correlation with its interval, a
target) and the one JSON boundary: `to_json` writes a stage's dataclass, `from_json` reads it back on a rerun."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..stats import bootstrap_ci, mean_ci, mean_se, pearson_bootstrap_ci, pearson_ci

T = TypeVar("T")


@dataclass(frozen=True)
class Interval:
    """A mean over items with its standard error and 95% bootstrap interval (items resampled)."""

    mean: float | None
    se: float | None
    n: int
    low: float | None
    high: float | None

    @property
    def above_zero(self) -> bool:
        return self.low is not None and self.low > 0

    def text(self, digits: int = 3) -> str:
        if self.mean is None:
            return "–"
        body = f"{self.mean:+.{digits}f}"
        if self.low is not None and self.high is not None:
            body += f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return body


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def interval(values: Sequence[float], seed: int = 0) -> Interval:
    """Mean, standard error and 95% bootstrap interval of per-item values."""
    m, se, n = mean_se(list(values))
    lo, hi = bootstrap_ci(list(values), seed=seed) if n >= 2 else (math.nan, math.nan)
    return Interval(m, se, n, _finite(lo), _finite(hi))


def t_interval(values: Sequence[float]) -> Interval:
    """Mean with a 95% t interval: for a handful of runs (seeds), where a bootstrap has too few values."""
    m, se, n = mean_se(list(values))
    ci = mean_ci(np.asarray(values, dtype=float))
    return Interval(m, se, n, _finite(ci["ci_low"]), _finite(ci["ci_high"]))


@dataclass(frozen=True)
class Correlation:
    """Pearson's r with its 95% interval over n pairs (None where undefined)."""

    r: float | None
    low: float | None
    high: float | None
    n: int

    def text(self) -> str:
        if self.r is None:
            return f"– (n = {self.n})"
        ci = f" [{self.low:+.2f}, {self.high:+.2f}]" if self.low is not None and self.high is not None else ""
        return f"{self.r:+.2f}{ci} (n = {self.n})"


def correlation(x: Sequence[float], y: Sequence[float], *, bootstrap: bool = False) -> Correlation:
    """Pearson's r with a Fisher-z interval, or (`bootstrap`) a percentile interval from resampled pairs, for a
    handful of runs where Fisher's normality assumption is hard to defend."""
    r, lo, hi = (pearson_bootstrap_ci if bootstrap else pearson_ci)(list(x), list(y))
    return Correlation(_finite(r), _finite(lo), _finite(hi), len(x))


@dataclass(frozen=True)
class Target:
    """One line of the targets table: met is None when the stage did not run (then `value` says why)."""

    stage: str
    name: str
    value: str
    met: bool | None
    source: str = ""


def to_json(obj: Any) -> Any:
    """A dataclass (or a structure of them) as plain JSON data; non-finite floats become null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def from_json(kind: Any, data: Any) -> Any:
    """`data` (from `to_json`) rebuilt as the annotated type `kind`: dataclasses, lists, tuples, dicts,
    optionals and plain values."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return from_json(inner[0], data) if len(inner) == 1 else data
    if origin is list:
        return [from_json(args[0], v) for v in data]
    if origin is tuple:
        return tuple(from_json(args[0], v) for v in data)
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in data.items()}
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: from_json(hints[f.name], data[f.name]) for f in dataclasses.fields(kind)
                       if f.name in data})
    return data


def load_as(kind: type[T], data: Any) -> T:
    return typing.cast(T, from_json(kind, data))
