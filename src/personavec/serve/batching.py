"""Continuous batching for the server: the rows of one running batch, each a request with its own steering,
sampling, stops and persona readings.

Each loop step (`Batcher.step`) first prefills the requests that are waiting (each in a forward of its own,
so a prefill is exactly the request's prefill alone), merges their KV cache into the running batch's
(left-padding the shorter), then advances every running row by one token in one forward. A row leaves as
soon as it is done; the cache then drops its row and the padding columns no row needs any more. Rows of a
forward never see each other: padding is masked out of attention, positions come from each row's own
length, steering is added row by row (`steering.RowSteering`: a row without a term gets exactly zero
added) and each row is read at its own positions.

A row runs the same token loop as `Engine.run` (the one-request reference): pick, stop at an end token,
stream text, feed every kept token back once (its reading is a response reading), stop at a stop string or
at max_tokens. Exactness against that request run alone:
  * the prefill is bit for bit the same (the same forward): first token, its logprob, prompt logprobs and
    the prompt reading are identical;
  * a batched step is not bit for bit the one-row step: on the CPU, a matrix multiply with one row takes
    another kernel (matrix-vector) than with several, and attention over a left-padded cache sums over
    masked keys in another order; both change the last bits (float32: logprobs ~1e-5, readings ~1e-5;
    measured, see tests/test_serve_batching.py). Left-padding a prefill would change it the same way,
    which is why prefills are not padded.
    In float32 the greedy tokens are the same; in bfloat16 a near tie can turn the other way after some
    tokens (tests/test_serve_batching.py states the tolerances)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..models import output_cache
from ..projection import watch
from ..steering import RowSteering, RowTerm

if TYPE_CHECKING:
    from .engine import Engine, Job, Result, TextStream, TokenLogprob

log = logging.getLogger("personavec.serve")


@dataclass
class Row:
    """One request in the running batch."""

    job: Job
    done: Callable[[Job, Result | Exception], None]  # called once, when the row leaves (a Result or the error)
    text: TextStream
    gen: torch.Generator
    queue_s: float
    start: float = field(default_factory=time.monotonic)
    length: int = 0  # tokens of this row in the KV cache (its real length; the batch is left-padded to the widest)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    stop_logprob: TokenLogprob | None = None
    feed: int | None = None  # the kept token to feed at the next step
    hit: bool = False  # a stop string was reached: finish after feeding the token
    prompt_reading: torch.Tensor | None = None
    response_readings: list[torch.Tensor] = field(default_factory=list)
    closed: bool = False

    def close(self, outcome: Result | Exception) -> None:
        """Hand the row's outcome over, once (later calls do nothing)."""
        if not self.closed:
            self.closed = True
            self.done(self.job, outcome)

    @property
    def terms(self) -> list[RowTerm]:
        return [(t.layer, t.direction, t.coef, t.positions) for t in self.job.steer]


def cache_layers(cache: Any) -> list[Any] | None:
    """The cache's per-layer key/value holders when every layer is a plain growing cache (rows of
    different lengths can then be merged by left-padding); None otherwise."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return None
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        return None
    return list(layers)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n else t  # [batch, heads, seq, dim]: zeros before the sequence


class Batch:
    """The running batch: rows, their shared KV cache (left-padded to `width`) and their steering."""

    def __init__(self, model: Any, rows: list[Row], cache: Any, width: int) -> None:
        self.model, self.rows, self.cache, self.width = model, rows, cache, width
        self.mergeable = cache_layers(cache) is not None
        self.steering = RowSteering(model, [r.terms for r in rows])

    def merge(self, other: Batch) -> None:
        """Append `other`'s rows (their cache left-padded to a common width)."""
        width = max(self.width, other.width)
        mine, theirs = cache_layers(self.cache), cache_layers(other.cache)
        assert mine is not None and theirs is not None
        for a, b in zip(mine, theirs, strict=True):
            a.keys = torch.cat([_pad_left(a.keys, width - self.width), _pad_left(b.keys, width - other.width)])
            a.values = torch.cat([_pad_left(a.values, width - self.width), _pad_left(b.values, width - other.width)])
        self.rows += other.rows
        self.width = width
        self.steering = RowSteering(self.model, [r.terms for r in self.rows])

    def keep(self, kept: Sequence[int]) -> None:
        """Keep only the rows `kept` (indices, in order); drop padding columns that no row needs."""
        if len(kept) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in kept]
        self.steering = self.steering.select(kept)
        if not self.rows:
            return
        self.cache.batch_select_indices(torch.tensor(list(kept), dtype=torch.long, device=self.model.device))
        layers = cache_layers(self.cache)
        widest = max(r.length for r in self.rows)
        if layers is not None and widest < self.width:
            cut = self.width - widest
            for layer in layers:
                layer.keys, layer.values = layer.keys[..., cut:, :], layer.values[..., cut:, :]
            self.width = widest


class Batcher:
    """Runs the batch loop for `engine` (its model, picking, monitoring and token rules)."""

    def __init__(self, engine: Engine, max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch: Batch | None = None
        self.stats = {"prefills": 0, "steps": 0, "largest_batch": 0}  # forwards run, most rows in one step

    @property
    def running(self) -> int:
        return len(self.batch.rows) if self.batch is not None else 0

    @property
    def room(self) -> int:
        """Rows that may join now: none while a batch whose cache cannot be merged runs."""
        if self.batch is not None and not self.batch.mergeable:
            return 0
        return self.max_batch_size - self.running

    # ---- one loop step -------------------------------------------------------------------------------
    def step(self, joining: list[Row]) -> None:
        """Prefill `joining` (at most `room` rows) and merge them in, then advance every row by one token.

        Each row is prefilled in a forward of its own: unpadded and with a batch of one, the prefill is bit
        for bit what the request computes alone (first token and its logprob, prompt logprobs, the prompt
        reading). Batching pays in the token steps, which are most of the work."""
        for row in joining:
            fresh = self._prefill(row)
            if fresh is None or not fresh.rows:
                continue
            if self.batch is None:
                self.batch = fresh
            elif self.batch.mergeable and fresh.mergeable:
                self.batch.merge(fresh)
            else:  # cannot happen with `room`, kept as a guard: never mix caches that do not merge
                self.fail(fresh.rows, RuntimeError("the KV cache of this model cannot be merged"))
        if self.batch is not None and self.batch.rows:
            self._decode(self.batch)
        if self.batch is not None and not self.batch.rows:
            self.batch = None

    def _forward(self, steering: RowSteering, *, ids: torch.Tensor, mask: torch.Tensor | None,
                 positions: torch.Tensor | None, cache: Any, full_logits: bool, use_cache: bool) -> tuple[Any, Any]:
        eng = self.engine
        kwargs: dict[str, Any] = {} if full_logits else dict(eng._keep)
        if mask is not None:
            kwargs |= {"attention_mask": mask, "position_ids": positions}
        if cache is not None:
            kwargs[eng._cache_kw] = cache
        from .engine import model_lock

        with model_lock(eng.model), torch.no_grad(), ExitStack() as stack:
            stack.enter_context(steering.attach())  # before the watch: readings see the steered stream
            record = stack.enter_context(watch(eng.model, eng.monitor.dirs)) if eng.monitor else None
            out = eng.model.hf(input_ids=ids, use_cache=use_cache, **kwargs)
        reading = record.steps[-1] if record is not None and record.steps else None
        return out, reading

    def _prefill(self, row: Row) -> Batch | None:
        """Run `row`'s prompt alone (as `Engine.run` does), pick its first token; a batch of that one row
        unless it is already done."""
        job = row.job
        scored = job.echo and row.logprobs is not None  # every prompt position's logits, for its logprobs
        try:
            steering = RowSteering(self.engine.model, [row.terms])
            out, reading = self._forward(steering, ids=torch.tensor([job.prompt], device=self.engine.model.device),
                                         mask=None, positions=None, cache=None, full_logits=scored,
                                         use_cache=job.max_tokens > 0)
        except Exception as exc:  # a bug: this request answers 500, the others keep running
            log.exception("prefill failed")
            self.fail([row], exc)
            return None
        self.stats["prefills"] += 1
        row.length = len(job.prompt)
        if reading is not None:
            row.prompt_reading = reading[0, -1]
        if scored and row.logprobs is not None:
            from .engine import prompt_logprobs

            row.logprobs.extend(prompt_logprobs(out.logits[0], job.prompt, job.logprobs or 0))
        kept = self._advance([row], out.logits[:, -1])
        if not kept:
            return None
        cache = output_cache(out)
        if cache is None:
            self.fail([row], RuntimeError("the model returned no KV cache"))
            return None
        return Batch(self.engine.model, [row], cache, row.length)

    def _decode(self, batch: Batch) -> None:
        rows = batch.rows
        device = self.engine.model.device
        ids = torch.tensor([[r.feed] for r in rows], device=device)
        mask = positions = None
        if any(r.length < batch.width for r in rows):
            mask = torch.tensor([[0] * (batch.width - r.length) + [1] * (r.length + 1) for r in rows], device=device)
            positions = torch.tensor([[r.length] for r in rows], device=device)
        try:
            out, reading = self._forward(batch.steering, ids=ids, mask=mask, positions=positions,
                                         cache=batch.cache, full_logits=False, use_cache=True)
        except Exception as exc:
            log.exception("generation step failed")
            self.fail(rows, exc)
            batch.rows = []
            return
        batch.width += 1
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        for i, row in enumerate(rows):
            row.length += 1
            row.feed = None
            if reading is not None:
                row.response_readings.append(reading[i, 0])
        batch.keep(self._advance(rows, out.logits[:, -1]))

    # ---- the token rules of Engine.run, row by row -------------------------------------------------------
    def _advance(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token from its logits [rows, vocab]; finish the rows that are done. Returns
        the indices of the rows that go on."""
        eng = self.engine
        going: list[int] = []
        live: list[int] = []
        for i, row in enumerate(rows):
            job = row.job
            if row.hit:
                self.finish(row, "stop")
            elif len(row.tokens) >= job.max_tokens:
                self.finish(row, "length")
            elif job.cancel.is_set():
                self.finish(row, "cancelled")
            else:
                live.append(i)
        greedy = [i for i in live if rows[i].job.temperature == 0]
        picked: dict[int, int] = {}
        if greedy:  # one argmax (one device sync) for all greedy rows
            scores = logits[greedy].float()
            eos = [k for k, i in enumerate(greedy) if rows[i].job.ignore_eos]
            if eos:
                scores = scores.clone()
                scores[torch.tensor(eos)[:, None], torch.tensor(eng._stop_ids)[None, :]] = float("-inf")
            picked = dict(zip(greedy, scores.argmax(-1).tolist(), strict=True))
        for i in live:
            row, job = rows[i], rows[i].job
            try:
                tok = picked[i] if i in picked else eng._pick(logits[i], job, row.gen)
                k = job.logprobs or 0
                if tok in eng._stop_ids:
                    if row.logprobs is not None:
                        from .engine import token_logprob

                        row.stop_logprob = token_logprob(logits[i], tok, k)
                    self.finish(row, "stop")
                    continue
                if row.logprobs is not None:
                    from .engine import token_logprob

                    row.logprobs.append(token_logprob(logits[i], tok, k))
                row.tokens.append(tok)
                piece, row.hit = row.text.push(row.tokens)
                if piece:
                    job.emit(("delta", piece))
                row.feed = tok  # every kept token is fed back once: its activation is a response reading
                going.append(i)
            except Exception as exc:
                log.exception("picking a token failed")
                self.fail([row], exc)
        return going

    def finish(self, row: Row, reason: str) -> None:
        from .engine import Result

        eng = self.engine
        try:
            persona = (eng.monitor.readings_from(row.prompt_reading, row.response_readings)
                       if eng.monitor is not None and row.prompt_reading is not None else {})
            if piece := row.text.flush():
                row.job.emit(("delta", piece))
            result = Result(row.text.sent, reason, len(row.job.prompt), len(row.tokens), persona, row.queue_s,
                            time.monotonic() - row.start, row.tokens, row.logprobs, row.stop_logprob)
        except Exception as exc:
            log.exception("finishing a request failed")
            row.close(exc)
            return
        row.close(result)

    def fail(self, rows: list[Row], exc: Exception) -> None:
        for row in rows:
            row.close(exc)

    def abort(self, exc: Exception) -> None:
        """Fail every running row (the loop itself broke)."""
        if self.batch is not None:
            self.fail(self.batch.rows, exc)
            self.batch = None
