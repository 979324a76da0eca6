"""Layer discovery, capture, steering and ablation on tiny random-config models of several architectures.

The models are built offline from transformers config classes (no download) and wrapped in a
`personavec.Model` by hand. Layer numbering: 0 = embedding output (input of block 0), L = output of
decoder block L-1.

Limits, stated honestly:
- HF's `output_hidden_states` returns, as its last entry, the final norm applied to the last block's
  output, while personavec's layer n is the raw output of block n-1; layer n is therefore compared
  against a forward hook on the last block, and layers 0..n-1 against HF's hidden states.
- Generation checks use left-padded batches with the position ids that `generate` derives from the
  attention mask (cumsum - 1); the cache-free reference passes the same position ids explicitly, which
  all architectures here (GPT-2 included) accept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import hook_ids
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GenerationConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
)

from personavec.capture import Sample, capture_means, iter_reductions, read
from personavec.chat import pad_batch
from personavec.errors import LayerError
from personavec.layers import block_output, check_layer, find_layers
from personavec.likelihood import response_logprobs
from personavec.models import Model, weight_fingerprint
from personavec.steering import Positions, ablate, steer

VOCAB = 128
HIDDEN = 32
N_LAYERS = 3
PAD = 0

_LLAMA_LIKE: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=N_LAYERS,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE),
    "gemma": lambda: GemmaConfig(**_LLAMA_LIKE, head_dim=8),
    # Gemma 2: sandwich norms, alternating sliding-window layers, logit soft-capping.
    "gemma2": lambda: Gemma2Config(**_LLAMA_LIKE, head_dim=8, sliding_window=4),
    # Phi: parallel attention + MLP on one shared layer norm, partial rotary embedding.
    "phi": lambda: PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                             num_hidden_layers=N_LAYERS, num_attention_heads=4, max_position_embeddings=128),
    "phi3": lambda: Phi3Config(**{**_LLAMA_LIKE, "pad_token_id": PAD}),
    # GPT-2: blocks receive the cache and the attention mask positionally, learned position embeddings.
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=128,
                               bos_token_id=1, eos_token_id=2),
    # GPT-NeoX: parallel residual, the cache passed as `layer_past`.
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                      max_position_embeddings=128),
}
EXPECTED_PATHS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@dataclass
class _Tokenizer:
    """Just enough tokenizer for capture (pad id); chat templates are not needed here."""

    pad_token_id: int = PAD


def _build(arch: str) -> Model:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32)
    hf.eval()
    hf.requires_grad_(False)
    path, layers = find_layers(hf)
    # transformers 5 installs its own output-capturing forward hooks on the blocks the first time
    # output_hidden_states=True is used; install them now so the fixture can tell them from ours.
    with torch.no_grad():
        hf(input_ids=torch.tensor([[3, 4]]), output_hidden_states=True)
    return Model(hf=hf, tokenizer=_Tokenizer(), model_id=f"tiny-random-{arch}", layers=layers,
                 layers_path=path, fingerprint=weight_fingerprint(hf), source="config")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request: pytest.FixtureRequest) -> Iterator[Model]:
    # Tensors this small gain nothing from intra-op threads, and on a busy 2-core machine the thread
    # pool's spin-waiting made this file 6x slower (34 s against 5.5 s); restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = _build(request.param)
    baseline = hook_ids(model)
    yield model
    torch.set_num_threads(threads)
    # Every test must remove its hooks: a leftover hook would silently change later results.
    assert hook_ids(model) == baseline, f"hooks left on the blocks of {model.model_id}"


def _samples() -> list[Sample]:
    """Three samples of different prompt and response lengths, so right padding matters."""
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 4), (3, 8), (7, 2)]
    return [Sample(prompt=torch.randint(3, VOCAB, (p,), generator=g).tolist(),
                   response=torch.randint(3, VOCAB, (r,), generator=g).tolist()) for p, r in shapes]


def _unit(seed: int, scale: float = 1.0) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return scale * v / v.norm()


# 1. layer discovery -------------------------------------------------------------------------------------


def test_find_layers(tiny: Model) -> None:
    arch = tiny.model_id.removeprefix("tiny-random-")
    path, layers = find_layers(tiny.hf)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == N_LAYERS == tiny.n_layers
    assert path == EXPECTED_PATHS.get(arch, "model.layers")
    assert tiny.hidden_size == HIDDEN
    # The override path returns the very same ModuleList.
    same_path, same = find_layers(tiny.hf, path)
    assert same_path == path and same is layers
    # A wrong override is a user error, not a crash: a missing name, and a module that is not a ModuleList.
    with pytest.raises(LayerError, match="not a ModuleList"):
        find_layers(tiny.hf, "model.no_such_blocks")
    not_a_list = next(name for name, m in tiny.hf.named_modules() if isinstance(m, nn.Embedding))
    with pytest.raises(LayerError, match="not a ModuleList"):
        find_layers(tiny.hf, not_a_list)
    assert check_layer(N_LAYERS, N_LAYERS) == N_LAYERS
    for bad in (0, N_LAYERS + 1):
        with pytest.raises(LayerError):
            check_layer(bad, N_LAYERS)


# 2. capture ---------------------------------------------------------------------------------------------


def _reference(model: Model, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Per-sample reductions [n_samples, n_layers + 1, hidden] from HF's own hidden states (layers
    0..n-1) and a forward hook on the last block (layer n: HF's last entry has the final norm applied)."""
    ids, mask = pad_batch([s.prompt + s.response for s in samples], PAD, side="right")
    last: list[torch.Tensor] = []
    handle = model.layers[-1].register_forward_hook(lambda _m, _a, out: last.append(block_output(out)))
    try:
        with torch.no_grad():
            out = model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    assert len(out.hidden_states) == model.n_layers + 1
    hidden = torch.stack([*out.hidden_states[: model.n_layers], last[0]], dim=1)  # [b, n+1, t, h]
    ref: dict[str, list[torch.Tensor]] = {"response": [], "prompt": [], "last_prompt": []}
    for i, s in enumerate(samples):
        p, r = len(s.prompt), len(s.response)
        ref["response"].append(hidden[i, :, p:p + r].mean(1))
        ref["prompt"].append(hidden[i, :, :p].mean(1))
        ref["last_prompt"].append(hidden[i, :, p - 1])
    return {k: torch.stack(v) for k, v in ref.items()}


def test_capture_matches_hidden_states(tiny: Model) -> None:
    samples = _samples()
    ref = _reference(tiny, samples)
    positions = ("response", "prompt", "last_prompt")
    # Per sample: iter_reductions sorts by length, so map the rows back through the yielded indices.
    got = {p: torch.zeros_like(ref[p]) for p in positions}
    for group, out in iter_reductions(tiny, samples, positions=positions, batch_size=16):
        for p in positions:
            got[p][group] = out[p]
    for p in positions:
        torch.testing.assert_close(got[p], ref[p], atol=1e-5, rtol=1e-4, msg=f"{tiny.model_id} {p}")
    means = capture_means(tiny, samples, positions=positions, batch_size=16)
    for p in positions:
        assert means[p].shape == (N_LAYERS + 1, HIDDEN)
        torch.testing.assert_close(means[p], ref[p].mean(0), atol=1e-5, rtol=1e-4)


def test_capture_batched_equals_unbatched(tiny: Model) -> None:
    samples = _samples()
    one = capture_means(tiny, samples, batch_size=1)
    two = capture_means(tiny, samples, batch_size=2)
    sub = capture_means(tiny, samples, layers=[1, N_LAYERS], batch_size=2)  # early stop after layer n
    for p in one:
        torch.testing.assert_close(two[p], one[p], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sub[p], one[p][[1, N_LAYERS]], atol=1e-5, rtol=1e-4)


def test_read_reads_stops_early_and_cleans_up(tiny: Model) -> None:
    """`read` hands each wanted layer's output to the reader (0 = embeddings); with stop_after the forward
    ends after the deepest one (the last block never runs) and the stop does not escape the block; a reading
    nested in another ends only its own forward; errors pass through and every hook comes off."""
    ids = torch.tensor([_samples()[0].prompt])
    with torch.no_grad():
        ref = tiny.hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    seen: dict[int, torch.Tensor] = {}
    last: list[int] = []
    before = hook_ids(tiny)
    with torch.no_grad(), read(tiny, [N_LAYERS], lambda layer, _h: last.append(layer)):
        with read(tiny, [0, 2], lambda layer, h: seen.__setitem__(layer, h.detach()), stop_after=True):
            assert tiny.hf(input_ids=ids, use_cache=False) is None  # never reached: the forward stopped
        assert last == [] and sorted(seen) == [0, 2]
        for layer in (0, 2):
            torch.testing.assert_close(seen[layer], ref[layer], atol=1e-5, rtol=1e-4)
        with read(tiny, [1], lambda _l, _h: None, stop_after=True), read(tiny, [2], lambda _l, _h: None,
                                                                              stop_after=True):
            tiny.hf(input_ids=ids, use_cache=False)  # the inner reading (layer 2) never ends: the outer stop wins
        tiny.hf(input_ids=ids, use_cache=False)
        assert last == [N_LAYERS]
    with pytest.raises(RuntimeError, match="boom"), read(tiny, [1], lambda _l, _h: None, stop_after=True):
        raise RuntimeError("boom")
    with pytest.raises(LayerError, match=r"0\.\.3"), read(tiny, [N_LAYERS + 1], lambda _l, _h: None):
        pass
    assert hook_ids(tiny) == before


@pytest.mark.parametrize("positions", ["response", "prompt"])
def test_steer_while_capturing_matches_hand_written_hook(tiny: Model, positions: str) -> None:
    """`with steer(...): capture_means(...)` over a right-padded batch: capture declares each row's prompt
    length, so steering acts on every row's own positions ("response" = from the last prompt token on,
    "prompt" = the prompt tokens), not on the batch's last column. Checked against one plain forward with a
    hand-written hook that adds the vector at exactly those positions and reductions taken by hand."""
    samples = _samples()
    layer, read_layers, vec = 1, [2, N_LAYERS], _unit(5, scale=4.0)
    reductions = ("response", "prompt", "last_prompt")
    with steer(tiny, {layer: vec}, coef=1.0, positions=positions):
        got = capture_means(tiny, samples, layers=read_layers, positions=reductions, batch_size=16)
    plain = capture_means(tiny, samples, layers=read_layers, positions=reductions, batch_size=16)

    ids, mask = pad_batch([s.prompt + s.response for s in samples], PAD, side="right")
    plen = torch.tensor([len(s.prompt) for s in samples])[:, None]
    col = torch.arange(ids.shape[1])[None, :]
    where = (col >= plen - 1) if positions == "response" else (col < plen)

    def add(_m: nn.Module, _a: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        h = h + where[..., None].to(h.dtype) * vec
        return (h, *out[1:]) if isinstance(out, tuple) else h

    seen: dict[int, torch.Tensor] = {}
    hooks = [tiny.layers[layer - 1].register_forward_hook(add)]
    hooks += [tiny.layers[ly - 1].register_forward_hook(
        lambda _m, _a, out, ly=ly: seen.__setitem__(ly, (out[0] if isinstance(out, tuple) else out).detach()))
        for ly in read_layers]
    try:
        with torch.no_grad():
            tiny.hf(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hidden = torch.stack([seen[ly] for ly in read_layers], dim=1)  # [batch, len(read_layers), seq, hidden]
    ref = {"response": torch.stack([hidden[i, :, len(s.prompt):len(s.prompt) + len(s.response)].mean(1)
                                    for i, s in enumerate(samples)]).mean(0),
           "prompt": torch.stack([hidden[i, :, :len(s.prompt)].mean(1) for i, s in enumerate(samples)]).mean(0),
           "last_prompt": torch.stack([hidden[i, :, len(s.prompt) - 1] for i, s in enumerate(samples)]).mean(0)}
    for p in reductions:
        torch.testing.assert_close(got[p], ref[p], atol=1e-5, rtol=1e-4, msg=f"{tiny.model_id} {positions}: {p}")
    # the steering reached every row's positions (a last-column-only steer would leave the prompt alone)
    assert not torch.allclose(got["prompt" if positions == "prompt" else "response"],
                              plain["prompt" if positions == "prompt" else "response"], atol=1e-3)
    assert not torch.allclose(got["last_prompt"], plain["last_prompt"], atol=1e-3)


@pytest.mark.parametrize("positions", [None, "response", "prompt"])
def test_shared_prompts_score_as_whole_forwards(tiny: Model, positions: Positions | None) -> None:
    """`response_logprobs` computes a shared prompt once (left-padded prefill, cached responses): the same
    scores as one cache-free forward per sample on every architecture, sliding windows (Gemma 2's is 4 here,
    shorter than the prompts) and steering included."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 3, 7)]
    samples = [Sample(p, torch.randint(3, VOCAB, (r,), generator=g).tolist()) for p in prompts for r in (4, 1, 9)]
    handle = steer(tiny, {2: _unit(4, 3.0)}, positions=positions) if positions else None
    try:
        whole = response_logprobs(tiny, samples, share_prompts=False)
        for batch_size in (16, 2):
            shared = response_logprobs(tiny, samples, batch_size=batch_size)
            torch.testing.assert_close(torch.tensor(shared), torch.tensor(whole), atol=1e-5, rtol=1e-5,
                                       msg=f"{tiny.model_id} {positions} batch {batch_size}")
    finally:
        if handle is not None:
            handle.remove()
    if positions == "response":
        plain = response_logprobs(tiny, samples, share_prompts=False)
        assert max(abs(a - b) for a, b in zip(plain, whole, strict=True)) > 1e-3  # type: ignore[operator]


# 3. steering --------------------------------------------------------------------------------------------


def _logits(model: Model, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits


def test_steer_all_and_exact_restore(tiny: Model) -> None:
    ids, mask = pad_batch([s.prompt + s.response for s in _samples()], PAD, side="right")
    before = _logits(tiny, ids, mask)
    for layer in range(1, N_LAYERS + 1):
        with steer(tiny, {layer: _unit(layer)}, coef=4.0, positions="all"):
            steered = _logits(tiny, ids, mask)
        assert not torch.allclose(steered, before, atol=1e-3), f"layer {layer} steering changed nothing"
        assert torch.equal(_logits(tiny, ids, mask), before), f"layer {layer}: hooks not fully removed"
    handle = steer(tiny, {1: _unit(0)}, coef=4.0, positions="all")
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(_logits(tiny, ids, mask), before)


def _left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 3)]
    return pad_batch(prompts, PAD, side="left")


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """What `generate` uses for left-padded rows: count real tokens, pads get a dummy 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("positions", ["response", "prompt"])
def test_steer_generate_kv_cache_matches_cache_free(tiny: Model, positions: str) -> None:
    """Greedy generation with the KV cache under steering equals a cache-free replay of the whole sequence
    with an explicit boolean positions mask: 'response' = the last prompt token onward, 'prompt' = the
    prompt tokens only (and none of the decoding steps); padding excluded from the mask."""
    ids, mask = _left_padded_prompts()
    width, new = ids.shape[1], 4
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=PAD, bos_token_id=None, use_cache=True,
                              return_dict_in_generate=True, output_logits=True)
    layer, vec = 2, _unit(7, scale=8.0)
    with torch.no_grad(), steer(tiny, {layer: vec}, coef=1.0, positions=positions):
        out = tiny.hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    seq = out.sequences
    assert seq.shape == (2, width + new)
    step_logits = torch.stack(out.logits, dim=1)  # [batch, new, vocab]: logits that chose each new token

    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    col = torch.arange(width + new)[None, :]
    real = full_mask.bool()
    where = real & (col >= width - 1) if positions == "response" else real & (col < width)
    with steer(tiny, {layer: vec}, coef=1.0, positions=where):
        ref = _logits(tiny, seq, full_mask, position_ids=_position_ids(full_mask))
    ref_steps = ref[:, width - 1: width - 1 + new]
    torch.testing.assert_close(step_logits, ref_steps, atol=1e-4, rtol=1e-4,
                               msg=f"{tiny.model_id}: KV-cache steering at '{positions}' differs from replay")
    assert torch.equal(seq[:, width:], ref_steps.argmax(-1))
    # The steering did something at the steered positions (otherwise the check above proves nothing).
    plain = _logits(tiny, seq, full_mask, position_ids=_position_ids(full_mask))[:, width - 1: width - 1 + new]
    assert not torch.allclose(plain, ref_steps, atol=1e-3)


def test_steer_positions_mask_outside_cache_free_forward_is_refused(tiny: Model) -> None:
    from personavec.errors import SteeringError

    ids, mask = _left_padded_prompts()
    bad: Positions = torch.ones(2, ids.shape[1] + 1, dtype=torch.bool)
    with steer(tiny, {1: _unit(0)}, positions=bad), pytest.raises(SteeringError, match="does not fit"):
        _logits(tiny, ids, mask)


# 4. ablation --------------------------------------------------------------------------------------------


def test_ablate_removes_projection(tiny: Model) -> None:
    samples = _samples()
    for layer in range(1, N_LAYERS + 1):
        plain = capture_means(tiny, samples, layers=[layer], positions=("response", "all"))
        # A direction with a clear projection (random init activations are small): the mean activation
        # plus a random component of the same size.
        mean = plain["all"][0]
        u = mean / mean.norm() + _unit(10 + layer)
        u = u / u.norm()
        tokens: list[torch.Tensor] = []
        with ablate(tiny, {layer: 3.0 * u}):  # any scale: the direction is normalised
            # A read hook registered after the ablation hook sees the rewritten output.
            reader = tiny.layers[layer - 1].register_forward_hook(
                lambda _m, _a, out, tokens=tokens: tokens.append(block_output(out).detach().clone()))
            try:
                ablated = capture_means(tiny, samples, layers=[layer], positions=("response", "all"))
            finally:
                reader.remove()
        for p in ("response", "all"):
            scale = float(plain[p][0].norm())
            assert abs(float(plain[p][0] @ u)) > 0.3 * scale, "the direction had no projection to remove"
            assert abs(float(ablated[p][0] @ u)) < 1e-5 * max(scale, 1.0), f"{tiny.model_id} layer {layer} {p}"
        acts = torch.cat([t.reshape(-1, HIDDEN) for t in tokens])
        assert (acts @ u).abs().max() < 1e-5 * max(float(acts.norm(dim=-1).max()), 1.0)
