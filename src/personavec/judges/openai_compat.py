"""A judge behind any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, our own serve).

The paper's method: ask for one token at temperature 0 with the top-20 logprobs and take the
probability-weighted mean of the number tokens among them. One token per request keeps judging cheap;
the official client's retries (with backoff, honouring Retry-After) ride out rate limits and restarts.

Caveat: only the first answer token is seen. A judge model whose tokenizer splits numbers into digits
(Qwen, SmolLM2) would be scored on its first digit; a warning says so, and `LocalJudge` handles that
case exactly."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from ..clients import openai_endpoint, status_message
from ..errors import JudgeError
from ..progress import Progress
from .base import RubricJudge
from .cache import JudgeCache
from .numbers import aggregate_top_logprobs, parse_score_token

log = logging.getLogger("personavec")

TOP_LOGPROBS = 20
METHOD_VERSION = "openai-top20-first-token-mean-v1"


class OpenAIJudge(RubricJudge):
    """Scores answers 0–100 with a chat model behind an OpenAI-compatible API.

    `base_url` None means $OPENAI_BASE_URL, else api.openai.com; for a local server pass its URL (".../v1") and the key
    defaults to "EMPTY". Results are cached on disk (default: the user cache folder), keyed by model,
    URL, exact prompt and method, so a rerun sends no request it already made."""

    threshold: float = 50.0
    scores_coherence: bool = True

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, max_retries: int = 5, timeout: float = 60,
                 cache: JudgeCache | None = None, min_mass: float = 0.25) -> None:
        from openai import OpenAI

        if concurrency < 1:
            raise JudgeError(f"judge concurrency must be at least 1, got {concurrency}")
        base_url, key = openai_endpoint(base_url, api_key)
        if key is None:
            raise JudgeError("no API key for the OpenAI judge: set OPENAI_API_KEY, or name a local "
                             "OpenAI-compatible server with --judge openai:MODEL@URL")
        self.model = model
        self.base_url = base_url
        self.name = f"openai:{model}@{base_url}" if base_url else f"openai:{model}"
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.min_mass = min_mass
        self.cache = cache if cache is not None else JudgeCache()
        self._client = OpenAI(api_key=key, base_url=base_url, max_retries=max_retries, timeout=timeout)
        self._where = base_url or "api.openai.com"
        self._warned_digits = False

    @property
    def _version(self) -> str:
        return f"{METHOD_VERSION}:min_mass={self.min_mass}"

    def top_logprobs(self, prompt: str) -> list[tuple[str, float]]:
        """(token, logprob) pairs of the first answer token; raises JudgeError with what to do."""
        import openai

        try:
            resp = self._client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=1,
                temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS, seed=0)
        except openai.APIStatusError as exc:
            raise JudgeError(self._status_message(exc)) from None
        except openai.APIConnectionError as exc:
            what = "timed out" if isinstance(exc, openai.APITimeoutError) else "unreachable"
            raise JudgeError(f"judge at {self._where} {what} after {self.max_retries} retries: check "
                             "the URL in --judge openai:MODEL@URL and that the server runs") from None
        except openai.OpenAIError as exc:  # e.g. a response that does not parse as a chat completion
            detail = " ".join(str(exc).split())[:160]
            raise JudgeError(f"judge at {self._where} gave an unusable answer ({type(exc).__name__}: "
                             f"{detail}); check that the judge URL is an OpenAI-compatible /v1 endpoint") from None
        choice = resp.choices[0] if resp.choices else None
        content = choice.logprobs.content if choice is not None and choice.logprobs is not None else None
        if content is None:
            raise JudgeError(f"judge at {self._where} returned no logprobs: it must support logprobs=True "
                             f"and top_logprobs={TOP_LOGPROBS} (model '{self.model}')")
        if not content:  # no token at all (empty answer): nothing to read
            return []
        return [(t.token, float(t.logprob)) for t in content[0].top_logprobs]

    def check(self) -> None:
        """Fail fast (JudgeError) when the endpoint is unreachable or refuses us, before any rollout is paid for."""
        self.top_logprobs("Reply with the number 50 and nothing else.")

    def _status_message(self, exc: Any) -> str:
        return status_message("judge", self._where, getattr(exc, "status_code", "?"), getattr(exc, "message", "") or exc,
                              model=self.model, retries=self.max_retries, key_hint="set OPENAI_API_KEY",
                              root_hint="that the judge URL is the API root (usually ending in /v1)",
                              busy_hint="lower the judge concurrency or try later")

    def _score_prompt(self, prompt: str) -> tuple[float | None, bool]:
        top = self.top_logprobs(prompt)
        multi_digit = any((n := parse_score_token(t)) is not None and n >= 10 for t, _ in top)
        return aggregate_top_logprobs(top, self.min_mass), multi_digit

    def score_prompts(self, prompts: Sequence[str], progress: Progress | None = None,
                      task: str = "judge") -> list[float | None]:
        """Score already-rendered prompts: cached ones first, the rest `concurrency` at a time.

        Each result is cached as it arrives; on the first failure pending requests are cancelled and a
        JudgeError is raised, and a rerun resumes from what was cached."""
        keys = [JudgeCache.key(self.name, p, self._version) for p in prompts]
        done_scores = self.cache.get_many(keys)
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in done_scores}
        total = len(prompts)
        finished = sum(k in done_scores for k in keys)
        report: Callable[[int], None] = (lambda n: progress(task, n, total)) if progress else (lambda n: None)
        report(finished)
        copies = Counter(keys)  # duplicate prompts are asked once and count once per item
        saw_multi_digit = False
        scored = 0
        error: BaseException | None = None
        if todo:
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)),
                                      thread_name_prefix="personavec-judge")
            try:
                futures: dict[Future[tuple[float | None, bool]], str] = {
                    pool.submit(self._score_prompt, p): k for k, p in todo.items()}
                pending = set(futures)
                while pending and error is None:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        if fut.exception() is not None:
                            error = error or fut.exception()
                            continue
                        score, multi = fut.result()
                        k = futures[fut]
                        self.cache.put(k, score)
                        done_scores[k] = score
                        saw_multi_digit |= multi
                        scored += score is not None
                        finished += copies[k]
                        report(finished)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error
        if scored >= 3 and not saw_multi_digit and not self._warned_digits:
            self._warned_digits = True
            log.warning("judge %s never put a two-digit number among its top-%d first tokens: its tokenizer "
                        "may split numbers into digits, so scores reflect first digits only; prefer a judge "
                        "with single-token numbers or a local judge", self.name, TOP_LOGPROBS)
        return [done_scores[k] for k in keys]

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.name!r})"
