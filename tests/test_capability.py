"""Capability checks on the real embedded model: sane perplexity, steering damage visible and undone,
quiz above chance, MMLU refused cleanly offline."""

from __future__ import annotations

import importlib.util
import math
from collections import Counter

import pytest
import torch

import personavec as pv
from personavec.capability import mmlu, neutral_texts, perplexity, quiz_accuracy, quiz_items
from personavec.capture import read


def test_shipped_sets_are_small_and_balanced() -> None:
    texts, items = neutral_texts(), quiz_items()
    assert 30 <= len(texts) <= 60 and all(20 < len(t) < 600 for t in texts)
    assert 30 <= len(items) <= 60
    assert all(len(it["choices"]) == 4 and len(set(it["choices"])) == 4 for it in items)
    # a model that always picks one letter scores exactly chance
    assert set(Counter(it["answer"] for it in items).values()) == {len(items) // 4}


def test_perplexity_sane_and_batch_invariant(model: pv.Model) -> None:
    ppl = perplexity(model)
    assert math.isfinite(ppl) and 5.0 < ppl < 100.0, ppl  # 25.8 measured on SmolLM2-135M (bf16)
    few = neutral_texts()[:4]
    one, four = perplexity(model, few, batch_size=1), perplexity(model, few, batch_size=4)
    assert one == pytest.approx(four, rel=1e-2)  # padding does not leak into the score


def test_steering_raises_perplexity_and_is_undone(model: pv.Model) -> None:
    texts = neutral_texts()[:8]
    base = perplexity(model, texts)
    seen: list[torch.Tensor] = []  # read layer 15 (output of block 14; 0 = embeddings)
    with read(model, [15], lambda _layer, h: seen.append(h.detach())):
        perplexity(model, texts[:1])
    typical = float(seen[0][0, 1:].float().norm(dim=-1).median())  # token 0 carries a huge attention-sink norm
    v = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    with pv.steer(model, {15: v / v.norm() * 3 * typical}):  # default positions="response"
        steered = perplexity(model, texts)
    assert steered > 2 * base, (base, steered)
    assert perplexity(model, texts) == base  # hooks removed: bit-identical


def test_quiz_beats_chance(model: pv.Model) -> None:
    acc = quiz_accuracy(model)
    assert acc >= 0.5, acc  # chance is 0.25; 0.775 measured on SmolLM2-135M (cloze)
    letter = quiz_accuracy(model, quiz_items()[:4], method="letter")  # runs; the 135M model answers "A"
    assert letter in (0.0, 0.25, 0.5, 0.75, 1.0)  # a share of 4 items answered right, not a mean probability


def test_quiz_rejects_bad_items(model: pv.Model) -> None:
    with pytest.raises(pv.PersonavecError, match="answer 'E'"):
        quiz_accuracy(model, [{"question": "2 + 2?", "choices": ["4", "5", "6", "7"], "answer": "E"}])


def test_mmlu_offline_is_a_one_line_error(model: pv.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("lm_eval"):  # fail at once instead of retrying the hub for 30 s
        import datasets.config
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        expected = "download them first"
    else:
        expected = "pip install personavec\\[capability\\]"
    with pytest.raises(pv.PersonavecError, match=expected) as info:
        mmlu(model, limit=2)
    assert "\n" not in str(info.value)
