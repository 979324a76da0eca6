"""`personavec serve` as a client meets it: the real app on uvicorn on a loopback port, driven by the
official `openai` client (extra fields through `extra_body`) and by raw HTTP for bodies the client will
not send. Plain, streamed, steered and monitored completions; concurrent steered and unsteered requests
stay isolated; every bad input gets an OpenAI-style 4xx and the server keeps serving."""

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

import personavec as pv
from personavec.capture import Sample
from personavec.projection import project
from personavec.serve import ServeSettings, create_app, serve_in_thread

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
def vectors(evil_run: tuple[pv.PersonaVector, Path]) -> dict[str, pv.PersonaVector]:
    """The session's evil vector as is (no calibration), a copy calibrated by hand at another layer with a
    prompt threshold every reading crosses, and one whose only crossable threshold is the response one
    (the keys `monitor-eval` writes)."""
    vec, _ = evil_run
    return {"evil": vec, "evil_calibrated": vec.with_meta(monitor={"layer": 10, "threshold": -1e6}),
            "evil_response": vec.with_meta(monitor={"threshold": 1e6, "response_threshold": -1e6}),
            "evil_high": vec.with_meta(monitor={"threshold": 1e6})}


@pytest.fixture(scope="module")
def server(model: pv.Model, vectors: dict[str, pv.PersonaVector],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    log = tmp_path_factory.mktemp("serve") / "requests.jsonl"
    settings = ServeSettings(api_key=KEY, max_queue=8, max_request_bytes=16_000, max_tokens_limit=32, log_path=log)
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
    assert [m.id for m in listed] == [model.model_id]
    card = listed[0].model_extra["persona_vectors"]
    assert card["evil"]["layer"] == vectors["evil"].layer and card["evil_calibrated"]["layer"] == 10
    assert server["client"].models.retrieve(model.model_id).id == model.model_id


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
    r = plain(server, model)
    stream = server["client"].chat.completions.create(model=model.model_id, messages=PLAIN, max_tokens=12,
                                                      temperature=0, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        r.choices[0].finish_reason]
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == r.usage.completion_tokens
    assert final.model_extra["persona"] == r.model_extra["persona"]


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
    steer = [{"vector": "evil", "coef": COEF}]
    alone = {"plain": plain(server, model).choices[0].message.content,
             "other": chat(server, model, OTHER).choices[0].message.content,
             "steered": chat(server, model, PLAIN, steer=steer).choices[0].message.content}
    jobs = [("plain", PLAIN, None), ("steered", PLAIN, steer), ("other", OTHER, None), ("steered", PLAIN, steer),
            ("plain", PLAIN, None), ("other", OTHER, None)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [(kind, pool.submit(chat, server, model, msgs, 12, **({"steer": s} if s else {})))
                   for kind, msgs, s in jobs]
        answers = [(kind, f.result().choices[0].message.content) for kind, f in futures]
    for kind, text in answers:
        assert text == alone[kind], kind


def _post(server: dict[str, Any], body: Any, *, raw: bytes | None = None, key: str | None = KEY) -> httpx.Response:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server["url"] + "/chat/completions", content=content, headers=headers, timeout=60)


def _assert_openai_error(resp: httpx.Response, status: int, needle: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err


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
    """One slot, no waiting room: while a stream runs, the next request gets 429 at once; dropping the
    stream mid-way cancels it (the log says so) and frees the slot. This server also logs prompt text."""
    log = tmp_path / "requests.jsonl"
    settings = ServeSettings(max_queue=0, max_tokens_limit=256, log_path=log, log_prompts=True)
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


def test_cli_serve(evil_run: tuple[pv.PersonaVector, Path], tmp_path: Path) -> None:
    """The real command in a subprocess: bad vector file → one error line and exit 2; then a served
    model answers /v1/models with the key from the environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "personavec.cli", "serve"]
    bad = subprocess.run([*cmd, "--vector", str(tmp_path / "missing.pv.safetensors")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    path = evil_run[0].save(tmp_path / "evil.pv.safetensors")
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
        assert listed[0].model_extra["persona_vectors"]["evil"]["layer"] == evil_run[0].layer
        assert httpx.get(url + "/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
