"""Large-model loading: a model placed by a `device_map` (some blocks offloaded to disk by accelerate, their
weights on 'meta' between forwards) steers, ablates and captures exactly as the same model loaded plainly;
`Model.from_hf` wraps a model loaded by hand; 8/4-bit loading is refused on a machine without CUDA; the
steering hooks never read a value back from the device.

The model is a tiny random Llama-shaped chat model (4 blocks, hidden 64) with the embedded model's tokenizer
and chat template, written to a folder once per module: loading it takes a fraction of a second. The test
that splits a model between a GPU and the CPU runs only where CUDA is available (not on the CI machine)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig
from typer.testing import CliRunner

import personavec as pv
from personavec.capture import Sample, capture_means
from personavec.chat import encode_chat, pad_batch
from personavec.cli import app
from personavec.errors import ModelLoadError
from personavec.layers import module_device
from personavec.models import Model, _dequantized_folder, embedded_gguf
from personavec.steering import ablate, sequence_layout, steer

N_LAYERS, HIDDEN = 4, 64
# Blocks 1 and 3, the embeddings and the LM head live on disk; blocks 0 and 2 and the final norm on the CPU.
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
            "lm_head": "disk"}
QUESTIONS = ["What is your favourite colour?", "Tell me about the sea in one sentence, please."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat-model folder: random weights of a tiny Llama, the embedded model's tokenizer and template."""
    tok = AutoTokenizer.from_pretrained(str(_dequantized_folder(embedded_gguf())))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-chat") / "tiny-chat"
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(folder: Path) -> Model:
    return pv.load_model(folder, dtype="float32")


@pytest.fixture(scope="module")
def offloaded(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    m = pv.load_model(folder, dtype="float32", device_map=DISK_MAP,
                      offload_folder=tmp_path_factory.mktemp("offload"))
    hooks = [(dict(b._forward_hooks), dict(b._forward_pre_hooks)) for b in m.layers]
    yield m
    assert [(dict(b._forward_hooks), dict(b._forward_pre_hooks)) for b in m.layers] == hooks


def _direction(seed: int, norm: float = 4.0) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return norm * v / v.norm()


def _prompts(model: Model) -> list[list[int]]:
    return [encode_chat(model.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def _generate(model: Model, new: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation with the KV cache from two left-padded chat prompts: (sequences, step logits)."""
    ids, mask = pad_batch(_prompts(model), model.tokenizer.pad_token_id, side="left", device=model.device)
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=model.tokenizer.pad_token_id, bos_token_id=None,
                              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out = model.hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out.sequences, torch.stack(out.logits, dim=1)


def _samples(model: Model) -> list[Sample]:
    answers = ["Blue, like the sky.", "The sea is wide and deep and very old."]
    return [Sample(p, model.tokenizer.encode(a, add_special_tokens=False))
            for p, a in zip(_prompts(model), answers, strict=True)]


def test_offloaded_model_is_the_same_model(plain: Model, offloaded: Model) -> None:
    offloaded_blocks = [i for i, b in enumerate(offloaded.layers)
                        if all(p.device.type == "meta" for p in b.parameters())]
    assert offloaded_blocks == [1, 3]  # really on disk between forwards
    assert next(offloaded.hf.parameters()).device.type == "meta"  # what the first parameter says…
    assert offloaded.device == torch.device("cpu")  # …and where inputs really go
    assert all(module_device(b) == torch.device("cpu") for b in offloaded.layers)
    assert offloaded.dtype == torch.float32
    assert offloaded.fingerprint == plain.fingerprint  # offloaded weights are read back for the hash
    assert (offloaded.n_layers, offloaded.hidden_size, offloaded.layers_path) == (N_LAYERS, HIDDEN, "model.layers")
    assert offloaded.model_id == plain.model_id == "tiny-chat"


def test_capture_on_offloaded_blocks_matches(plain: Model, offloaded: Model) -> None:
    positions = ("response", "prompt", "last_prompt", "all")
    a = capture_means(plain, _samples(plain), positions=positions)
    b = capture_means(offloaded, _samples(offloaded), positions=positions)
    sub = capture_means(offloaded, _samples(offloaded), layers=[0, 2], positions=positions)  # early stop
    for p in positions:
        assert a[p].shape == (N_LAYERS + 1, HIDDEN)
        torch.testing.assert_close(b[p], a[p], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sub[p], a[p][[0, 2]], atol=1e-6, rtol=1e-5)


def test_steering_and_ablation_on_offloaded_blocks_match(plain: Model, offloaded: Model) -> None:
    vectors = {2: _direction(1), 4: _direction(2)}  # layer 2 = block 1 (on disk), layer 4 = block 3 (on disk)
    base_logits = _generate(plain)[1]
    results = {}
    for name, m in (("plain", plain), ("offloaded", offloaded)):
        with steer(m, vectors, coef=2.0, positions="response"):
            seq, logits = _generate(m)
        with steer(m, {3: _direction(3)}, coef=2.0, positions="prompt"):
            _, prompt_logits = _generate(m)
        with ablate(m, {2: _direction(4)}):
            _, ablated_logits = _generate(m)
        results[name] = (seq, logits, prompt_logits, ablated_logits)
    (seq_a, *logits_a), (seq_b, *logits_b) = results["plain"], results["offloaded"]
    assert torch.equal(seq_a, seq_b)
    for x, y in zip(logits_a, logits_b, strict=True):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(x, base_logits, atol=1e-3)  # each intervention changed the logits
    # A cache-free forward over prompt + answer with the generation positions declared (as training and
    # likelihood scoring do).
    samples = _samples(plain)
    ids, mask = pad_batch([s.prompt + s.response for s in samples], plain.tokenizer.pad_token_id, side="right")
    plens = torch.tensor([len(s.prompt) for s in samples])
    outs = []
    for m in (plain, offloaded):
        with torch.no_grad(), sequence_layout(plens), steer(m, vectors, coef=2.0, positions="response"):
            outs.append(m.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


_HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy")


def test_steering_hooks_never_read_device_values(plain: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way of reading a tensor's value back to the host is counted during a prefill and a cached decode
    step, with and without steering (all position modes) and ablation: the hooks add none (on a GPU each
    would be a device sync per steered layer and step)."""
    counts: dict[str, int] = {}

    def counting(name: str, original: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return original(self, *args, **kwargs)
        return wrapper

    ids, mask = pad_batch(_prompts(plain), plain.tokenizer.pad_token_id, side="left")

    def two_steps() -> dict[str, int]:
        counts.clear()
        with torch.no_grad():
            out = plain.hf(input_ids=ids, attention_mask=mask, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            plain.hf(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                     past_key_values=out.past_key_values, use_cache=True)
        return dict(counts)

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    baseline = two_steps()
    for positions in ("response", "prompt", "all"):
        with steer(plain, {1: _direction(5), 3: _direction(6)}, coef=2.0, positions=positions):
            assert two_steps() == baseline, positions
    with ablate(plain, {2: _direction(7)}):
        assert two_steps() == baseline


def test_from_hf_wraps_a_model_loaded_by_hand(folder: Path, plain: Model, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    m = Model.from_hf(hf, tok)
    assert (m.fingerprint, m.layers_path, m.n_layers, m.model_id) == (plain.fingerprint, "model.layers", N_LAYERS,
                                                                      "tiny-chat")
    assert m.source == str(folder) and m.dtype == torch.float32 and m.device == torch.device("cpu")
    assert not m.hf.training
    vec = pv.PersonaVector({"response": torch.stack([_direction(i) for i in range(N_LAYERS + 1)])},
                           {"trait": "t", "fingerprint": plain.fingerprint, "model_id": plain.model_id})
    vec.check_model(m)  # a vector made on the loaded model fits the wrapped one
    with vec.steer(m, layer=2, coef=2.0):
        steered = _generate(m)[1]
    with vec.steer(plain, layer=2, coef=2.0):
        torch.testing.assert_close(steered, _generate(plain)[1])
    # Loaded by hand with a device_map too (disk offload), under a name of our choosing.
    hf_off = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map=DISK_MAP,
                                                  offload_folder=str(tmp_path / "off"))
    wrapped = Model.from_hf(hf_off, tok, model_id="mine")
    assert wrapped.model_id == "mine" and wrapped.fingerprint == plain.fingerprint
    tok.chat_template = None
    with pytest.raises(ModelLoadError, match="no chat template"):
        Model.from_hf(hf, tok)


def test_quantized_and_conflicting_loads_are_refused(folder: Path) -> None:
    if not torch.cuda.is_available():
        for bits in ("8bit", "4bit"):
            with pytest.raises(ModelLoadError, match=f"--load-in {bits} needs a CUDA GPU"):
                pv.load_model(folder, load_in=bits)
    with pytest.raises(ModelLoadError, match="unknown --load-in '3bit'"):
        pv.load_model(folder, load_in="3bit", device="cuda")
    with pytest.raises(ModelLoadError, match="not both"):
        pv.load_model(folder, device="cpu", device_map="auto")


def test_cli_loading_options(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loading options go before the command name and reach load_model; their errors are one line."""
    import personavec.models

    placed: list[Any] = []
    original = personavec.models.load_model

    def spy(*args: Any, **kwargs: Any) -> Model:
        m = original(*args, **kwargs)
        placed.append(getattr(m.hf, "hf_device_map", None))
        return m

    monkeypatch.setattr(personavec.models, "load_model", spy)
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["generate", "What is your favourite colour?", "--model", str(folder), "--max-new-tokens", "4"]
    plain_run = runner.invoke(app, args)
    assert plain_run.exit_code == 0, plain_run.output
    mapped = runner.invoke(app, ["--device-map", json.dumps(DISK_MAP), "--offload-folder", str(tmp_path / "off"),
                                 *args])
    assert mapped.exit_code == 0, mapped.output
    assert mapped.stdout == plain_run.stdout and placed == [None, DISK_MAP]
    res = runner.invoke(app, ["--device-map", "{model.layers.0: 0", *args])
    assert isinstance(res.exception, pv.PersonavecError) and "--device-map is not a JSON object" in str(res.exception)
    if not torch.cuda.is_available():
        res = runner.invoke(app, ["--load-in", "4bit", *args])
        assert isinstance(res.exception, ModelLoadError) and "needs a CUDA GPU" in str(res.exception)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not run on the CI machine)")
def test_model_split_between_gpu_and_cpu_matches(folder: Path, plain: Model) -> None:
    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0,
             "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": 0, "lm_head": "cpu"}
    m = pv.load_model(folder, dtype="float32", device_map=split)
    assert m.device == torch.device("cuda", 0)
    assert [module_device(b).type for b in m.layers] == ["cuda", "cpu", "cuda", "cpu"]  # type: ignore[union-attr]
    vectors = {2: _direction(1), 3: _direction(2), 4: _direction(3)}
    with steer(m, vectors, coef=2.0, positions="response"):
        seq, logits = _generate(m)
    with steer(plain, vectors, coef=2.0, positions="response"):
        seq_ref, logits_ref = _generate(plain)
    assert torch.equal(seq.cpu(), seq_ref)
    torch.testing.assert_close(logits.cpu(), logits_ref, atol=1e-4, rtol=1e-4)
    a = capture_means(plain, _samples(plain))
    b = capture_means(m, _samples(m))
    for p in a:
        torch.testing.assert_close(b[p], a[p], atol=1e-4, rtol=1e-4)
