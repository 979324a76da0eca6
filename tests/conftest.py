"""The embedded model is loaded once per test session and shared; tests must leave it unsteered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import personavec as pv


@pytest.fixture(scope="session")
def model() -> pv.Model:
    torch.manual_seed(0)
    m = pv.load_model()
    baseline = hook_ids(m)
    yield m
    # Every test must remove its hooks: a leftover hook would silently change later results.
    assert hook_ids(m) == baseline, "a test left hooks on the decoder blocks"


def hook_ids(model: pv.Model) -> list[tuple[frozenset[int], frozenset[int]]]:
    """The forward and pre-forward hook ids of every block (transformers itself may own some)."""
    return [(frozenset(b._forward_hooks), frozenset(b._forward_pre_hooks)) for b in model.layers]


@pytest.fixture(scope="session")
def evil_run(model: pv.Model, tmp_path_factory: pytest.TempPathFactory) -> tuple[pv.PersonaVector, Path]:
    """An evil vector extracted once per test session on a small budget, with its run folder."""
    run = tmp_path_factory.mktemp("extract") / "evil.run"
    vec = pv.extract(model, "evil", run_dir=run, n_questions=5, max_new_tokens=32)
    return vec, run
