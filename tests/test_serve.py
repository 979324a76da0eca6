"""`personavec serve` as a client meets it: the real app on uvicorn on a loopback port, driven by the
official `openai` client (extra fields through `extra_body`) and by raw HTTP for bodies the client will
not send. Plain, streamed, steered and monitored chat completions; legacy completions with echo and
logprobs that equal the project's own likelihood computation, steered or not; `include_usage`;
concurrent steered and unsteered requests stay isolated; every bad input or unsupported field gets an
OpenAI-style 4xx and the server keeps serving. (lm-evaluation-harness against the server:
test_serve_lm_eval.py.)"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

import personavec as pv
from personavec.capture import Sample
from personavec.errors import VectorError
from personavec.generation import _stop_ids
from personavec.likelihood import response_logprobs
from personavec.projection import project
from personavec.serve import ServeSettings, create_app, parse_steered_model, serve_in_thread

KEY = "test-key-123"
MARKER = "zebra-marker-7781"  # a prompt word that must never reach the log unless prompt logging is on
PLAIN = [{"role": "user", "content": f"In one sentence, what is a good way to treat people? ({MARKER})"}]
OTHER = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Name a colour."}]
COEF = 10.0  # large enough to change a greedy answer of the embedded model at the vector's layer


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a background thread; yields the /v1 base URL."""
    with serve_in_thread(app) as root:
        yield f"{root}/v1"


@pytest.fixture(scope="module")
def vectors(evil_vector: pv.PersonaVector) -> dict[str, pv.PersonaVector]:
    """The session's evil vector as is (no calibration), a copy calibrated by hand at another layer with a
    prompt threshold every reading crosses, and one whose only crossable threshold is the response one
    (the keys `monitor-eval` writes)."""
    vec = evil_vector
    return {"evil": vec, "evil_calibrated": vec.with_meta(monitor={"layer": 10, "threshold": -1e6}),
            "evil_response": vec.with_meta(monitor={"threshold": 1e6, "response_threshold": -1e6}),
            "evil_high": vec.with_meta(monitor={"threshold": 1e6})}


@pytest.fixture(scope="module")
def server(model: pv.Model, vectors: dict[str, pv.PersonaVector],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    log = tmp_path_factory.mktemp("serve") / "requests.jsonl"
    settings = ServeSettings(api_key=KEY, max_queue=8, max_request_bytes=16_000, max_tokens_limit=32, log_path=log,
                             steered_models={"evil-strong": [{"vector": "evil", "coef": COEF}]})
    with running(create_app(model, vectors, settings)) as url:
        yield {"url": url, "log": log, "client": openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=300)}


def chat(srv: dict[str, Any], model: pv.Model, messages: list[dict[str, str]], max_tokens: int = 12,
         **extra: Any) -> Any:
    return srv["client"].chat.completions.create(model=model.model_id, messages=messages, max_tokens=max_tokens,
                                                 temperature=0, extra_body=extra or None)


_memo: dict[str, Any] = {}


def plain(srv: dict[str, Any], model: pv.Model) -> Any:
    """The unsteered greedy answer to PLAIN, computed once and shared by the tests that compare with it."""
    if "plain" not in _memo:
        _memo["plain"] = chat(srv, model, PLAIN)
    return _memo["plain"]


def test_models_endpoint(server: dict[str, Any], model: pv.Model, vectors: dict[str, pv.PersonaVector]) -> None:
    listed = server["client"].models.list().data
    assert [m.id for m in listed] == [model.model_id, "evil-strong"]
    card = listed[0].model_extra["persona_vectors"]
    assert card["evil"]["layer"] == vectors["evil"].layer and card["evil_calibrated"]["layer"] == 10
    assert server["client"].models.retrieve(model.model_id).id == model.model_id
    steered = server["client"].models.retrieve("evil-strong").model_extra
    assert steered["root"] == model.model_id and steered["steer"] == [
        {"vector": "evil", "layer": vectors["evil"].layer, "coef": COEF, "positions": "response"}]


def test_plain_completion_is_monitored(server: dict[str, Any], model: pv.Model,
                                       vectors: dict[str, pv.PersonaVector]) -> None:
    r = plain(server, model)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and text and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens == len(model.encode_chat(PLAIN))
    persona = r.model_extra["persona"]
    assert set(persona) == {"evil", "evil_calibrated", "evil_response", "evil_high"}
    for reading in persona.values():
        assert math.isfinite(reading["prompt_projection"]) and math.isfinite(reading["response_projection"])
    assert persona["evil"]["flagged"] is None and persona["evil"]["threshold"] is None  # not calibrated
    assert persona["evil_calibrated"]["flagged"] is True and persona["evil_calibrated"]["layer"] == 10
    assert persona["evil_response"]["flagged"] is True and persona["evil_response"]["threshold"] == 1e6
    assert persona["evil_high"]["flagged"] is False
    # the same readings computed directly with the projection API (cache-free forwards, no server)
    prompt_ids = model.encode_chat(PLAIN)
    layers = {name: reading["layer"] for name, reading in persona.items()}
    before = project(model, [Sample(prompt_ids, [])], vectors, layers=layers, positions=("last_prompt",))
    response_ids = model.tokenizer.encode(text, add_special_tokens=False)
    after = project(model, [Sample(prompt_ids, response_ids)], vectors, layers=layers, positions=("response",))
    # bf16 on this CPU: the server's cached forwards and project's cache-free ones may round differently
    # (seen: 0.9 on a reading of -25); activation norms are ~250-300 at these layers, so 2.0 is < 1% of them
    for name in vectors:
        assert persona[name]["prompt_projection"] == pytest.approx(float(before[name]["last_prompt"][0]), abs=2.0)
        if len(response_ids) == r.usage.completion_tokens:  # the text re-tokenizes to the generated tokens
            assert persona[name]["response_projection"] == pytest.approx(float(after[name]["response"][0]), abs=2.0)


def test_stream_matches_plain(server: dict[str, Any], model: pv.Model) -> None:
    """Without `stream_options.include_usage` no chunk carries usage and every chunk has a choice (as
    OpenAI streams); the finish chunk carries persona and steer."""
    r = plain(server, model)
    stream = server["client"].chat.completions.create(model=model.model_id, messages=PLAIN, max_tokens=12,
                                                      temperature=0, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(len(c.choices) == 1 and "usage" not in c.model_fields_set for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [r.choices[0].finish_reason]
    final = chunks[-1]
    assert final.choices[0].finish_reason and final.model_extra["persona"] == r.model_extra["persona"]
    assert final.model_extra["steer"] == []


def test_stream_include_usage(server: dict[str, Any], model: pv.Model) -> None:
    """With include_usage every chunk has "usage": null except one last chunk with no choices and the
    usage of the whole answer; the same for /v1/completions."""
    r = plain(server, model)
    chunks = list(server["client"].chat.completions.create(
        model=model.model_id, messages=PLAIN, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    *body, last = chunks
    assert all(c.choices and "usage" in c.model_fields_set and c.usage is None for c in body)
    assert last.choices == [] and last.usage == r.usage
    assert "".join(c.choices[0].delta.content or "" for c in body) == r.choices[0].message.content
    # legacy completions, streamed with and without usage
    kwargs: dict[str, Any] = {"model": model.model_id, "prompt": "Once upon a time", "max_tokens": 6,
                              "temperature": 0}
    whole = server["client"].completions.create(**kwargs)
    for include in (False, True):
        chunks = list(server["client"].completions.create(**kwargs, stream=True,
                                                          stream_options={"include_usage": include}))
        assert all(c.object == "text_completion" for c in chunks)
        with_choices = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].text for c in with_choices) == whole.choices[0].text
        assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        if include:
            assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
            assert all(c.usage is None for c in chunks[:-1])
        else:
            assert len(with_choices) == len(chunks) and all("usage" not in c.model_fields_set for c in chunks)
    # without stream_options at all: no usage chunk either
    assert all(c.choices for c in server["client"].completions.create(**kwargs, stream=True))


def test_steering_changes_the_answer_and_does_not_leak(server: dict[str, Any], model: pv.Model,
                                                        vectors: dict[str, pv.PersonaVector]) -> None:
    base = plain(server, model)
    steer = [{"vector": "evil", "coef": COEF}]
    a = chat(server, model, PLAIN, steer=steer)
    b = chat(server, model, PLAIN, steer=steer)
    assert a.choices[0].message.content != base.choices[0].message.content
    assert a.choices[0].message.content == b.choices[0].message.content  # greedy: the same request, same answer
    assert a.model_extra["steer"] == [{"vector": "evil", "layer": vectors["evil"].layer, "coef": COEF,
                                       "positions": "response"}]
    # steering the reading layer moves the response reading along the vector
    assert a.model_extra["persona"]["evil"]["response_projection"] > base.model_extra["persona"]["evil"][
        "response_projection"]
    # an explicit layer is honoured, and afterwards the unsteered answer is what it was
    c = chat(server, model, PLAIN, steer=[{"vector": "evil", "coef": COEF, "layer": 12}])
    assert c.model_extra["steer"][0]["layer"] == 12
    assert chat(server, model, PLAIN).choices[0].message.content == base.choices[0].message.content


def test_concurrent_steered_and_unsteered_requests_stay_isolated(server: dict[str, Any], model: pv.Model) -> None:
    """Concurrent requests run as rows of one batch, each with its own steering (test_serve_batching.py
    checks a batch token for token in float32). On the session model: each answer's prefill is its own
    (first token, its logprob and the prompt readings equal the request alone); the later tokens equal
    the request alone in float32 and, in bfloat16, agree within 0.25 nats along the tokens both answers
    share (a batched step rounds differently from a one-row step, so a near tie may turn)."""
    steer = [{"vector": "evil", "coef": COEF}]

    def ask(messages: list[dict[str, str]], terms: list[dict[str, Any]] | None) -> Any:
        return server["client"].chat.completions.create(
            model=model.model_id, messages=messages, max_tokens=12, temperature=0, logprobs=True,
            extra_body={"steer": terms} if terms else None)

    specs = {"plain": (PLAIN, None), "other": (OTHER, None), "steered": (PLAIN, steer)}
    alone = {kind: ask(*spec) for kind, spec in specs.items()}
    kinds = ["plain", "steered", "other", "steered", "plain", "other"]
    with ThreadPoolExecutor(len(kinds)) as pool:
        answers = [(kind, f.result()) for kind, f in [(k, pool.submit(ask, *specs[k])) for k in kinds]]
    for kind, r in answers:
        got, want = r.choices[0].logprobs.content, alone[kind].choices[0].logprobs.content
        assert (got[0].token, got[0].logprob) == (want[0].token, want[0].logprob), kind
        for name, reading in r.model_extra["persona"].items():
            assert reading["prompt_projection"] == alone[kind].model_extra["persona"][name]["prompt_projection"]
        if model.dtype == torch.float32:
            assert r.choices[0].message.content == alone[kind].choices[0].message.content, kind
        for a, b in zip(got, want, strict=False):
            if a.token != b.token:
                break
            assert abs(a.logprob - b.logprob) <= 0.25, kind
    texts = {kind: r.choices[0].message.content for kind, r in answers}
    assert texts["steered"] != texts["plain"]


def _post(server: dict[str, Any], body: Any, *, raw: bytes | None = None, key: str | None = KEY) -> httpx.Response:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server["url"] + "/chat/completions", content=content, headers=headers, timeout=60)


def _assert_openai_error(resp: httpx.Response, status: int, needle: str, *, param: str | None = None,
                         code: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err
    if status == 400:
        assert err["type"] == "invalid_request_error", err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize(("change", "needle"), [
    ({"steer": [{"vector": "nope", "coef": 1}]}, "unknown vector 'nope'"),
    ({"steer": [{"vector": "evil", "coef": "big"}]}, "steer.0.coef"),
    ({"steer": [{"vector": "evil", "coef": 1, "layer": 0}]}, "out of range 1..30"),
    ({"steer": [{"vector": "evil", "coef": 1, "layer": 31}]}, "out of range 1..30"),
    ({"steer": [{"vector": "evil", "coeff": 1}]}, "steer.0"),
    ({"steer": {"vector": "evil"}}, "steer"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": "hello"}, "messages"),
    ({"n": 2}, "n must be 1"),
    ({"max_tokens": 33}, "more than this server allows (32)"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_malformed_requests_get_400(server: dict[str, Any], model: pv.Model, change: dict[str, Any],
                                    needle: str) -> None:
    body = {"model": model.model_id, "messages": PLAIN, "max_tokens": 4} | change
    _assert_openai_error(_post(server, body), 400, needle)


# fields this server cannot honour: refused with the parameter named, never silently ignored
UNSUPPORTED_CHAT = [
    ({"n": 2}, "n", "unsupported_value"),
    ({"response_format": {"type": "json_object"}}, "response_format.type", "unsupported_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.type", "unsupported_value"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_value"),
    ({"tool_choice": "auto"}, "tool_choice", "unsupported_value"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_value"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "unsupported_value"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_value"),
    ({"frequency_penalty": -1}, "frequency_penalty", "unsupported_value"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "unsupported_value"),
    ({"top_logprobs": 3}, "top_logprobs", "unsupported_value"),
    ({"logprobs": True, "stream": True}, "logprobs", "unsupported_value"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "unsupported_value"),
    ({"stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra",
     "unsupported_parameter"),
    ({"top_k": 5}, "top_k", "unsupported_parameter"),  # a vLLM sampling extension this server does not have
    ({"guided_json": {}}, "guided_json", "unsupported_parameter"),
    ({"prompt": "hi"}, "prompt", "unsupported_parameter"),
]


@pytest.mark.parametrize(("change", "param", "code"), UNSUPPORTED_CHAT)
def test_unsupported_chat_fields_get_400(server: dict[str, Any], model: pv.Model, change: dict[str, Any],
                                         param: str, code: str) -> None:
    body = {"model": model.model_id, "messages": PLAIN, "max_tokens": 4} | change
    needle = "Unrecognized request argument supplied" if code == "unsupported_parameter" and "." not in param \
        else param
    _assert_openai_error(_post(server, body), 400, needle, param=param, code=code)


def test_accepted_no_op_fields_and_the_official_client(server: dict[str, Any], model: pv.Model) -> None:
    """Fields that change nothing about the answer are accepted; the official client maps the 400s of
    unsupported ones to BadRequestError with the parameter named."""
    client = server["client"]
    r = client.chat.completions.create(model=model.model_id, messages=OTHER, max_tokens=2, temperature=0,
                                       user="u1", metadata={"a": "b"}, store=False, n=1, presence_penalty=0,
                                       frequency_penalty=0, response_format={"type": "text"}, tool_choice="none",
                                       parallel_tool_calls=False, logit_bias={})
    assert r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model.model_id, messages=OTHER, max_tokens=2,
                                       response_format={"type": "json_object"})
    assert info.value.body["param"] == "response_format.type" and info.value.body["code"] == "unsupported_value"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=model.model_id, prompt="Hi", max_tokens=2, n=3)


UNSUPPORTED_COMPLETIONS = [
    ({"n": 2}, "n", "unsupported_value"),
    ({"best_of": 3}, "best_of", "unsupported_value"),
    ({"suffix": " and so on"}, "suffix", "unsupported_value"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_value"),
    ({"presence_penalty": 1}, "presence_penalty", "unsupported_value"),
    ({"max_tokens": 0}, "max_tokens", "unsupported_value"),  # 0 only with echo (it scores the prompt)
    ({"echo": True, "stream": True}, "stream", "unsupported_value"),
    ({"logprobs": 2, "stream": True}, "stream", "unsupported_value"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "unsupported_value"),
    ({"messages": PLAIN}, "messages", "unsupported_parameter"),
    ({"logprobs": 21}, "logprobs", None),
    ({"logprobs": -1}, "logprobs", None),
    ({"max_tokens": -1}, "max_tokens", None),
    ({"max_tokens": 33}, "max_tokens", None),
    ({"prompt": []}, "prompt", None),
    ({"prompt": ["hello", ""]}, "prompt", None),
    ({"prompt": [[1, 2], []]}, "prompt", None),
    ({"prompt": [1, 999_999]}, "prompt", None),
    ({"prompt": [1, -2]}, "prompt", None),
    ({"prompt": [1, "a"]}, "prompt", None),
    ({"steer": [{"vector": "nope", "coef": 1}]}, "steer.0.vector", "unknown_vector"),
    # steering only from the last prompt token on would leave every echoed prompt logprob unsteered
    ({"echo": True, "logprobs": 1, "max_tokens": 0, "steer": [{"vector": "evil", "coef": 1}]}, "steer",
     "unsupported_value"),
    ({"model": "evil-strong", "echo": True, "logprobs": 1, "max_tokens": 1}, "steer", "unsupported_value"),
]


@pytest.mark.parametrize(("change", "param", "code"), UNSUPPORTED_COMPLETIONS)
def test_bad_completions_get_400(server: dict[str, Any], model: pv.Model, change: dict[str, Any],
                                 param: str, code: str | None) -> None:
    body = {"model": model.model_id, "prompt": "Hello", "max_tokens": 4} | change
    resp = httpx.post(server["url"] + "/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=60)
    _assert_openai_error(resp, 400, "", param=param, code=code)


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server: dict[str, Any], model: pv.Model) -> None:
    body = {"model": model.model_id, "messages": PLAIN, "max_tokens": 4}
    # non-finite coefficient (Python's json writes NaN; the openai client refuses to send it)
    nan = json.dumps(body | {"steer": [{"vector": "evil", "coef": float("nan")}]}).encode()
    _assert_openai_error(_post(server, None, raw=nan), 400, "steer.0.coef")
    inf = json.dumps(body | {"steer": [{"vector": "evil", "coef": float("inf")}]}).encode()
    _assert_openai_error(_post(server, None, raw=inf), 400, "steer.0.coef")
    _assert_openai_error(_post(server, None, raw=b'{"model": "x", "messages": ['), 400, "not valid JSON")
    _assert_openai_error(_post(server, [1, 2]), 400, "JSON object")
    _assert_openai_error(_post(server, body | {"model": "gpt-4o"}), 404, "'gpt-4o' is not served here")
    # auth: missing and wrong keys, on completions and on /models
    _assert_openai_error(_post(server, body, key=None), 401, "API key")
    _assert_openai_error(_post(server, body, key="wrong"), 401, "API key")
    assert httpx.get(server["url"] + "/models", timeout=30).status_code == 401
    # size: a declared Content-Length over the limit, and a chunked body that only grows past it
    big = body | {"messages": [{"role": "user", "content": "x" * 20_000}]}
    _assert_openai_error(_post(server, big), 413, "larger than this server's limit of 16000 bytes")
    chunks = (b'{"pad": "' + b"y" * 1000 for _ in range(20))
    resp = httpx.post(server["url"] + "/chat/completions", content=chunks, timeout=60,
                      headers={"authorization": f"Bearer {KEY}"})
    _assert_openai_error(resp, 413, "larger than")
    # the official client maps them to its exception classes
    client = server["client"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"], api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=PLAIN, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="unknown vector"):
        client.chat.completions.create(model=model.model_id, messages=PLAIN, max_tokens=4,
                                       extra_body={"steer": [{"vector": "kind", "coef": 1}]})
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model.model_id, messages=[{"role": "user", "content": "z" * 20_000}])
    assert info.value.status_code == 413
    # and it still answers
    r = client.chat.completions.create(model=model.model_id, messages=OTHER, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(server["url"].removesuffix("/v1") + "/health").json()["in_flight"] == 0


def test_log_has_readings_but_no_text(server: dict[str, Any], model: pv.Model) -> None:
    plain(server, model)
    text = server["log"].read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert rows and all({"id", "time", "usage", "persona", "steer", "finish_reason", "flagged"} <= set(r)
                        for r in rows)
    assert MARKER not in text and "messages" not in rows[0] and "completion" not in rows[0]
    assert any(r["steer"] for r in rows) and any(r["flagged"] == ["evil_calibrated", "evil_response"] for r in rows)


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(model: pv.Model, tmp_path: Path,
                                                                vectors: dict[str, pv.PersonaVector]) -> None:
    """One slot (a batch of one), no waiting room: while a stream runs, the next request gets 429 at once;
    dropping the stream mid-way cancels it (the log says so) and frees the slot. This server also logs prompt
    text. (With larger batches: test_serve_batching.py.)"""
    log = tmp_path / "requests.jsonl"
    settings = ServeSettings(max_queue=0, max_batch_size=1, max_tokens_limit=256, log_path=log, log_prompts=True)
    with running(create_app(model, vectors, settings)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        health = url.removesuffix("/v1") + "/health"
        stream = client.chat.completions.create(model=model.model_id, messages=PLAIN, max_tokens=256, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        while not (next(it).choices[0].delta.content or ""):
            pass  # the request is now generating: it holds the only slot for about 250 more tokens
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=model.model_id, messages=OTHER, max_tokens=2, temperature=0)
        assert info.value.status_code == 429 and info.value.body["code"] == "queue_full"
        stream.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 120
        while httpx.get(health).json()["in_flight"]:
            assert time.monotonic() < deadline, "a dropped stream kept its slot"
            time.sleep(0.05)
        r = client.chat.completions.create(model=model.model_id, messages=OTHER, max_tokens=2, temperature=0)
        assert r.choices[0].message.content
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows[0]["finish_reason"] == "cancelled" and rows[0]["usage"]["completion_tokens"] < 256
    assert MARKER in rows[0]["messages"][0]["content"] and rows[1]["completion"] == r.choices[0].message.content


def test_stop_strings_and_sampling(server: dict[str, Any], model: pv.Model) -> None:
    base = plain(server, model).choices[0].message.content
    words = base.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = server["client"].chat.completions.create(model=model.model_id, messages=PLAIN, max_tokens=12,
                                                   temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == base[:base.index(stop)]
    kwargs: dict[str, Any] = {"model": model.model_id, "messages": OTHER, "max_tokens": 6, "temperature": 1.0,
                              "top_p": 0.9}
    s1 = server["client"].chat.completions.create(seed=5, **kwargs).choices[0].message.content
    s2 = server["client"].chat.completions.create(seed=5, **kwargs).choices[0].message.content
    assert s1 == s2  # a seed makes sampling reproducible


TEXT = "The capital of France is Paris, and the capital of Italy is Rome."


def per_token_logprobs(model: pv.Model, ids: list[int]) -> list[float]:
    """log p(ids[k] | ids[:k]) for k = 1..n-1 from the project's own likelihood (`response_logprobs`), each
    as the difference of two suffix sums so every number comes from a forward over the whole sequence."""
    n = len(ids)
    means = response_logprobs(model, [Sample(ids[:k], ids[k:]) for k in range(1, n)], batch_size=1)
    sums = [float(m or 0.0) * (n - k) for k, m in zip(range(1, n), means, strict=True)] + [0.0]
    return [sums[i] - sums[i + 1] for i in range(n - 1)]


def test_completions_echo_logprobs_equal_the_projects_likelihood(server: dict[str, Any], model: pv.Model,
                                                                 vectors: dict[str, pv.PersonaVector]) -> None:
    """The scoring request (echo, max_tokens 0, logprobs 1) through the official client: OpenAI's legacy
    logprobs object, whose numbers are the project's likelihood of the same tokens, unsteered and steered
    at every position (the same hooks, the same positions)."""
    client = server["client"]
    ids = model.tokenizer(TEXT).input_ids
    r = client.completions.create(model=model.model_id, prompt=TEXT, echo=True, max_tokens=0, logprobs=1)
    (choice,) = r.choices
    lp = choice.logprobs
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert choice.text == TEXT and choice.finish_reason == "length" and choice.index == 0
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == TEXT and lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    unsteered = per_token_logprobs(model, ids)
    assert lp.token_logprobs[1:] == pytest.approx(unsteered, abs=1e-4)
    for tok, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert top[tok] == value and 1 <= len(top) <= 2 and max(top.values()) >= value  # top-1, and the token
    assert math.isfinite(choice.model_extra["persona"]["evil"]["prompt_projection"])
    # steered: the server's numbers are the likelihood under pv.steer at the same layer and positions
    vec, layer = vectors["evil"], vectors["evil"].layer
    s = client.completions.create(model=model.model_id, prompt=TEXT, echo=True, max_tokens=0, logprobs=1,
                                  extra_body={"steer": [{"vector": "evil", "coef": COEF, "positions": "all"}]})
    with pv.steer(model, {layer: vec.at(layer)}, coef=COEF, positions="all"):
        steered = per_token_logprobs(model, ids)
    assert s.choices[0].logprobs.token_logprobs[1:] == pytest.approx(steered, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(steered, unsteered, strict=True)) > 0.1
    assert s.model_extra["steer"] == [{"vector": "evil", "layer": layer, "coef": COEF, "positions": "all"}]
    # "prompt" positions cover every echoed token too
    p = client.completions.create(model=model.model_id, prompt=TEXT, echo=True, max_tokens=0, logprobs=1,
                                  extra_body={"steer": [{"vector": "evil", "coef": COEF, "positions": "prompt"}]})
    assert p.choices[0].logprobs.token_logprobs[1:] == pytest.approx(steered, abs=1e-4)


def test_completions_token_prompts_batches_and_generation(server: dict[str, Any], model: pv.Model) -> None:
    """lm-evaluation-harness's request shape (token ids, echo, max_tokens 1, logprobs 1, seed), a list of
    prompts answered as indexed choices, and plain greedy generation equal to `generate` in transformers."""
    ids = model.tokenizer(TEXT).input_ids
    alone = server["client"].completions.create(model=model.model_id, prompt=ids[:6], echo=True, max_tokens=0,
                                                logprobs=3)
    body = {"model": model.model_id, "prompt": [ids, ids[:6]], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    resp = httpx.post(server["url"] + "/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=60)
    assert resp.status_code == 200, resp.text
    r = resp.json()
    a, b = r["choices"]
    assert (a["index"], b["index"]) == (0, 1) and r["usage"] == {"prompt_tokens": len(ids) + 6,
                                                                 "completion_tokens": 2, "total_tokens": len(ids) + 8}
    full = a["logprobs"]
    assert len(full["token_logprobs"]) == len(ids) + 1  # the prompt's tokens, then the one generated token
    assert full["token_logprobs"][1:len(ids)] == pytest.approx(per_token_logprobs(model, ids), abs=1e-4)
    assert a["text"] == model.tokenizer.decode(ids) + full["tokens"][-1]
    greedy = full["top_logprobs"][-1]  # temperature 0: the generated token is the most likely one
    assert full["tokens"][-1] in greedy and full["token_logprobs"][-1] == max(greedy.values())
    assert b["logprobs"]["token_logprobs"][:6] == alone.choices[0].logprobs.token_logprobs
    assert all(len(t) <= 4 for t in alone.choices[0].logprobs.top_logprobs[1:])  # top-3 and the token
    # when the one generated token is the end token, it is still listed (its text is not), as vLLM and
    # OpenAI do: lm-eval takes everything before the last listed token as the prompt's logprobs
    ended = "Question: What should you do with a lost wallet?\nAnswer: Return it to its owner."
    e = server["client"].completions.create(model=model.model_id, prompt=ended, echo=True, max_tokens=1,
                                            logprobs=1, temperature=0)
    n = len(model.tokenizer(ended).input_ids)
    assert e.choices[0].finish_reason == "stop" and e.choices[0].text == ended
    assert len(e.choices[0].logprobs.token_logprobs) == n + 1
    assert e.choices[0].logprobs.tokens[-1] in {model.tokenizer.decode([t]) for t in _stop_ids(model)}
    # plain generation: the greedy continuation transformers' generate finds
    prompt = "Once upon a time"
    g = server["client"].completions.create(model=model.model_id, prompt=prompt, max_tokens=8, temperature=0,
                                            logprobs=0)
    pids = model.tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    ref = model.hf.generate(pids, attention_mask=pids.new_ones(pids.shape), max_new_tokens=8, do_sample=False,
                            pad_token_id=model.tokenizer.pad_token_id)[0, pids.shape[1]:]
    assert g.choices[0].text == model.tokenizer.decode(ref, skip_special_tokens=True)
    assert g.usage.completion_tokens == 8 and len(g.choices[0].logprobs.tokens) == 8
    assert g.choices[0].logprobs.text_offset[0] == len(prompt)  # offsets count from the prompt's start
    # a seed makes sampled completions reproducible; stop strings cut the text
    kwargs: dict[str, Any] = {"model": model.model_id, "prompt": prompt, "max_tokens": 6, "temperature": 1.0}
    assert (server["client"].completions.create(seed=3, **kwargs).choices[0].text
            == server["client"].completions.create(seed=3, **kwargs).choices[0].text)
    words = g.choices[0].text.split()
    cut = server["client"].completions.create(model=model.model_id, prompt=prompt, max_tokens=8, temperature=0,
                                              stop=[" " + words[1]])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == g.choices[0].text[
        :g.choices[0].text.index(" " + words[1])]


def test_steered_model_name_and_chat_logprobs(server: dict[str, Any], model: pv.Model) -> None:
    """A steered model name steers like the same `steer` in the request; chat logprobs come in OpenAI's
    chat shape."""
    client = server["client"]
    by_name = client.chat.completions.create(model="evil-strong", messages=PLAIN, max_tokens=12, temperature=0)
    by_field = chat(server, model, PLAIN, steer=[{"vector": "evil", "coef": COEF}])
    assert by_name.model == "evil-strong" and by_name.model_extra["steer"] == by_field.model_extra["steer"]
    assert by_name.choices[0].message.content == by_field.choices[0].message.content
    r = client.chat.completions.create(model=model.model_id, messages=OTHER, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        tops = {a.token: a.logprob for a in t.top_logprobs}
        assert len(tops) == 3 and list(tops.values()) == sorted(tops.values(), reverse=True)
        assert tops[t.token] == t.logprob == max(tops.values())  # greedy: a most likely token (bf16 ties happen)
        assert bytes(t.bytes or []) == t.token.encode()


def test_steered_model_specs(model: pv.Model, vectors: dict[str, pv.PersonaVector]) -> None:
    """The NAME=VECTOR:COEF[:LAYER][:POSITIONS] form a command line passes, and what the app refuses at start."""
    name, terms = parse_steered_model("mix=evil:4:18:all,evil_high:-2")
    assert name == "mix" and [t.model_dump() for t in terms] == [
        {"vector": "evil", "coef": 4.0, "layer": 18, "positions": "all"},
        {"vector": "evil_high", "coef": -2.0, "layer": None, "positions": "response"}]
    for bad, needle in [("x", "NAME="), ("a=evil", "VECTOR:COEF"), ("a=evil:x", "coef"),
                        ("a=evil:1:all:prompt", "positions twice"), ("a=evil:1:up", "positions")]:
        with pytest.raises(ValueError, match=needle):
            parse_steered_model(bad)
    for steered, needle in [({"s": [{"vector": "kind", "coef": 1}]}, "unknown vector 'kind'"),
                            ({"s": [{"vector": "evil", "coef": 1, "layer": 99}]}, "out of range"),
                            ({model.model_id: [{"vector": "evil", "coef": 1}]}, "must differ"),
                            ({"s": [{"vector": "evil", "coeff": 1}]}, "coeff")]:
        with pytest.raises(VectorError, match=needle):
            create_app(model, vectors, ServeSettings(steered_models=steered))


def test_cli_serve(evil_vector: pv.PersonaVector, tmp_path: Path) -> None:
    """The real command in a subprocess: bad vector file → one error line and exit 2; then a served
    model answers /v1/models with the key from the environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "personavec.cli", "serve"]
    bad = subprocess.run([*cmd, "--vector", str(tmp_path / "missing.pv.safetensors")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    path = evil_vector.save(tmp_path / "evil.pv.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*cmd, "--vector", str(path), "--port", str(port), "--log", str(tmp_path / "log.jsonl")],
                            env=env | {"PERSONAVEC_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                httpx.get(url.removesuffix("/v1") + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "personavec serve did not start"
                time.sleep(0.5)
        listed = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).models.list().data
        assert listed[0].model_extra["persona_vectors"]["evil"]["layer"] == evil_vector.layer
        assert httpx.get(url + "/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
