"""Judges: number aggregation, the number trie on real tokenizers, the on-disk cache, the OpenAI judge
over real HTTP against a model-backed fake server, and the local judge on the embedded model."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from openai_fake import FakeOpenAI, closed_port_url, serve

from personavec.errors import JudgeError
from personavec.judges import numbers
from personavec.judges.base import COHERENCE_RUBRIC, Judge, JudgeItem, render
from personavec.judges.cache import MEMORY, JudgeCache
from personavec.judges.local import LocalJudge
from personavec.judges.numbers import (
    aggregate_distribution,
    aggregate_top_logprobs,
    build_number_trie,
    digit_token_mask,
    integer_distribution,
    integer_distributions,
    parse_score_token,
)
from personavec.judges.openai_compat import OpenAIJudge
from personavec.models import Model

# A short rubric keeps the forwards small; the coherence rubric is exercised too.
RUBRIC = ("Question: {question}\nAnswer: {answer}\nHow cheerful is this answer, from 0 to 100? "
          "Reply with a number only.")
ITEMS = [JudgeItem("What is 2+2?", "4. Happy to help!"),
         JudgeItem("Describe the sea.", "Grey, cold and endless.", system="Be gloomy.")]


def _tok_text(model: Model, s: str) -> str:
    """The text of the single token the embedded tokenizer uses for `s` (asserts it is one token)."""
    ids = model.tokenizer.encode(s, add_special_tokens=False)
    assert len(ids) == 1, (s, ids)
    return str(model.tokenizer.decode(ids))


def _prompt(model: Model, item: JudgeItem, rubric: str = RUBRIC) -> list[int]:
    return model.encode_chat([{"role": "user", "content": render(rubric, item.question, item.answer)}])


# --- aggregation of top-k logprob lists -------------------------------------------------------------

def test_aggregate_top_logprobs_on_real_tokens(model: Model) -> None:
    seven, three, word = _tok_text(model, "7"), _tok_text(model, "3"), _tok_text(model, "Hello")
    top = [(seven, math.log(0.5)), (three, math.log(0.2)), (word, math.log(0.25))]
    assert aggregate_top_logprobs(top) == pytest.approx((7 * 0.5 + 3 * 0.2) / 0.7, rel=1e-12)
    # whitespace around a number token is fine (API tokens like " 42"); >100 and non-canonical are not
    api_top = [(" 42", math.log(0.3)), ("150", math.log(0.3)), ("05", math.log(0.1)), ("+5", math.log(0.1)),
               ("1_0", math.log(0.1)), ("٣", math.log(0.05)), ("100\n", math.log(0.1))]
    assert aggregate_top_logprobs(api_top) == pytest.approx((42 * 0.3 + 100 * 0.1) / 0.4, rel=1e-12)
    # mostly a refusal: the few digits carry less than min_mass
    refusal = [(_tok_text(model, "REF"), math.log(0.8)), (seven, math.log(0.1)), (three, math.log(0.1))]
    assert aggregate_top_logprobs(refusal) is None
    assert aggregate_top_logprobs(refusal, min_mass=0.2) == pytest.approx(5.0)
    assert aggregate_top_logprobs([]) is None
    assert parse_score_token(" 0 ") == 0 and parse_score_token("101") is None and parse_score_token("") is None


def test_aggregate_distribution() -> None:
    assert aggregate_distribution({10: 0.1, 90: 0.3}) == pytest.approx(70.0)
    assert aggregate_distribution({10: 0.1, 90: 0.1}) is None
    assert aggregate_distribution({}) is None


# --- the number trie on real tokenizers ---------------------------------------------------------------

def test_number_trie_splits_digits_on_smollm2(model: Model) -> None:
    tok = model.tokenizer
    trie = build_number_trie(tok)
    assert len(trie.paths) == 101
    digit = {d: tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)}
    assert trie.paths[57] == (digit[5], digit[7])
    assert trie.paths[100] == (digit[1], digit[0], digit[0])
    # root, '1'..'9' (each starts two-digit numbers) and '10' (starts 100); '0' and '57' are leaves
    assert trie.internal[0] == ()
    assert set(trie.internal) == {(), *((digit[d],) for d in range(1, 10)), (digit[1], digit[0])}
    for n, path in trie.paths.items():
        assert tok.decode(list(path)) == str(n)
    mask = digit_token_mask(tok, len(tok))
    assert mask[digit[5]] and not mask[tok.encode("Hello", add_special_tokens=False)[0]]
    space = tok.encode(" ", add_special_tokens=False)
    assert len(space) == 1 and not mask[space[0]]  # ' ' then '5' starts a new number


def _brute_force(model: Model, prompt: list[int], n: int, digit_ids: list[int]) -> float:
    """P(the model writes str(n) and stops), from one unpadded forward per prefix, no trie."""
    tok = model.tokenizer
    path = tok.encode(str(n), add_special_tokens=False)

    @torch.no_grad()
    def probs(ids: list[int]) -> torch.Tensor:
        logits = model.hf(input_ids=torch.tensor([ids])).logits[0, -1]
        return torch.softmax(logits.double(), dim=-1)

    p = 1.0
    for i, t in enumerate(path):
        p *= float(probs(prompt + path[:i])[t])
    if 0 < n <= 10:  # '1'..'9' and '10' can continue into a larger number in range; '0' and the rest cannot
        p *= 1.0 - float(probs(prompt + path)[digit_ids].sum())
    return p


def _digit_ids(tok: Any) -> list[int]:
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return [i for i, text in enumerate(texts) if text[:1] and text[:1] in "0123456789"]


def _tiny_llama(tok: Any, dtype: torch.dtype = torch.float32) -> Model:
    """A real Llama forward with random weights over `tok`'s vocabulary, big enough init that its
    next-token distribution depends strongly on the context (so mixed-up rows would show)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.5, tie_word_embeddings=False)
    hf: Any = LlamaForCausalLM(cfg)
    hf = hf.to(dtype).eval()
    return Model(hf=hf, tokenizer=tok, model_id="tiny-llama", layers=hf.model.layers,
                 layers_path="model.layers", fingerprint="tiny")


def test_integer_distribution_matches_brute_force(model: Model) -> None:
    """On the embedded model's weights, in float32 (in bfloat16 a cached forward rounds differently from
    a full one by several percent on small probabilities): the trie's numbers are the direct forwards'."""
    m32 = model if model.dtype == torch.float32 else dataclasses.replace(model, hf=copy.deepcopy(model.hf).float())
    prompt = model.encode_chat([{"role": "user", "content": "From 0 to 100, how warm is 'Hi!'? Number only."}])
    dist = integer_distribution(m32, prompt)
    assert set(dist) == set(range(101))
    assert all(0.0 <= p <= 1.0 for p in dist.values())
    assert sum(dist.values()) <= 1.0 + 1e-5
    digit_ids = _digit_ids(model.tokenizer)
    # 57: a two-token leaf; 5: stops after one digit; 10: stops after two digits (or goes on to 100)
    for n in (57, 5, 10):
        assert dist[n] == pytest.approx(_brute_force(m32, prompt, n, digit_ids), rel=2e-3, abs=1e-9), n


def test_integer_distribution_exact_in_float64(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real digit-splitting SmolLM2 tokenizer on a tiny float64 Llama: both ways of running the trie
    (shared prompt cache; one left-padded row per node), batched over prompts of different lengths,
    equal the brute-force product to 1e-9."""
    tiny = _tiny_llama(model.tokenizer, torch.float64)
    prompts = [_prompt(model, ITEMS[0]), model.encode_chat([{"role": "user", "content": "Pick a number."}])]
    digit_ids = _digit_ids(model.tokenizer)
    plain_calls: list[int] = []
    plain_path = numbers._next_token_probs

    def counting(*args: Any, **kwargs: Any) -> list[torch.Tensor]:
        plain_calls.append(1)
        return plain_path(*args, **kwargs)

    monkeypatch.setattr(numbers, "_next_token_probs", counting)
    shared = integer_distributions(tiny, prompts)
    assert not plain_calls  # the shared-cache path ran, it did not fall back
    assert shared[0][57] != pytest.approx(shared[1][57], rel=1e-2)  # the prompts matter

    def no_shared_cache(*args: object, **kwargs: object) -> None:
        raise AttributeError("no batch_repeat_interleave")

    monkeypatch.setattr(numbers, "_shared_prefix_probs", no_shared_cache)
    plain = integer_distributions(tiny, prompts)
    assert plain_calls
    for j, prompt in enumerate(prompts):
        for n in (0, 5, 10, 57, 100):
            expected = _brute_force(tiny, prompt, n, digit_ids)
            assert shared[j][n] == pytest.approx(expected, rel=1e-9, abs=0), (j, n)
            assert plain[j][n] == pytest.approx(expected, rel=1e-9, abs=0), (j, n)


def test_integer_distribution_single_token_numbers(model: Model) -> None:
    """A tokenizer with one token per number 0..100: the trie is the root alone and P(n) = p(token n).

    Built offline from a copy of the real tokenizer plus added tokens, run on a tiny random-weight
    Llama whose vocabulary covers them (the embedded model has no embeddings for new tokens)."""
    tok = copy.deepcopy(model.tokenizer)
    tok.add_tokens([str(n) for n in range(10, 101)])
    trie = build_number_trie(tok)
    assert trie.internal == ((),)
    assert all(len(p) == 1 for p in trie.paths.values()) and len(trie.paths) == 101
    assert tok.convert_ids_to_tokens(list(trie.paths[57])) == ["57"]

    tiny = _tiny_llama(tok, torch.float64)
    prompt = model.encode_chat([{"role": "user", "content": "Rate 0 to 100."}])
    dist = integer_distribution(tiny, prompt)
    with torch.no_grad():
        p = torch.softmax(tiny.hf(input_ids=torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    for n in (0, 5, 57, 100):
        assert dist[n] == pytest.approx(float(p[trie.paths[n][0]]), rel=1e-9)


# --- cache ----------------------------------------------------------------------------------------

def test_judge_cache_persists_none_and_is_thread_safe(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "judge.sqlite"
    cache = JudgeCache(path)
    assert not path.exists()  # opened lazily
    k = JudgeCache.key("judge-a", "prompt", "v1")
    assert k != JudgeCache.key("judge-b", "prompt", "v1") != JudgeCache.key("judge-a", "prompt", "v2")
    assert cache.get(k) == (False, None)
    cache.put(k, None)
    assert cache.get(k) == (True, None)

    def work(i: int) -> None:
        for j in range(20):
            cache.put(JudgeCache.key("t", f"{i}-{j}", "v"), float(j))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    again = JudgeCache(path)
    assert len(again) == 81
    assert again.get(JudgeCache.key("t", "3-7", "v")) == (True, 7.0)
    assert JudgeCache(MEMORY).get_many([k]) == {}


# --- OpenAI-compatible judge over real HTTP ---------------------------------------------------------

def _cache(tmp_path: Path) -> JudgeCache:
    return JudgeCache(tmp_path / "judge-cache.sqlite")


def test_openai_judge_reads_top_logprobs(model: Model, tmp_path: Path) -> None:
    fake = FakeOpenAI(model)
    calls: list[tuple[str, int, int]] = []
    with serve(fake):
        judge = OpenAIJudge("smollm2", base_url=fake.url, cache=_cache(tmp_path), concurrency=2)
        assert isinstance(judge, Judge) and judge.name == f"openai:smollm2@{fake.url}"
        scores = judge.score_batch(ITEMS, RUBRIC, progress=lambda *a: calls.append(a))
        coherence = judge.coherence_batch(ITEMS[:1])
    assert fake.requests == 3
    assert calls[-1] == ("judge", 2, 2)
    for item, score in zip(ITEMS, scores, strict=True):
        assert score is None or 0.0 <= score <= 100.0
        # the judge aggregates exactly the top-20 list the server computed for this rubric
        top = fake.served[render(RUBRIC, item.question, item.answer)]
        assert len(top) == 20
        expected = aggregate_top_logprobs(top)
        assert (score is None and expected is None) or score == pytest.approx(expected, rel=1e-6)
    assert coherence[0] is None or 0.0 <= coherence[0] <= 100.0


@pytest.mark.parametrize("status", [429, 500])
def test_openai_judge_retries(model: Model, tmp_path: Path, status: int) -> None:
    fake = FakeOpenAI(model, fail_first=2, fail_status=status)
    with serve(fake):
        judge = OpenAIJudge("smollm2", base_url=fake.url, cache=_cache(tmp_path), max_retries=3)
        score = judge.score_batch(ITEMS[:1], RUBRIC)[0]
    assert fake.requests == 3  # two injected failures, then the answer
    assert score is None or 0.0 <= score <= 100.0


def test_openai_judge_gives_up_with_one_line_error(model: Model, tmp_path: Path) -> None:
    fake = FakeOpenAI(model, fail_first=100, fail_status=500)
    with serve(fake):
        judge = OpenAIJudge("smollm2", base_url=fake.url, cache=_cache(tmp_path), max_retries=1)
        with pytest.raises(JudgeError, match="HTTP 500 after 1 retries") as err:
            judge.score_batch(ITEMS[:1], RUBRIC)
    assert "\n" not in str(err.value) and fake.requests == 2


def test_openai_judge_cache_sends_nothing_twice(model: Model, tmp_path: Path) -> None:
    fake = FakeOpenAI(model)
    with serve(fake):
        first = OpenAIJudge("smollm2", base_url=fake.url, cache=_cache(tmp_path))
        scores = first.score_batch([ITEMS[0], ITEMS[0], ITEMS[1]], RUBRIC)  # a duplicate is asked once
        assert fake.requests == 2 and scores[0] == scores[1]
        calls: list[tuple[str, int, int]] = []
        # a new judge on the same cache file: a rerun pays nothing
        again = OpenAIJudge("smollm2", base_url=fake.url, cache=_cache(tmp_path))
        assert again.score_batch(ITEMS, RUBRIC, progress=lambda *a: calls.append(a)) == scores[1:]
        assert fake.requests == 2 and calls == [("judge", 2, 2)]
        # another judge model is another cache entry
        OpenAIJudge("other-model", base_url=fake.url, cache=_cache(tmp_path)).score_batch(ITEMS[:1], RUBRIC)
        assert fake.requests == 3


def test_openai_judge_unreachable_fails_fast(tmp_path: Path) -> None:
    url = closed_port_url()
    judge = OpenAIJudge("smollm2", base_url=url, cache=_cache(tmp_path), max_retries=1, timeout=2)
    start = time.monotonic()
    with pytest.raises(JudgeError, match="unreachable after 1 retries") as err:
        judge.score_batch(ITEMS, RUBRIC)
    assert time.monotonic() - start < 15
    assert url in str(err.value) and "\n" not in str(err.value)
    assert len(judge.cache) == 0


def test_openai_judge_wrong_token(model: Model, tmp_path: Path) -> None:
    fake = FakeOpenAI(model, token="sk-right")
    with serve(fake):
        bad = OpenAIJudge("smollm2", base_url=fake.url, api_key="sk-wrong", cache=_cache(tmp_path))
        with pytest.raises(JudgeError, match="rejected the API key"):
            bad.score_batch(ITEMS[:1], RUBRIC)
        assert fake.requests == 1  # 401 is not retried
        good = OpenAIJudge("smollm2", base_url=fake.url, api_key="sk-right", cache=_cache(tmp_path))
        good.score_batch(ITEMS[:1], RUBRIC)
        assert fake.requests == 2


def test_openai_judge_needs_logprobs_and_the_api_root(model: Model, tmp_path: Path) -> None:
    with serve(FakeOpenAI(model, omit_logprobs=True)) as fake:
        judge = OpenAIJudge("smollm2", base_url=fake.url, cache=_cache(tmp_path))
        with pytest.raises(JudgeError, match="returned no logprobs"):
            judge.score_batch(ITEMS[:1], RUBRIC)
        root = OpenAIJudge("smollm2", base_url=fake.url.removesuffix("/v1"), cache=_cache(tmp_path))
        with pytest.raises(JudgeError, match=r"HTTP 404 .* ending in /v1"):
            root.score_batch(ITEMS[:1], RUBRIC)
    assert len(judge.cache) == 0


def test_openai_judge_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        OpenAIJudge("gpt-4.1-mini", cache=JudgeCache(MEMORY))


# --- local judge -------------------------------------------------------------------------------------

def test_local_judge_on_embedded_model(model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[int]] = []

    def spy(m: Model, prompts: list[list[int]], **kwargs: object) -> list[dict[int, float]]:
        seen.extend(prompts)
        return integer_distributions(m, prompts, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("personavec.judges.local.integer_distributions", spy)
    judge = LocalJudge(model, cache=_cache(tmp_path))
    assert isinstance(judge, Judge) and judge.name == f"local:{model.model_id}"
    calls: list[tuple[str, int, int]] = []
    scores = judge.score_batch(ITEMS, RUBRIC, progress=lambda *a: calls.append(a))
    assert calls[-1] == ("judge", 2, 2)
    for score in scores:
        assert score is None or 0.0 <= score <= 100.0
    # the judge scores exactly the rubric, rendered as one user message by the chat template
    assert seen == [_prompt(model, it) for it in ITEMS]

    coherence = judge.coherence_batch(ITEMS[:1])
    assert coherence[0] is None or 0.0 <= coherence[0] <= 100.0
    assert seen[-1] == _prompt(model, ITEMS[0], COHERENCE_RUBRIC)

    # a rerun reads the cache and runs no forward
    n_forwards = len(seen)
    assert judge.score_batch(ITEMS, RUBRIC) == scores
    assert judge.coherence_batch(ITEMS[:1]) == coherence
    assert len(seen) == n_forwards


def test_local_judge_with_hooks_is_not_cached(model: Model, caplog: pytest.LogCaptureFixture) -> None:
    """Judging with the model under study inside a steering context would cache steered scores."""
    judge = LocalJudge(model, cache=JudgeCache(MEMORY))
    handle = model.layers[0].register_forward_hook(lambda module, args, output: None)
    try:
        with caplog.at_level("WARNING", logger="personavec"):
            judge.score_batch(ITEMS[:1], RUBRIC)
    finally:
        handle.remove()
    assert "hooks" in caplog.text and len(judge.cache) == 0
