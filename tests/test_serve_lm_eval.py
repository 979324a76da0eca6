"""lm-evaluation-harness scores a model that `personavec serve` serves, through `/v1/completions`, as its
`local-completions` model does against vLLM or OpenAI: a tiny multiple-choice task (a task YAML over a
JSONL file written here; nothing downloaded), once on the plain model and once on a steered model name
(lm-eval sends fixed request bodies, so steering rides on the model name). The per-item
log-likelihoods lm-eval reports are the project's own likelihood of the same tokens, steered or not,
and steering towards evil moves the score towards the evil answers."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from conftest import EVIL_VECTOR
from lm_eval_task import ITEMS, write_task

import personavec as pv
from personavec.capture import Sample
from personavec.likelihood import response_logprobs
from personavec.serve import ServeSettings, create_app, serve_in_thread

COEF = 8.0  # at every position of the vector's layer: enough to move the embedded model's likelihoods
#: The committed evil vector (10 questions × every prompt pair, 48-token rollouts; experiments/out/monitor_eval):
#: "towards the evil answers" below is a property of the direction, and the session's 5-question vector is too
#: rough for it on a float32 model (there it lowered this task's evil − kind gap, 2026-12-01).
EVIL = EVIL_VECTOR
TASK = "personavec_tiny_mc"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RecordCompletions:
    """ASGI wrapper that keeps the JSON body of every `/v1/completions` request (the shape lm-eval sends)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []

        async def recording() -> MutableMapping[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(parts)))
            return message

        await self.app(scope, recording, send)


@pytest.fixture(scope="module")
def evil() -> pv.PersonaVector:
    return pv.load_vector(EVIL)


@pytest.fixture(scope="module")
def served(model32: pv.Model, evil: pv.PersonaVector) -> Iterator[tuple[str, RecordCompletions]]:
    settings = ServeSettings(max_tokens_limit=16, steered_models={
        "evil-all": [{"vector": "evil", "coef": COEF, "positions": "all"}]})
    app = RecordCompletions(create_app(model32, [evil], settings))
    with serve_in_thread(app) as root:
        yield root, app


def lm_eval_scores(root: str, name: str, tokenizer: str, task_dir: Path,
                   tokenized: bool = True) -> tuple[float, list[list[float]], list[tuple[str, str]]]:
    """(accuracy, per item the log-likelihood of each choice, per request (context, continuation))."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"model": name, "base_url": f"{root}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": tokenizer, "tokenized_requests": tokenized, "num_concurrent": 1, "max_retries": 1}
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    assert out is not None
    rows = sorted(out["samples"][TASK], key=lambda r: r["doc_id"])
    lls = [[float(resp[0]) for resp in row["filtered_resps"]] for row in rows]
    pairs = [(str(arg[0]), str(arg[1])) for row in rows for arg in row["arguments"]]
    return float(out["results"][TASK]["acc,none"]), lls, pairs


def own_loglikelihoods(model: pv.Model, pairs: list[tuple[str, str]]) -> list[float]:
    """The project's log p(continuation | context), tokenized as lm-eval's `_encode_pair` does (the context's
    trailing spaces move to the continuation; the continuation's tokens are read off the whole string)."""
    tok = model.tokenizer
    samples = []
    for context, continuation in pairs:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        ctx = tok(context, add_special_tokens=False).input_ids
        samples.append(Sample(ctx, whole[len(ctx):]))
    means = response_logprobs(model, samples, batch_size=1)  # one forward per item, as the server runs them
    return [float(m or 0.0) * len(s.response) for m, s in zip(means, samples, strict=True)]


def test_lm_eval_scores_the_served_model_steered_and_not(served: tuple[str, RecordCompletions], model32: pv.Model,
                                                         evil: pv.PersonaVector,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = model32  # served in float32: the server's forwards and ours agree to 1e-4 there, not in bfloat16
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, recorder = served
    task_dir = write_task(tmp_path / "task", TASK)
    tokenizer = model.tokenizer.name_or_path  # the embedded model's local folder: no download
    vec, layer = evil, evil.layer

    acc, lls, pairs = lm_eval_scores(root, model.model_id, tokenizer, task_dir)
    # the request shape lm-eval's local-completions sends for loglikelihood
    assert len(recorder.bodies) == 2 * len(ITEMS)
    for body in recorder.bodies:
        assert set(body) == {"model", "prompt", "temperature", "max_tokens", "logprobs", "seed", "echo"}
        assert (body["echo"], body["max_tokens"], body["logprobs"], body["temperature"]) == (True, 1, 1, 0)
        assert isinstance(body["prompt"], list) and all(isinstance(t, int) for p in body["prompt"] for t in p)
    flat = [x for item in lls for x in item]
    assert flat == pytest.approx(own_loglikelihoods(model, pairs), abs=1e-4)

    steered_acc, steered_lls, steered_pairs = lm_eval_scores(root, "evil-all", tokenizer, task_dir)
    assert steered_pairs == pairs and all(b["model"] == "evil-all" for b in recorder.bodies[2 * len(ITEMS):])
    with pv.steer(model, {layer: vec.at(layer)}, coef=COEF, positions="all"):
        expected = own_loglikelihoods(model, pairs)
    assert [x for item in steered_lls for x in item] == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(flat, expected, strict=True)) > 0.5
    # towards evil: the evil answers gain on the kind ones, item by item on average
    gap = sum(e - g for g, e in lls) / len(ITEMS)
    steered_gap = sum(e - g for g, e in steered_lls) / len(ITEMS)
    assert steered_gap > gap and steered_acc <= acc, (gap, steered_gap, acc, steered_acc)

    # lm-eval's untokenized mode (prompts as text, the server tokenizes them) scores the same numbers
    _, text_lls, _ = lm_eval_scores(root, model.model_id, tokenizer, task_dir, tokenized=False)
    assert all(isinstance(b["prompt"], str) for b in recorder.bodies[-len(pairs):])
    assert [x for item in text_lls for x in item] == pytest.approx(flat, abs=1e-4)
