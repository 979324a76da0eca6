"""Batched serving: `personavec serve` gathers waiting requests into one continuous batch in which every row
has its own steering (vectors, layers, coefficients, positions) and its own persona readings. Driven like
tests/test_serve.py: the real app on a loopback port, the official `openai` client, the real embedded model.

To put requests into one batch for certain, a test holds the model's generation lock while it sends them
(the worker then waits before its first forward), waits until all are admitted and lets go.

Exactness (see `personavec.serve.batching`): in float32 every batched answer has the tokens of the same
request sent alone; a prefill is bit for bit the one of the request alone (prompt readings are equal), the
later steps agree to rounding (a matrix multiply over several rows takes another CPU kernel than over
one; attention sums over masked padding in another order). In bfloat16 that rounding can turn a near tie
after some tokens: the test there states and checks the tolerance."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import torch

import personavec as pv
from personavec.serve import Engine, Job, Result, ServeSettings, SteerTerm, create_app, serve_in_thread
from personavec.serve.engine import model_lock

KEY = "batch-key-42"
PLAIN = [{"role": "user", "content": "In one sentence, what is a good way to treat people?"}]
OTHER = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name a colour."}]
SHORT = [{"role": "user", "content": "Hi"}]
TOKENS = 10


@pytest.fixture(scope="module")
def model32() -> pv.Model:
    """Float32: the batched answers must have exactly the tokens of each request alone."""
    return pv.load_model(dtype="float32")


def synthetic(model: pv.Model, name: str, seed: int, scale: float = 12.0, **meta: Any) -> pv.PersonaVector:
    """A seeded random direction per layer (norm `scale`) carrying this model's fingerprint: enough to
    steer and to read, with nothing to extract."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(model.n_layers + 1, model.hidden_size, generator=g)
    t = t / t.norm(dim=-1, keepdim=True) * scale
    return pv.PersonaVector(tensors={"response": t}, meta={"trait": name, "model_id": model.model_id,
                                                            "fingerprint": model.fingerprint, "best_layer": 12, **meta})


def vectors_for(model: pv.Model) -> dict[str, pv.PersonaVector]:
    return {"kind": synthetic(model, "kind", 1),
            "calm": synthetic(model, "calm", 2, monitor={"layer": 20, "threshold": -1e6})}


@pytest.fixture(scope="module")
def served(model32: pv.Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    log = tmp_path_factory.mktemp("batch") / "requests.jsonl"
    settings = ServeSettings(api_key=KEY, max_queue=4, max_batch_size=8, max_tokens_limit=32, log_path=log,
                             log_prompts=True)
    app = create_app(model32, vectors_for(model32), settings)
    with serve_in_thread(app) as root:
        yield {"url": f"{root}/v1", "root": root, "log": log, "engine": app.state.engine, "model": model32,
               "client": openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0, timeout=900)}


# ---- requests, normalized so that an answer alone and the same answer in a batch compare directly -------
Spec = tuple[str, Any, dict[str, Any]]  # (endpoint, messages or prompt, extra body)
STEER_KIND = [{"vector": "kind", "coef": 1.0}]  # layer 12 (the vector's), response positions
STEER_MANY = [{"vector": "kind", "coef": 1.5, "layer": 8, "positions": "all"},  # two terms at layer 8
              {"vector": "calm", "coef": -1.0, "layer": 8, "positions": "prompt"},
              {"vector": "calm", "coef": 2.0, "layer": 20}]
MIXED: list[Spec] = [
    ("chat", PLAIN, {}),  # unsteered (every request is monitored)
    ("chat", PLAIN, {"steer": STEER_KIND}),  # same prompt length as the first: prefilled with it, one forward
    ("chat", OTHER, {"steer": STEER_MANY}),
    ("chat", OTHER, {}),
    ("chat", SHORT, {"steer": [{"vector": "calm", "coef": 3.0, "positions": "all"}]}),
    ("completion", "Once upon a time", {"steer": [{"vector": "kind", "coef": -2.0, "positions": "prompt"}]}),
]


def send(srv: dict[str, Any], spec: Spec, max_tokens: int = TOKENS) -> dict[str, Any]:
    kind, what, extra = spec
    client = srv["client"]
    model_id = srv["model"].model_id
    if kind == "chat":
        r = client.chat.completions.create(model=model_id, messages=what, max_tokens=max_tokens, temperature=0,
                                           logprobs=True, top_logprobs=0, extra_body=extra or None)
        c = r.choices[0]
        tokens = [(t.token, t.logprob) for t in c.logprobs.content]
        text, persona = c.message.content, r.model_extra["persona"]
    else:
        r = client.completions.create(model=model_id, prompt=what, max_tokens=max_tokens, temperature=0, logprobs=0,
                                      extra_body=extra or None)
        c = r.choices[0]
        tokens = list(zip(c.logprobs.tokens, c.logprobs.token_logprobs, strict=True))
        text, persona = c.text, c.model_extra["persona"]
    return {"text": text, "finish": c.finish_reason, "usage": r.usage.model_dump(), "tokens": tokens,
            "persona": persona, "steer": r.model_extra["steer"]}


_alone: dict[str, dict[str, Any]] = {}


def alone(srv: dict[str, Any], spec: Spec, max_tokens: int = TOKENS) -> dict[str, Any]:
    """The answer to `spec` sent alone (nothing else running), once per test module."""
    key = json.dumps([spec, max_tokens])
    if key not in _alone:
        assert srv["engine"].in_flight == 0
        _alone[key] = send(srv, spec, max_tokens)
    return _alone[key]


@contextmanager
def held(srv: dict[str, Any], n: int) -> Iterator[ThreadPoolExecutor]:
    """Hold the generation lock while the block sends requests on the pool, until `n` are admitted; then let
    the worker go, so that they run in one batch."""
    engine: Engine = srv["engine"]
    with ThreadPoolExecutor(max(n, 1) + 2) as pool, model_lock(srv["model"]):
        yield pool
        deadline = time.monotonic() + 120
        while engine.in_flight < n:
            assert time.monotonic() < deadline, f"only {engine.in_flight} of {n} requests were admitted"
            time.sleep(0.02)


def assert_same_answer(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """Float32: the same tokens, text, finish and usage; the prompt reading bit for bit (an unpadded prefill);
    logprobs and response readings to float32 rounding."""
    assert [t for t, _ in got["tokens"]] == [t for t, _ in want["tokens"]], what
    assert (got["text"], got["finish"], got["usage"], got["steer"]) == (want["text"], want["finish"], want["usage"],
                                                                        want["steer"]), what
    assert [lp for _, lp in got["tokens"]] == pytest.approx([lp for _, lp in want["tokens"]], abs=1e-4), what
    assert got["tokens"][0][1] == want["tokens"][0][1], what  # the first token comes from the prefill: exact
    assert set(got["persona"]) == set(want["persona"]) == {"kind", "calm"}, what
    for name, reading in got["persona"].items():
        ref = want["persona"][name]
        assert reading["prompt_projection"] == ref["prompt_projection"], (what, name)
        assert reading["response_projection"] == pytest.approx(ref["response_projection"], rel=1e-4, abs=1e-3)
        assert reading["flagged"] == ref["flagged"] and reading["layer"] == ref["layer"], (what, name)


def test_mixed_batch_equals_each_request_alone(served: dict[str, Any]) -> None:
    """Steered (one term; three terms, two at one layer; every position; prompt only), unsteered and
    monitored requests, chat and legacy completions, prompts of four lengths, in one batch: each answer is
    the one the request gets alone."""
    want = [alone(served, spec) for spec in MIXED]
    assert want[1]["text"] != want[0]["text"]  # the steering does change answers
    assert want[2]["text"] != want[3]["text"]
    before = served["engine"].stats
    with held(served, len(MIXED)) as pool:
        futures = [pool.submit(send, served, spec) for spec in MIXED]
    got = [f.result() for f in futures]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same_answer(g, w, f"request {i}: {MIXED[i]}")
    stats = served["engine"].stats
    assert stats["largest_batch"] >= len(MIXED) - 1 and stats["steps"] - before["steps"] < len(MIXED) * TOKENS
    assert served["engine"].in_flight == 0


def stream_chat(srv: dict[str, Any], spec: Spec, max_tokens: int, *, stop_after: int | None = None,
                started: threading.Event | None = None) -> dict[str, Any]:
    """Stream a chat completion; with `stop_after`, close the stream after that many content chunks."""
    _, messages, extra = spec
    stream = srv["client"].chat.completions.create(model=srv["model"].model_id, messages=messages,
                                                   max_tokens=max_tokens, temperature=0, stream=True,
                                                   extra_body={**extra, "ignore_eos": True})
    pieces: list[str] = []
    finish: Any = None
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if started is not None:
                    started.set()
                if stop_after is not None and len(pieces) >= stop_after:
                    break  # leaving the block closes the connection: the server cancels the request
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk
    return {"text": "".join(pieces), "finish": finish}


def test_streaming_and_cancelled_requests_inside_a_batch(served: dict[str, Any]) -> None:
    """A streamed answer in a batch streams the text the same request gets alone; a stream dropped after
    its first chunks is cancelled (the log says so) while the others finish unchanged; nothing is lost."""
    steered = ("chat", PLAIN, {"steer": STEER_KIND})
    want_stream = alone(served, ("chat", PLAIN, {"steer": STEER_KIND, "ignore_eos": True}), 16)
    want_plain = alone(served, MIXED[3])
    started = threading.Event()
    with held(served, 3) as pool:
        streamed = pool.submit(stream_chat, served, steered, 16)
        dropped = pool.submit(stream_chat, served, ("chat", SHORT, {}), 32, stop_after=2, started=started)
        plain = pool.submit(send, served, MIXED[3])
    s = streamed.result()
    assert s["text"] == want_stream["text"] and s["finish"].choices[0].finish_reason == "length"
    assert s["finish"].model_extra["persona"]["calm"]["prompt_projection"] == \
        want_stream["persona"]["calm"]["prompt_projection"]
    assert_same_answer(plain.result(), want_plain, "unsteered request beside a stream")
    assert dropped.result()["finish"] is None and started.is_set()
    health = served["root"] + "/health"
    deadline = time.monotonic() + 300
    while httpx.get(health, timeout=30).json()["in_flight"]:
        assert time.monotonic() < deadline, "the dropped stream kept its slot"
        time.sleep(0.05)
    rows = [json.loads(line) for line in served["log"].read_text().splitlines()]
    cancelled = [r for r in rows if r.get("messages") == SHORT and r["finish_reason"] == "cancelled"]
    assert len(cancelled) == 1 and 2 <= cancelled[0]["usage"]["completion_tokens"] < 32


def test_full_queue_answers_429_with_batching(model32: pv.Model) -> None:
    """Two rows run and one waits: a fourth request gets 429 at once; the three admitted ones all finish."""
    settings = ServeSettings(max_batch_size=2, max_queue=1, max_tokens_limit=8)
    app = create_app(model32, [], settings)
    engine: Engine = app.state.engine
    with serve_in_thread(app) as root:
        srv = {"engine": engine, "model": model32,
               "client": openai.OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0, timeout=900)}
        assert httpx.get(root + "/health").json()["max_batch_size"] == 2

        def ask(messages: list[dict[str, str]]) -> str:
            r = srv["client"].chat.completions.create(model=model32.model_id, messages=messages, max_tokens=3,
                                                      temperature=0)
            return str(r.choices[0].message.content)

        with held(srv, 3) as pool:
            admitted = [pool.submit(ask, m) for m in (PLAIN, OTHER, SHORT)]
            deadline = time.monotonic() + 120
            while engine.in_flight < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as info:
                ask(OTHER)
            assert info.value.status_code == 429 and info.value.body["code"] == "queue_full"
        assert all(f.result() for f in admitted)
        assert ask(SHORT) == admitted[2].result()
        assert engine.in_flight == 0 and engine.stats["largest_batch"] == 2


def test_bfloat16_tolerance(model: pv.Model) -> None:
    """bfloat16 (the session model): the prefill is exact (first token, its logprob and the prompt reading
    equal the request alone); later steps round differently in a batch than alone, so a near tie may turn
    the other way after some tokens. Stated tolerance: along the tokens both answers share, logprobs agree
    within 0.25 nats and, for answers whose tokens are all equal, the response reading within 2.0 (about 1%
    of the activation norm at these layers, the bound test_serve.py uses for bf16 readings)."""
    vec = synthetic(model, "kind", 1)
    engine = Engine(model, {"kind": vec}, max_batch_size=8)
    term = SteerTerm("kind", 12, 1.0, "response", vec.at(12))
    prompts = [model.encode_chat(m) for m in (PLAIN, OTHER, SHORT, PLAIN)]
    steers: list[list[SteerTerm]] = [[], [term], [], [term]]

    def job(i: int, emit: Callable[[Any], None] = lambda _e: None) -> Job:
        return Job(prompt=prompts[i], max_tokens=8, steer=steers[i], logprobs=0, emit=emit)

    solo = [engine.run(job(i)) for i in range(len(prompts))]
    results: dict[int, Future[Result]] = {i: Future() for i in range(len(prompts))}

    def emit_for(i: int) -> Callable[[Any], None]:
        def emit(event: Any) -> None:
            if event[0] == "done":
                results[i].set_result(event[1])
            elif event[0] == "error":
                results[i].set_exception(event[1])
        return emit

    engine.start()
    try:
        with model_lock(model):
            assert all(engine.try_submit(job(i, emit_for(i))) for i in range(len(prompts)))
        batched = [results[i].result(timeout=900) for i in range(len(prompts))]
    finally:
        engine.stop()
    assert engine.stats["largest_batch"] == len(prompts)
    for a, b in zip(solo, batched, strict=True):
        assert a.logprobs is not None and b.logprobs is not None
        assert a.tokens[0] == b.tokens[0] and a.logprobs[0][1] == b.logprobs[0][1]
        assert a.persona["kind"]["prompt_projection"] == b.persona["kind"]["prompt_projection"]
        shared = next((k for k, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False)) if x != y),
                      min(len(a.tokens), len(b.tokens)))
        for k in range(shared):
            assert abs((a.logprobs[k][1] or 0.0) - (b.logprobs[k][1] or 0.0)) <= 0.25
        if a.tokens == b.tokens:
            assert b.persona["kind"]["response_projection"] == pytest.approx(
                a.persona["kind"]["response_projection"], abs=2.0)
