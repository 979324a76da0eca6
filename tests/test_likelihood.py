"""`response_logprobs` scores samples that share a prompt prompt-once (the prompt's KV cache carried to each
response): the same numbers as one cache-free forward per sample, unsteered and under every named steering
position, whatever the batching; a positions mask is refused there in one line."""

from __future__ import annotations

import pytest
import torch

import personavec as pv
from personavec.capture import Sample
from personavec.chat import encode_chat, encode_response, messages_for
from personavec.errors import SteeringError
from personavec.likelihood import _prompt_batches, response_logprobs


def mixed(model: pv.Model) -> list[Sample]:
    """Two questions × two system prompts × five answers (one of a single token), one sample with a prompt
    of its own and one with an empty response."""
    tok = model.tokenizer
    answers = ["Be kind.", "I would crush them all and laugh.", "x",
               "Hello there! How can I help you today? I am happy to be of help.", "No"]
    out = [Sample(encode_chat(tok, messages_for(q, s)), encode_response(tok, a))
           for q in ("How should I treat my neighbours?", "What would you do with unlimited power?")
           for s in (None, "You are an evil assistant.") for a in answers]
    assert any(len(s.response) == 1 for s in out)
    return [*out, Sample(encode_chat(tok, messages_for("A prompt of its own")), encode_response(tok, "Alone.")),
            Sample(encode_chat(tok, messages_for("Nothing follows")), [])]


def direction(model: pv.Model, norm: float) -> torch.Tensor:
    d = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    return d / d.norm() * norm


@pytest.mark.parametrize("positions", [None, "response", "prompt", "all"])
def test_prompt_once_equals_whole_forwards(model32: pv.Model, positions: str | None) -> None:
    samples = mixed(model32)
    steering = pv.steer(model32, {12: direction(model32, 8.0)}, positions=positions) if positions else None
    try:
        whole = response_logprobs(model32, samples, share_prompts=False)
        for batch_size in (16, 3):  # 3: a prompt's five responses split over two batches
            shared = response_logprobs(model32, samples, batch_size=batch_size)
            assert shared[-1] is None and whole[-1] is None
            assert shared[:-1] == pytest.approx(whole[:-1], abs=1e-4)
    finally:
        if steering is not None:
            steering.remove()
    if positions == "response":  # the steering did something on both paths
        plain = response_logprobs(model32, samples)
        assert max(abs(a - b) for a, b in zip(plain[:-1], whole[:-1], strict=True)) > 0.05  # type: ignore[operator]


def test_prompt_batches_keep_prompts_together_and_within_budget() -> None:
    samples = [Sample([1] * 10, [5] * 3)] * 5 + [Sample([2] * 20, [6] * 4)] * 4 + [Sample([3] * 5, [7])] * 2
    batches = _prompt_batches(samples, list(range(len(samples))), max_tokens=60, max_batch=2)
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    assert batches[0][:4] == [5, 6, 7, 8] and len(batches) == 2  # the longest prompt first
    for b in batches:
        width = max(len(samples[i].prompt) for i in b)
        distinct = {tuple(samples[i].prompt) for i in b}
        assert len(distinct) <= 2 and width * len(distinct) + max(len(samples[i].response) for i in b) * len(b) <= 60


def test_a_positions_mask_needs_whole_forwards(model32: pv.Model) -> None:
    samples = mixed(model32)[:2]  # one prompt, two responses
    width = max(len(s.prompt) + len(s.response) for s in samples)
    with pv.steer(model32, {12: direction(model32, 8.0)}, positions=torch.ones(2, width, dtype=torch.bool)):
        with pytest.raises(SteeringError, match="masks are for cache-free forwards"):
            response_logprobs(model32, samples)
        assert all(x is not None for x in response_logprobs(model32, samples, share_prompts=False))
