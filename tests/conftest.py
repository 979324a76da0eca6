"""The embedded model is loaded once per test session and shared; tests must leave it unsteered."""

from __future__ import annotations

import pytest
import torch

import personavec as pv


@pytest.fixture(scope="session")
def model() -> pv.Model:
    torch.manual_seed(0)
    m = pv.load_model()
    yield m
    # Every test must remove its hooks: a leftover hook would silently change later results.
    leftover = [i for i, block in enumerate(m.layers) if block._forward_hooks or block._forward_pre_hooks]
    assert not leftover, f"hooks left on blocks {leftover}"
