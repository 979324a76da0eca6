"""The generation worker: one thread owns the model and runs admitted requests in one continuous batch.

Requests that wait are gathered into the running batch at every step (`batching.Batcher`): they are
prefilled together (left padding), their KV cache is merged into the batch's, and every running request
advances by one token per forward. Each row carries its own steering (`steering.RowSteering`: per-row
vectors, layers, coefficients and positions; a row without steering gets exactly zero added), its own
sampling and stops, and its own persona readings. Steering and reading hooks are on the decoder blocks only
during each forward, under a lock that every engine on the same model shares (kept in `model.extra`), so
two engines (or a library call) on one model never see each other's hooks.

Admission is bounded: at most `max_batch_size` requests run and `max_queue` more wait; beyond that
`try_submit` says no (the server answers 429) instead of letting the queue grow. A cancelled request
(client gone) stops at the next token and frees its slot.

Generation is a token-by-token loop with the KV cache (so answers can stream): steering positions follow
`steering`'s convention for cached generation ("response" = the last prompt position in the prefill,
then every generated token; "prompt" = every prompt position). A job that asks for the prompt's
logprobs (`/v1/completions` with `echo` and `logprobs`) gets them from its own prefill (alone, unpadded),
teacher-forced over the whole prompt, so they are what `likelihood.response_logprobs` computes for the same
tokens under the same steering. A job may also be a list of jobs (one request with several prompts): they
run as rows of the batch under one admission slot.

`Engine.run(job)` is the one-request reference: the same token loop for a single request, in the calling
thread, without batching. In float32 a batched request's tokens equal what `run` gives it (greedy)."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..generation import _stop_ids
from ..models import cache_kwarg, last_logits_kwargs, output_cache
from ..projection import watch
from ..steering import steer
from .batching import Batcher, Row
from .log import RequestLog
from .persona import PersonaMonitor

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector

log = logging.getLogger("personavec.serve")

Event = tuple[str, Any]  # ("delta", str) | ("done", Result) | ("error", Exception)
TokenLogprob = tuple[int, float | None, list[tuple[int, float]]]  # (token id, its logprob, top-k (id, logprob))
LOGPROB_ROWS = 256  # prompt positions turned into float log-softmax rows at once (bounds memory: rows × vocab)


@dataclass(frozen=True)
class SteerTerm:
    """A validated steering term of one request (layer L = output of decoder block L)."""

    vector: str
    layer: int
    coef: float
    positions: str
    direction: torch.Tensor = field(repr=False)

    def describe(self) -> dict[str, Any]:
        return {"vector": self.vector, "layer": self.layer, "coef": self.coef, "positions": self.positions}


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    steer: list[SteerTerm] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k most likely alternatives
    echo: bool = False  # with logprobs: also the prompt tokens' logprobs (the first token's is None)
    emit: Callable[[Event], None] = lambda _e: None  # called from the worker thread; must be thread-safe
    log_fields: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    persona: dict[str, dict[str, Any]]
    queue_s: float
    generate_s: float
    tokens: list[int] = field(default_factory=list)  # the generated token ids
    logprobs: list[TokenLogprob] | None = None  # per token: the prompt's (with echo), then the generated ones
    stop_logprob: TokenLogprob | None = None  # with logprobs: the end-of-turn token that stopped generation

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class TextStream:
    """Incremental detokenization: text safe to send now, holding back a possible partial UTF-8 character
    or the beginning of a stop string; the concatenated pieces equal the final text."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = ""
        self.full = ""

    def push(self, tokens: list[int]) -> tuple[str, bool]:
        """(new text to send, whether a stop string was reached)."""
        self.full = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [i for i in (self.full.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.full = self.full[:min(hits)]
            return self._advance(len(self.full)), True
        safe = len(self.full.rstrip("\ufffd")) if self.full.endswith("\ufffd") else len(self.full)
        return self._advance(min(safe, len(self.full) - self.hold)), False

    def flush(self) -> str:
        return self._advance(len(self.full))

    def _advance(self, upto: int) -> str:
        if upto <= len(self.sent):
            return ""
        piece = self.full[len(self.sent):upto]
        self.sent = self.full[:upto]
        return piece


def model_lock(model: Model) -> threading.Lock:
    lock: threading.Lock = model.extra.setdefault("generation_lock", threading.Lock())
    return lock


class Engine:
    """Owns generation on `model`; see the module docstring for the isolation and queueing rules."""

    def __init__(self, model: Model, vectors: Mapping[str, PersonaVector], *, max_queue: int = 16,
                 request_log: RequestLog | None = None, max_batch_size: int = 32) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = model
        self.vectors = dict(vectors)
        self.monitor = PersonaMonitor.build(self.vectors) if self.vectors else None
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.log = request_log or RequestLog(None)
        self._stop_ids = _stop_ids(model)
        self._keep = last_logits_kwargs(model.hf)
        # transformers 5.x calls the KV cache `cache`; earlier versions `past_key_values`
        self._cache_kw = cache_kwarg(model.hf)
        self._queue: queue.Queue[Job | list[Job] | None] = queue.Queue()
        self._admitted = 0
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._batcher = Batcher(self, max_batch_size)

    @property
    def stats(self) -> dict[str, int]:
        """Forwards run by the batch loop: prefills, steps, and the most rows one step advanced."""
        return dict(self._batcher.stats)

    # ---- admission and the worker thread -------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished (running + waiting)."""
        with self._count_lock:
            return self._admitted

    @property
    def capacity(self) -> int:
        """Requests that may be admitted at once: `max_batch_size` running and `max_queue` waiting."""
        return self.max_batch_size + self.max_queue

    def try_submit(self, job: Job | list[Job]) -> bool:
        """Queue `job` (or jobs of one request, which run as rows of the batch) unless `capacity` requests
        are already admitted."""
        with self._count_lock:
            if self._closing or self._admitted >= self.capacity:
                return False
            self._admitted += 1
        self._queue.put(job)
        return True

    def start(self) -> None:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._work, name="personavec-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel waiting requests, let the running ones finish, join the worker."""
        self._closing = True
        for item in list(self._queue.queue):
            for job in [] if item is None else item if isinstance(item, list) else [item]:
                job.cancel.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _work(self) -> None:
        batcher = self._batcher
        waiting: deque[tuple[Job, list[int]]] = deque()  # (job, [jobs of its request not yet finished])
        closing = False

        def done(job: Job, outcome: Result | Exception, left: list[int]) -> None:
            """Log, free the request's slot once all its jobs are done, then answer (so that a client that
            sends its next request on the answer finds the slot free)."""
            try:
                if not isinstance(outcome, Exception):
                    self._log(job, outcome)
            finally:
                left[0] -= 1
                if left[0] == 0:
                    with self._count_lock:
                        self._admitted -= 1
                job.emit(("error", outcome) if isinstance(outcome, Exception) else ("done", outcome))

        while True:
            block = batcher.running == 0 and not waiting and not closing
            while True:  # take everything submitted so far (wait for it only when idle)
                try:
                    item = self._queue.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is None:
                    closing = True
                    continue
                jobs = item if isinstance(item, list) else [item]
                left = [len(jobs)]
                waiting.extend((job, left) for job in jobs)
            if closing:
                for job, _ in waiting:
                    job.cancel.set()
            joining: list[Row] = []
            while waiting and len(joining) < batcher.room:
                job, left = waiting.popleft()
                try:
                    row = self._row(job, functools.partial(done, left=left))
                except Exception as exc:  # a job that cannot start fails alone: the worker keeps serving
                    log.exception("starting a request failed")
                    done(job, exc, left)
                    continue
                if job.cancel.is_set():  # gone while it waited
                    batcher.finish(row, "cancelled")
                else:
                    joining.append(row)
            if closing and not joining and not waiting and batcher.running == 0:
                return
            if not joining and batcher.running == 0:
                continue
            try:
                batcher.step(joining)
            except Exception as exc:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("the batch loop failed")
                batcher.fail(joining, exc)  # rows already finished are not touched again
                batcher.abort(exc)

    def _row(self, job: Job, done: Callable[[Job, Result | Exception], None]) -> Row:
        start = time.monotonic()
        return Row(job=job, done=done, text=TextStream(self.model.tokenizer, job.stops),
                   gen=torch.Generator(device=self.model.device).manual_seed(job.seed),
                   queue_s=start - job.submitted, start=start,
                   logprobs=None if job.logprobs is None else [])

    def _log(self, job: Job, result: Result) -> None:
        self.log.write({**job.log_fields, "finish_reason": result.finish_reason, "usage": result.usage,
                        "queue_s": round(result.queue_s, 4), "generate_s": round(result.generate_s, 4),
                        "steer": [t.describe() for t in job.steer], "persona": result.persona,
                        "flagged": sorted(n for n, r in result.persona.items() if r["flagged"]),
                        "completion": result.text})

    # ---- generation ---------------------------------------------------------------------------------
    def run(self, job: Job) -> Result:
        """Generate one answer for `job` now, in the calling thread, under the model's lock."""
        start = time.monotonic()
        queue_s = start - job.submitted
        if job.cancel.is_set():
            return Result("", "cancelled", len(job.prompt), 0, {}, queue_s, 0.0)
        model, hf = self.model, self.model.hf
        text = TextStream(model.tokenizer, job.stops)
        tokens: list[int] = []
        logprobs: list[TokenLogprob] | None = None if job.logprobs is None else []
        stop_logprob: TokenLogprob | None = None
        finish = "length"
        gen = torch.Generator(device=model.device).manual_seed(job.seed)
        with model_lock(model), torch.no_grad(), ExitStack() as stack:
            for t in job.steer:  # entered before the watch, so readings see the steered residual stream
                stack.enter_context(steer(model, {t.layer: t.direction}, coef=t.coef, positions=t.positions))
            record = stack.enter_context(watch(model, self.monitor.dirs)) if self.monitor else None
            ids = torch.tensor([job.prompt], device=model.device)
            scored = job.echo and logprobs is not None
            # the prefill: all positions' logits when the prompt is scored, else the last one's only
            out = hf(input_ids=ids, use_cache=job.max_tokens > 0, **({} if scored else self._keep))
            if scored and logprobs is not None:
                logprobs.extend(prompt_logprobs(out.logits[0], job.prompt, job.logprobs or 0))
            while len(tokens) < job.max_tokens:
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
                tok = self._pick(out.logits[0, -1], job, gen)
                if tok in self._stop_ids:
                    if logprobs is not None:  # the end token is part of the answer's logprobs, not of its text
                        stop_logprob = token_logprob(out.logits[0, -1], tok, job.logprobs or 0)
                    finish = "stop"
                    break
                if logprobs is not None:
                    logprobs.append(token_logprob(out.logits[0, -1], tok, job.logprobs or 0))
                tokens.append(tok)
                piece, hit = text.push(tokens)
                if piece:
                    job.emit(("delta", piece))
                # feed every kept token once: its activation is a response position for the persona reading
                past = output_cache(out)
                out = hf(input_ids=torch.tensor([[tok]], device=model.device), use_cache=True,
                         **{self._cache_kw: past}, **self._keep)
                if hit:
                    finish = "stop"
                    break
            persona = self.monitor.readings(record) if self.monitor else {}
        if piece := text.flush():
            job.emit(("delta", piece))
        return Result(text.sent, finish, len(job.prompt), len(tokens), persona, queue_s, time.monotonic() - start,
                      tokens, logprobs, stop_logprob)

    def _pick(self, logits: torch.Tensor, job: Job, gen: torch.Generator) -> int:
        scores = logits.float().clone()  # never write into the model's logits (float32 models return them as is)
        if job.ignore_eos:
            scores[self._stop_ids] = float("-inf")
        if job.temperature == 0:
            return int(scores.argmax())
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        warpers = LogitsProcessorList([TemperatureLogitsWarper(job.temperature)])
        if job.top_p < 1:
            warpers.append(TopPLogitsWarper(job.top_p))
        no_ids: Any = torch.empty(1, 0, dtype=torch.long)  # the warpers do not read the ids
        probs = torch.softmax(warpers(no_ids, scores[None]), dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen)[0, 0])


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k == 0:
        return []
    values, indices = lp.topk(k)
    return [(int(i), float(v)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s log-probability under the raw next-token distribution `logits` [vocab] (before temperature
    and top_p, as OpenAI and vLLM report it) and the k most likely tokens there."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return token, float(lp[token]), _top(lp, k)


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob]:
    """Teacher-forced logprobs of every prompt token from one forward's logits [len(prompt), vocab]: the
    first token has no prediction (None); token i is predicted by position i-1."""
    out: list[TokenLogprob] = [(prompt[0], None, [])]
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device)
    for lo in range(0, len(prompt) - 1, LOGPROB_ROWS):
        hi = min(lo + LOGPROB_ROWS, len(prompt) - 1)
        lp = torch.log_softmax(logits[lo:hi].float(), dim=-1)
        chosen = lp.gather(1, targets[lo:hi, None])[:, 0].tolist()
        top = lp.topk(k, dim=-1) if k else None
        for row in range(hi - lo):
            alts = [] if top is None else [(int(i), float(v)) for i, v in
                                           zip(top.indices[row].tolist(), top.values[row].tolist(), strict=True)]
            out.append((prompt[lo + row + 1], float(chosen[row]), alts))
    return out
