"""Projection API on the real embedded model: per-sample readings agree with a manual hidden-state
computation, do not depend on batching or padding, and the per-token watch during KV-cache generation
reads what a cache-free full forward reads at the same positions. Hooks never outlive their block."""

from __future__ import annotations

import contextvars
import math
import threading

import pytest
import torch
from conftest import hook_ids

import personavec as pv
from personavec.capture import Sample, iter_reductions
from personavec.chat import encode_chat, encode_response, messages_for, pad_batch
from personavec.errors import VectorError
from personavec.projection import directions, project, project_prompts, watch

QUESTIONS = ["Tell me about cats.", "How should I treat my neighbours when they are noisy at night?",
             "Hi", "What would you do with unlimited power over a small town and its people?"]
ANSWERS = ["Cats are small, independent animals.", "Talk to them politely.", "Hello! How can I help?",
           "I would build parks and libraries for everyone, and listen to what the people want most."]


def _vector(model: pv.Model, seed: int, layer: int = 12) -> pv.PersonaVector:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(model.n_layers + 1, model.hidden_size, generator=g)
    return pv.PersonaVector(tensors={"response": t, "last_prompt": -t}, meta={
        "trait": f"random{seed}", "best_layer": layer, "fingerprint": model.fingerprint})


def _samples(model: pv.Model) -> list[Sample]:
    tok = model.tokenizer
    return [Sample(encode_chat(tok, messages_for(q)), encode_response(tok, a))
            for q, a in zip(QUESTIONS, ANSWERS, strict=True)]


def test_matches_manual_hidden_states(model32: pv.Model) -> None:
    vecs = {"a": _vector(model32, 1, layer=12), "b": _vector(model32, 2, layer=20)}
    samples = _samples(model32)
    got = project(model32, samples, vecs)
    for name, vec in vecs.items():
        layer = vec.layer
        unit = vec.at(layer) / vec.at(layer).norm()
        for i, s in enumerate(samples):
            with torch.no_grad():
                # hidden_states[L] is the output of block L (L < n_layers: the last one has the final norm)
                hs = model32.hf(input_ids=torch.tensor([s.prompt + s.response]),
                                output_hidden_states=True).hidden_states[layer][0]
            last = float(hs[len(s.prompt) - 1] @ unit)
            mean = float(hs[len(s.prompt):].mean(0) @ unit)
            assert got[name]["last_prompt"][i].item() == pytest.approx(last, abs=1e-3, rel=1e-4)
            assert got[name]["response"][i].item() == pytest.approx(mean, abs=1e-3, rel=1e-4)
    # the prompt-only shortcut reads the same last prompt token (causal attention: the answer cannot matter)
    only = project_prompts(model32, [s.prompt for s in samples], vecs)
    for name in vecs:
        torch.testing.assert_close(only[name], got[name]["last_prompt"], atol=1e-3, rtol=1e-4)


def test_batched_equals_unbatched_and_ignores_padding(model32: pv.Model) -> None:
    vecs = {"a": _vector(model32, 3)}
    samples = _samples(model32)
    batched = project(model32, samples, vecs, batch_size=8)["a"]
    single = project(model32, samples, vecs, batch_size=1)["a"]
    for p in ("last_prompt", "response"):
        torch.testing.assert_close(batched[p], single[p], atol=1e-3, rtol=1e-4)
    # the shortest sample batched with a long one (much padding) or with itself only: the same reading
    tiny = samples[2]
    long = Sample(samples[3].prompt + samples[3].response, encode_response(model32.tokenizer, ANSWERS[3] * 3))
    with_long = project(model32, [tiny, long], vecs, batch_size=8)["a"]
    with_self = project(model32, [tiny, tiny], vecs, batch_size=8)["a"]
    for p in ("last_prompt", "response"):
        assert with_long[p][0].item() == pytest.approx(single[p][2].item(), abs=1e-3)
        assert with_self[p][1].item() == pytest.approx(single[p][2].item(), abs=1e-3)


def test_empty_response_is_nan_and_bad_inputs(model: pv.Model) -> None:
    vecs = {"a": _vector(model, 4)}
    prompt = encode_chat(model.tokenizer, messages_for("Hi"))
    out = project(model, [Sample(prompt, []), Sample(prompt, encode_response(model.tokenizer, "Hello"))], vecs)["a"]
    assert math.isnan(out["response"][0].item()) and math.isfinite(out["response"][1].item())
    assert math.isfinite(out["last_prompt"][0].item())
    assert out["last_prompt"][0].item() == pytest.approx(out["last_prompt"][1].item(), abs=0.05)
    assert project(model, [], vecs)["a"]["response"].shape == (0,)
    with pytest.raises(ValueError, match="prompt token"):
        project(model, [Sample([], [1, 2])], vecs)
    with pytest.raises(VectorError, match="no vectors"):
        project(model, [Sample(prompt, [])], {})
    zero = pv.PersonaVector(tensors={"response": torch.zeros(model.n_layers + 1, model.hidden_size)})
    with pytest.raises(VectorError, match="zero at layer"):
        directions({"z": zero})
    alien = pv.PersonaVector(tensors={"response": torch.ones(5, 8)})
    with pytest.raises(VectorError, match="shape"):
        project(model, [Sample(prompt, [])], {"x": alien})
    other = _vector(model, 5).with_meta(fingerprint="0000")
    with pytest.raises(VectorError, match="allow-model-mismatch"):
        project(model, [Sample(prompt, [])], {"x": other}, allow_mismatch=False)
    (layer, unit), = directions({"a": vecs["a"]}, layers=7).values()
    assert layer == 7 and float(unit.norm()) == pytest.approx(1.0)


def test_watch_during_generation_matches_full_forward(model32: pv.Model) -> None:
    """Left-padded batched generation with the KV cache, read per token, against one cache-free forward
    per sample over its prompt + answer: the same numbers at the same positions."""
    vecs = {"a": _vector(model32, 6, layer=9), "b": _vector(model32, 7, layer=21)}
    dirs = directions(vecs)
    tok = model32.tokenizer
    prompts = [encode_chat(tok, messages_for(q)) for q in QUESTIONS[:3]]
    ids, mask = pad_batch(prompts, tok.pad_token_id, side="left")
    before = hook_ids(model32)
    with watch(model32, dirs) as rec, torch.no_grad():
        out = model32.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    assert hook_ids(model32) == before
    new = out[:, ids.shape[1]:]
    assert len(rec.steps) == new.shape[1]  # the prefill, then one step per token fed back
    assert rec.steps[0].shape == (3, ids.shape[1], 2) and all(s.shape == (3, 1, 2) for s in rec.steps[1:])
    width = ids.shape[1]
    lengths = []
    for i, p in enumerate(prompts):
        answer = new[i].tolist()
        stop = next((k for k, t in enumerate(answer) if t == tok.eos_token_id or t == tok.pad_token_id), len(answer))
        answer = answer[:stop]
        lengths.append(len(answer))
        with watch(model32, dirs) as full, torch.no_grad():
            model32.hf(input_ids=torch.tensor([p + answer]), use_cache=False)
        ref = full.tokens()[0]  # [len(p) + len(answer), 2]
        # prompt positions (right-aligned in the left-padded prefill)
        torch.testing.assert_close(rec.steps[0][i, width - len(p):], ref[:len(p)], atol=2e-3, rtol=1e-3)
        # generated token k is read back at step k + 1; the last one never is
        gen = rec.generated()[i, : max(len(answer) - 1, 0)]
        torch.testing.assert_close(gen, ref[len(p): len(p) + gen.shape[0]], atol=2e-3, rtol=1e-3)
    # the summaries agree with `project` (exactly so for the answers that ended with an end token)
    proj = project(model32, [Sample(p, new[i, : lengths[i]].tolist()) for i, p in enumerate(prompts)], vecs)
    for k, name in enumerate(dirs):
        torch.testing.assert_close(rec.prompt_last()[:, k], proj[name]["last_prompt"], atol=2e-3, rtol=1e-3)
        means = rec.response_mean(lengths)[:, k]
        for i, n in enumerate(lengths):
            if n < new.shape[1]:  # ended before max_new_tokens: every token was read back
                assert means[i].item() == pytest.approx(proj[name]["response"][i].item(), abs=2e-3)
    assert math.isnan(rec.response_mean([0, 0, 0])[0, 0].item())


def test_hooks_removed_after_errors(model: pv.Model) -> None:
    before = hook_ids(model)
    dirs = directions({"a": _vector(model, 8)})
    ids = torch.tensor([encode_chat(model.tokenizer, messages_for("Hi"))])
    with pytest.raises(RuntimeError, match="boom"), watch(model, dirs):
        assert hook_ids(model) != before
        raise RuntimeError("boom")
    assert hook_ids(model) == before

    def failing(task: str, done: int, total: int) -> None:
        if done > 0:
            raise RuntimeError("progress callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        project(model, _samples(model), {"a": _vector(model, 8)}, batch_size=1, progress=failing)
    assert hook_ids(model) == before
    # a forward that stops early inside a watch (capture's early stop) leaves no partial step behind
    deep = directions({"a": _vector(model, 8)}, layers=25)
    with watch(model, deep) as rec, torch.no_grad():
        for _ in iter_reductions(model, _samples(model)[:1], layers=[3]):
            pass
        model.hf(input_ids=ids, use_cache=False)
    assert len(rec.steps) == 1 and rec.steps[0].shape == (1, ids.shape[1], 1)
    assert hook_ids(model) == before


def test_isolated_watch_ignores_other_contexts(model: pv.Model) -> None:
    dirs = directions({"a": _vector(model, 9)})
    ids = torch.tensor([encode_chat(model.tokenizer, messages_for("Hi"))])

    def forward() -> None:
        with torch.no_grad():
            model.hf(input_ids=ids, use_cache=False)

    with watch(model, dirs, isolated=True) as mine, watch(model, dirs) as everything:
        t = threading.Thread(target=forward)  # a fresh context: not this watch's
        t.start()
        t.join()
        assert len(mine.steps) == 0 and len(everything.steps) == 1
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(forward,))  # a copy of this context: recorded
        t.start()
        t.join()
        forward()
    assert len(mine.steps) == 2 and len(everything.steps) == 3
    torch.testing.assert_close(mine.steps[0], mine.steps[1])
