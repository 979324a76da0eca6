"""`personavec serve` under hostile input keeps its promises: every bad request is a 400 in OpenAI's error
shape (never a 500, a hang or a 200 with nothing in it) and the server keeps serving; a bad address or an
empty API key ends the command with one `error:` line and status 2 before any model loads.

Requests go over real HTTP to the real app on the embedded model (as in test_serve.py); the command runs
in-process (as in test_cli_serve.py), with the model loader watched so a refusal is seen to come first."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from conftest import Cli, error_line

import personavec as pv
from personavec.cli import serve as cli_serve
from personavec.errors import PersonavecError, SteeringError, VectorError
from personavec.serve import Engine, Job, ServeSettings, create_app, serve_in_thread
from personavec.serve.deps import MAX_JSON_DEPTH
from personavec.serve.events import failure
from personavec.serve.schemas import MAX_SEED, MAX_STEER_TERMS

SEED_RANGE = f"seed must be an integer in 0..{MAX_SEED}"


def model_vector(model: pv.Model) -> pv.PersonaVector:
    """A seeded random vector of the embedded model (its provenance, so the server takes it), norm 4 at
    every layer."""
    t = torch.randn(model.n_layers + 1, model.hidden_size, generator=torch.Generator().manual_seed(0))
    t = 4 * t / t.norm(dim=1, keepdim=True)
    return pv.PersonaVector({"response": t}, {
        "trait": "evil", "model_id": model.model_id, "fingerprint": model.fingerprint,
        "n_layers": model.n_layers, "hidden_size": model.hidden_size, "best_layer": 18})


@pytest.fixture(scope="module")
def server(model: pv.Model) -> Iterator[str]:
    """The real app on a loopback port; yields the /v1 base URL."""
    app = create_app(model, [model_vector(model)], ServeSettings(max_tokens_limit=4, max_request_bytes=1 << 20))
    with serve_in_thread(app) as root:
        yield f"{root}/v1"


def chat_body(model: pv.Model, **change: Any) -> dict[str, Any]:
    return {"model": model.model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "temperature": 0} | change


def completion_body(model: pv.Model, **change: Any) -> dict[str, Any]:
    return {"model": model.model_id, "prompt": "Hi", "max_tokens": 1, "temperature": 0} | change


def post(url: str, endpoint: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{url}/{endpoint}", content=content, headers={"content-type": "application/json"},
                      timeout=120)


def assert_openai_error(resp: httpx.Response, needle: str, param: str | None) -> None:
    """A 400 in OpenAI's error shape whose message holds `needle` and names `param`."""
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "invalid_request_error" and needle in err["message"] and err["param"] == param, err


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


# ---- requests -----------------------------------------------------------------------------------------------
# (endpoint, body as JSON text from the model, needle, param); the bodies are raw text so that any nesting
# and any integer reach the server as written
HOSTILE: list[tuple[str, str, Any, str, str | None]] = [
    # seeds torch cannot take (its generators take 0..2**64-1; negatives would alias seed + 2**64)
    ("seed 2**70", "chat/completions", lambda m: chat_body(m, seed=2**70), SEED_RANGE, "seed"),
    ("seed 2**64", "chat/completions", lambda m: chat_body(m, seed=2**64), SEED_RANGE, "seed"),
    ("seed -5", "chat/completions", lambda m: chat_body(m, seed=-5), SEED_RANGE, "seed"),
    ("seed -2**63", "completions", lambda m: completion_body(m, seed=-2**63), SEED_RANGE, "seed"),
    ("seed 2**70 legacy", "completions", lambda m: completion_body(m, seed=2**70), SEED_RANGE, "seed"),
    ("seed 1e30", "chat/completions", lambda m: chat_body(m, seed=1e30), SEED_RANGE, "seed"),
    # nesting past the cap, anywhere in the body (raw text)
    ("100000 lists in metadata", "chat/completions",
     lambda m: json.dumps(chat_body(m))[:-1] + ', "metadata": {"a": ' + nested(100_000) + "}}",
     f"more than {MAX_JSON_DEPTH} deep", None),
    ("100000 objects", "chat/completions", lambda m: '{"a": ' * 100_000 + "1" + "}" * 100_000,
     f"more than {MAX_JSON_DEPTH} deep", None),
    ("100000 lists as the prompt", "completions",
     lambda m: f'{{"model": "{m.model_id}", "max_tokens": 1, "prompt": {nested(100_000)}}}',
     f"more than {MAX_JSON_DEPTH} deep", None),
    ("one past the cap", "chat/completions",
     lambda m: json.dumps(chat_body(m))[:-1] + ', "metadata": {"a": ' + nested(MAX_JSON_DEPTH - 1) + "}}",
     f"more than {MAX_JSON_DEPTH} deep", None),
    ("unclosed 100000 lists", "chat/completions", lambda m: "[" * 100_000, f"more than {MAX_JSON_DEPTH} deep", None),
    # more steering terms than the cap
    ("65 terms", "chat/completions",
     lambda m: chat_body(m, steer=[{"vector": "evil", "coef": 1}] * (MAX_STEER_TERMS + 1)),
     f"at most {MAX_STEER_TERMS} terms", "steer"),
    ("10000 terms", "completions", lambda m: completion_body(m, steer=[{"vector": "evil", "coef": 1}] * 10_000),
     f"at most {MAX_STEER_TERMS} terms", "steer"),
    # a coefficient whose product with the vector overflows the model's dtype, or whose squared norm does
    # (the next norm layer squares it): steering's own rule, checked before the request is queued
    ("coef 1e40", "chat/completions", lambda m: chat_body(m, steer=[{"vector": "evil", "coef": 1e40}]),
     "coefficient 1e+40 at layer 18 overflows", "steer.0.coef"),
    ("coef -1e300", "chat/completions",
     lambda m: chat_body(m, steer=[{"vector": "evil", "coef": 1}, {"vector": "evil", "coef": -1e300}]),
     "use a smaller coefficient", "steer.1.coef"),
    ("coef 1e25 (squared norm)", "completions",
     lambda m: completion_body(m, steer=[{"vector": "evil", "coef": 1e25, "layer": 3, "positions": "all"}]),
     "coefficient 1e+25 at layer 3 overflows", "steer.0.coef"),
]


@pytest.mark.parametrize(("endpoint", "body", "needle", "param"), [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_request_gets_400_in_openai_shape(server: str, model: pv.Model, endpoint: str, body: Any,
                                                  needle: str, param: str | None) -> None:
    made = body(model)
    text = made if isinstance(made, str) else json.dumps(made)
    assert_openai_error(post(server, endpoint, text.encode()), needle, param)


# the edges that stay inside the limits are served
ACCEPTED: list[tuple[str, str, Any]] = [
    ("seed 0", "chat/completions", lambda m: chat_body(m, seed=0, temperature=1)),
    ("seed 2**64-1", "completions", lambda m: completion_body(m, seed=MAX_SEED, temperature=1)),
    ("nesting at the cap", "chat/completions",
     lambda m: json.dumps(chat_body(m))[:-1] + ', "metadata": {"a": ' + nested(MAX_JSON_DEPTH - 2) + "}}"),
    ("brackets inside strings", "chat/completions",
     lambda m: chat_body(m, messages=[{"role": "user", "content": 'say \\" ' + "[{" * 200}])),
    (f"{MAX_STEER_TERMS} terms", "chat/completions",
     lambda m: chat_body(m, steer=[{"vector": "evil", "coef": 0.01}] * MAX_STEER_TERMS)),
    ("coef within the limit", "completions",
     lambda m: completion_body(m, steer=[{"vector": "evil", "coef": 4.0}])),
]


@pytest.mark.parametrize(("endpoint", "body"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_edges_inside_the_limits_are_served(server: str, model: pv.Model, endpoint: str, body: Any) -> None:
    made = body(model)
    resp = post(server, endpoint, (made if isinstance(made, str) else json.dumps(made)).encode())
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] <= 1


def test_server_still_serves_after_the_hostile_requests(server: str, model: pv.Model) -> None:
    resp = post(server, "chat/completions", json.dumps(chat_body(model, max_tokens=2, seed=7)).encode())
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"], resp.text
    assert httpx.get(server.removesuffix("/v1") + "/health", timeout=30).json()["in_flight"] == 0


# ---- start-up refusals in the library -------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "error", "needle"), [
    (lambda m: ServeSettings(api_key=""), PersonavecError, "api_key is empty"),
    (lambda m: ServeSettings(api_key="  "), PersonavecError, "api_key is empty"),
    (lambda m: create_app(m, [model_vector(m)], ServeSettings(steered_models={"big": [{"vector": "evil",
                                                                                      "coef": 1e40}]})),
     VectorError, "steered model 'big': coefficient 1e+40 at layer 18 overflows"),
])
def test_bad_settings_refused_at_start(model: pv.Model, make: Any, error: type[Exception], needle: str) -> None:
    with pytest.raises(error, match=needle.replace("+", r"\+")):
        make(model)


@pytest.mark.parametrize(("exc", "status"), [(SteeringError("coefficient overflows"), 400),
                                             (RuntimeError("a bug"), 500)])
def test_generation_failures_map_user_errors_to_400(exc: Exception, status: int) -> None:
    """A user's error the request checks let through is still a 400 with its message; a bug is a 500."""
    err = failure(exc)
    assert err.status == status and set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert ("coefficient overflows" in err.message) == (status == 400)


def test_a_job_that_cannot_start_fails_alone(model: pv.Model) -> None:
    """A job the worker cannot start (here a seed torch refuses, sent past the request checks) fails with
    its error and the worker goes on serving the next one, instead of dying and hanging every request."""
    engine = Engine(model, {})
    events: list[tuple[str, Any]] = []
    finished = threading.Event()

    def emit(event: tuple[str, Any]) -> None:
        if event[0] != "delta":
            events.append(event)
            finished.set()

    engine.start()
    try:
        for seed in (2**70, 3):
            finished.clear()
            assert engine.try_submit(Job(prompt=[1, 2, 3], max_tokens=1, seed=seed, emit=emit))
            assert finished.wait(120)
    finally:
        engine.stop()
    assert [kind for kind, _ in events] == ["error", "done"] and isinstance(events[0][1], ValueError)
    assert engine.in_flight == 0


# ---- the command: refused before the model loads ----------------------------------------------------------------
@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every call of the command's model loader (a refusal must come before it)."""
    calls: list[Any] = []
    monkeypatch.setattr(cli_serve, "load", lambda *a: calls.append(a))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append(("run", a, k)))
    return calls


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another server listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["--port", "70000"], {}, "port 70000 is out of range; pick a TCP port in 1..65535"),
    (["--port", "-1"], {}, "port -1 is out of range"),
    (["--port", "0"], {}, "port 0 is out of range"),
    (["--port", "BUSY"], {}, "Address already in use"),
    (["--port", "BUSY", "--host", "localhost"], {}, "Address already in use"),
    (["--host", "192.0.2.1"], {}, "cannot listen on 192.0.2.1:"),  # TEST-NET: never this machine's
    ([], {"PERSONAVEC_API_KEY": ""}, "PERSONAVEC_API_KEY is set but empty: set a key, or unset it"),
    ([], {"PERSONAVEC_API_KEY": "   "}, "PERSONAVEC_API_KEY is set but empty"),
    (["--api-key", ""], {}, "--api-key is empty"),
])
def test_cli_refuses_before_the_model_loads(cli: Cli, model: pv.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            no_load: list[Any], busy_port: int, args: list[str], env: dict[str, str],
                                            needle: str) -> None:
    path = model_vector(model).save(tmp_path / "evil.pv.safetensors")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [str(busy_port) if a == "BUSY" else a for a in args]
    start = time.monotonic()
    res = cli("serve", "--vector", str(path), *args, ok=False)
    elapsed = time.monotonic() - start
    line = error_line(res)
    assert needle in line and len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr
    assert no_load == [] and elapsed < 5, (no_load, elapsed)


@pytest.mark.parametrize(("env", "key"), [({"PERSONAVEC_API_KEY": "k-123"}, "k-123"), ({}, None)])
def test_cli_good_address_and_key_reach_the_server(cli: Cli, model: pv.Model, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                   key: str | None) -> None:
    path = model_vector(model).save(tmp_path / "evil.pv.safetensors")
    monkeypatch.delenv("PERSONAVEC_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ran: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: ran.append((a, k)))
    res = cli("serve", "--vector", str(path), "--port", str(port))
    ((app,), kwargs), = ran
    assert kwargs["port"] == port and app.state.serve.settings.api_key == key
    assert ("API key required" in res.output) == (key is not None)
