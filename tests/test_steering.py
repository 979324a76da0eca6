"""Steering hooks on the real embedded model: exact removal, KV-cache correctness, bad requests."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import hook_ids

import personavec as pv
from personavec.chat import encode_chat, messages_for, pad_batch
from personavec.errors import LayerError, SteeringError


def _logits(model: pv.Model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


def _direction(model: pv.Model, scale: float = 8.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.hidden_size, generator=g)
    return v / v.norm() * scale


def test_hooks_leave_no_trace(model: pv.Model) -> None:
    base_hooks = hook_ids(model)
    ids = torch.tensor([encode_chat(model.tokenizer, messages_for("Tell me about cats."))])
    before = _logits(model, ids)
    with pv.steer(model, {10: _direction(model), 20: _direction(model)}, coef=2.0, positions="all"):
        during = _logits(model, ids)
        assert hook_ids(model) != base_hooks
    after = _logits(model, ids)
    assert not torch.equal(before, during)
    assert torch.equal(before, after)
    assert hook_ids(model) == base_hooks
    handle = pv.steer(model, {5: _direction(model)}, coef=1.0)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(_logits(model, ids), before)


def test_zero_coefficient_is_exactly_unsteered(model: pv.Model) -> None:
    ids = torch.tensor([encode_chat(model.tokenizer, messages_for("Hello"))])
    base_hooks, before = hook_ids(model), _logits(model, ids)
    with pv.steer(model, {10: _direction(model)}, coef=0.0, positions="all"):
        assert torch.equal(_logits(model, ids), before)
        assert hook_ids(model) == base_hooks


@pytest.mark.parametrize("positions", ["response", "prompt", "all"])
def test_generate_with_kv_cache_matches_cache_free_reference(model32: pv.Model, positions: str) -> None:
    """Steered greedy generation (KV cache, left-padded batch of prompts of different lengths) must give the
    same logits as one cache-free forward over the finished sequences with an explicit position mask."""
    m, n_new, layer = model32, 5, 12
    prompts = [encode_chat(m.tokenizer, messages_for("Hi")),
               encode_chat(m.tokenizer, messages_for("Describe a long walk through a quiet forest in autumn."))]
    ids, mask = pad_batch(prompts, m.tokenizer.pad_token_id, side="left")
    width = ids.shape[1]
    vec = {layer: _direction(m, 6.0)}
    with pv.steer(m, vec, coef=1.0, positions=positions), torch.no_grad():
        out = m.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                            do_sample=False, output_logits=True, return_dict_in_generate=True,
                            pad_token_id=m.tokenizer.pad_token_id)
    step_logits = torch.stack(out.logits, dim=1)  # [batch, n_new, vocab]
    full = out.sequences
    full_mask = torch.cat([mask, torch.ones(2, n_new, dtype=mask.dtype)], dim=1)
    position_ids = (full_mask.cumsum(1) - 1).clamp_min(0)
    cols = torch.arange(full.shape[1])[None, :].expand(2, -1)
    where = {"response": cols >= width - 1, "prompt": cols < width, "all": torch.ones_like(cols, dtype=torch.bool)}
    with pv.steer(m, vec, coef=1.0, positions=where[positions]), torch.no_grad():
        ref = m.hf(input_ids=full, attention_mask=full_mask, position_ids=position_ids).logits
    ref_steps = ref[:, width - 1: width - 1 + n_new]
    assert torch.allclose(step_logits, ref_steps, atol=2e-3, rtol=1e-3), (step_logits - ref_steps).abs().max()
    with torch.no_grad():  # and the steering did something
        plain = m.hf(input_ids=full, attention_mask=full_mask, position_ids=position_ids).logits
    assert (plain[:, width - 1: width - 1 + n_new] - ref_steps).abs().max() > 1e-2


def test_bad_steering_requests(model: pv.Model) -> None:
    base_hooks = hook_ids(model)
    v = _direction(model)
    for coef in (math.nan, math.inf, -math.inf):
        with pytest.raises(SteeringError, match="finite"):
            pv.steer(model, {10: v}, coef=coef)
    with pytest.raises(SteeringError, match="unknown positions"):
        pv.steer(model, {10: v}, coef=1.0, positions="middle")
    for layer in (0, model.n_layers + 1, -1):
        with pytest.raises(LayerError, match="out of range"):
            pv.steer(model, {layer: v}, coef=1.0)
    with pytest.raises(SteeringError, match="hidden size"):
        pv.steer(model, {10: torch.zeros(7)}, coef=1.0)
    assert hook_ids(model) == base_hooks


def test_ablation_removes_the_direction(model32: pv.Model) -> None:
    m = model32
    u = _direction(m, 1.0)
    sample = pv.Sample(encode_chat(m.tokenizer, messages_for("What is the capital of France?")),
                       m.tokenizer.encode(" Paris is the capital.", add_special_tokens=False))
    with pv.ablate(m, {8: u}, positions="all"):
        means = pv.capture_means(m, [sample], layers=[8], positions=["response"])
    plain = pv.capture_means(m, [sample], layers=[8], positions=["response"])
    assert abs(float(means["response"][0] @ u)) < 1e-3
    assert abs(float(plain["response"][0] @ u)) > 1e-3


def test_capture_matches_hidden_states_and_batching(model32: pv.Model) -> None:
    m = model32
    tok = m.tokenizer
    samples = [pv.Sample(encode_chat(tok, messages_for(q)), tok.encode(a, add_special_tokens=False))
               for q, a in [("Hi", " Hello there!"), ("Name a fruit, please.", " An apple is a fruit that grows on trees.")]]
    batched = pv.capture_means(m, samples, batch_size=2)
    single = pv.capture_means(m, samples, batch_size=1)
    for p in batched:
        assert torch.allclose(batched[p], single[p], atol=1e-4)
    expected = []
    for s in samples:
        with torch.no_grad():
            hs = m.hf(input_ids=torch.tensor([s.prompt + s.response]), output_hidden_states=True).hidden_states
        expected.append(torch.stack([h[0, len(s.prompt):].mean(0) for h in hs[:-1]]))  # last one is post-norm
    mean = torch.stack(expected).mean(0)
    assert torch.allclose(batched["response"][:-1], mean, atol=1e-4)


def test_sequence_layout_gives_generation_positions_to_full_forwards(model32: pv.Model) -> None:
    """Scoring a whole prompt+response sequence under 'response' steering steers the same positions as
    generation did: from the last prompt token on, per row, whatever the padding."""
    m = model32
    tok = m.tokenizer
    samples = [pv.Sample(encode_chat(tok, messages_for(q)), tok.encode(a, add_special_tokens=False))
               for q, a in [("Tell me a fact about the sea.", " The sea is salty and deep."), ("Hi", " Hello!")]]
    # longest first, the order response_logprobs batches in, so the explicit mask lines up with its rows
    ids, _ = pad_batch([s.prompt + s.response for s in samples], tok.pad_token_id, side="right")
    cols = torch.arange(ids.shape[1])[None, :]
    plen = torch.tensor([len(s.prompt) for s in samples])[:, None]
    vec = {12: _direction(m, 6.0)}
    from personavec.likelihood import response_logprobs

    with pv.steer(m, vec, coef=1.0, positions="response"):
        via_layout = response_logprobs(m, samples, batch_size=2)
    with pv.steer(m, vec, coef=1.0, positions=cols.expand(2, -1) >= plen - 1):
        explicit = response_logprobs(m, samples, batch_size=2)
    plain = response_logprobs(m, samples, batch_size=2)
    assert via_layout == pytest.approx(explicit, abs=1e-5)
    assert all(abs(a - b) > 1e-3 for a, b in zip(via_layout, plain, strict=True))  # type: ignore[operator]


def test_per_row_steering_equals_steer_row_by_row(model32: pv.Model) -> None:
    """`steer_rows` in one batch: each row's logits equal, bit for bit, the same batch run under `steer`
    with that row's terms (entered in order), through a prefill and a cached step; an unsteered row equals
    the unsteered batch exactly (it gets exactly zero added)."""
    from personavec.steering import RowPositions, steer_rows

    m = model32
    prompt = encode_chat(m.tokenizer, messages_for("Describe a quiet forest."))
    ids = torch.tensor([prompt] * 4)
    a, b = _direction(m, 6.0), -_direction(m, 3.0)
    rows = [[(12, a, 1.0, "response")],
            [],
            [(12, a, 2.0, "all"), (20, b, 1.5, "prompt"), (12, b, -1.0, "response")],  # two terms at layer 12
            [(8, a, 0.0, "all")]]  # coefficient 0: nothing, as `steer` does

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            out = m.hf(input_ids=ids, use_cache=True)
            nxt = m.hf(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True,
                       **{"cache" if hasattr(out, "cache") else "past_key_values":
                          out.cache if hasattr(out, "cache") else out.past_key_values})
        return [out.logits, nxt.logits]

    base_hooks = hook_ids(m)
    with steer_rows(m, rows):
        batched = run()
    assert hook_ids(m) == base_hooks
    plain = run()
    for i, terms in enumerate(rows):
        with contextlib.ExitStack() as stack:
            for layer, v, c, pos in terms:
                stack.enter_context(pv.steer(m, {layer: v}, coef=c, positions=pos))
            alone = run() if terms else plain
        for got, want in zip(batched, alone, strict=True):
            assert torch.equal(got[i], want[i]), i
    assert not torch.equal(batched[0][0], plain[0][0]) and not torch.equal(batched[1][2], plain[1][2])
    assert torch.equal(batched[0][1], plain[0][1]) and torch.equal(batched[0][3], plain[0][3])
    # per-row positions must fit the batch and name known positions
    with pytest.raises(SteeringError, match="unknown positions"):
        RowPositions(("all", "middle"))
    with pytest.raises(SteeringError, match="do not fit a batch"), steer_rows(m, rows[:2]):
        run()
    assert hook_ids(m) == base_hooks
