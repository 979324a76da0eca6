"""Log-likelihood of responses given prompts, batched and padding-aware. The LM head runs only on the
positions that predict response tokens, so memory does not scale with vocabulary × prompt length, and a
prompt shared by several responses is computed once (the KV cache carries it to each of them)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .capture import Sample
from .chat import batches_by_length, pad_batch
from .models import cache_kwarg, output_cache
from .progress import Progress, no_progress
from .steering import sequence_layout

if TYPE_CHECKING:
    from .models import Model


def _decoder(hf: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack without the LM head (so the head runs only where needed), through the standard
    `get_decoder` accessor, which also sees through a PEFT wrapper (whose `base_model` is the LoRA wrapper of
    the whole causal LM); None when the model offers no such split."""
    get = getattr(hf, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        decoder = None
    if decoder is None and not hasattr(hf, "peft_config"):
        base = getattr(hf, "base_model", None)
        decoder = base if base is not hf else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not hf else None


def response_logprobs(model: Model, samples: Sequence[Sample], *, batch_size: int = 16,
                      max_tokens: int = 8192, share_prompts: bool = True, progress: Progress = no_progress,
                      task: str = "likelihood") -> list[float | None]:
    """Mean per-token log-probability (nats) of each sample's response; None for an empty response.

    Samples that share their prompt with another sample (a quiz item's choices, a question's reference
    answers, an answer scored under each system prompt of the contrast judge) are scored prompt-once: one
    forward over each distinct prompt with the KV cache, then their responses in length-sorted batches on that
    cache, so the prompt's tokens are computed once instead of once per response. The others get one cache-free
    forward over prompt + response. Both give the same numbers up to floating-point rounding.

    Active steering hooks apply, so this also measures a steered model: named positions ("response",
    "prompt", "all") mean the same tokens on both paths. A bool positions mask [batch, seq] fits cache-free
    forwards only: pass share_prompts=False with one."""
    out: list[float | None] = [None] * len(samples)
    todo = [i for i, s in enumerate(samples) if s.response and s.prompt]
    uses = Counter(tuple(samples[i].prompt) for i in todo)
    is_shared = {i: share_prompts and uses[tuple(samples[i].prompt)] > 1 for i in todo}
    shared, alone = [i for i in todo if is_shared[i]], [i for i in todo if not is_shared[i]]
    groups = [([alone[g] for g in group], False) for group in batches_by_length(
        [len(samples[i].prompt) + len(samples[i].response) for i in alone], max_tokens=max_tokens,
        max_batch=batch_size)]
    groups += [(group, True) for group in _prompt_batches(samples, shared, max_tokens, batch_size)]
    scorer = Scorer(model, batch_size)
    done = 0
    progress(task, 0, len(todo))
    for group, by_prompt in groups:
        batch = [samples[i] for i in group]
        sums = scorer.by_prompt(batch) if by_prompt else scorer.whole(batch)
        for b, i in enumerate(group):
            out[i] = float(sums[b]) / len(batch[b].response)
        done += len(group)
        progress(task, done, len(todo))
    return out


def _prompt_batches(samples: Sequence[Sample], todo: Sequence[int], max_tokens: int, max_batch: int
                    ) -> list[list[int]]:
    """Batches of samples with shared prompts, longest prompts first, each prompt's samples together (a prompt
    with more samples than fit is split across batches and computed once in each). A batch holds at most
    `max_batch` distinct prompts; its tokens computed (each distinct prompt once, every response padded to
    the longest) stay within `max_tokens`, and so do its cached prompt rows (one copy per response) up to 4×:
    those are keys and values only, a small part of a forward's memory."""
    order = sorted(todo, key=lambda i: (-len(samples[i].prompt), samples[i].prompt, -len(samples[i].response)))
    out: list[list[int]] = []
    cur: list[int] = []
    prompts: set[tuple[int, ...]] = set()
    longest = 0
    for i in order:
        s, key = samples[i], tuple(samples[i].prompt)
        width = len(samples[cur[0]].prompt) if cur else len(s.prompt)
        n_prompts, n = len(prompts | {key}), len(cur) + 1
        computed = width * n_prompts + max(longest, len(s.response)) * n
        if cur and (n_prompts > max_batch or computed > max_tokens or width * n > 4 * max_tokens):
            out.append(cur)
            cur, prompts, longest = [], set(), 0
        cur.append(i)
        prompts.add(key)
        longest = max(longest, len(s.response))
    if cur:
        out.append(cur)
    return out


class Scorer:
    """The forwards that score responses (here and in the monitor's readings): the decoder stack without the
    LM head where the model offers that split (the head then runs only on positions that predict response
    tokens), else the whole model."""

    def __init__(self, model: Model, max_rows: int) -> None:
        self.model, self.max_rows = model, max_rows
        decoder, self.head = _decoder(model.hf), model.hf.get_output_embeddings()
        self.split = decoder is not None and self.head is not None
        self.net: torch.nn.Module = decoder if decoder is not None and self.head is not None else model.hf
        self.softcap = getattr(model.hf.config, "final_logit_softcapping", None)
        self.cache_key = cache_kwarg(self.net)

    def states(self, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """(hidden states, or logits without the split; the KV cache when use_cache=True)."""
        out = self.net(**kwargs)
        return (out.last_hidden_state if self.split else out.logits), output_cache(out) if kwargs["use_cache"] else None

    def log_softmax(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities [rows, vocab] from states (or logits) [rows, hidden]."""
        logits = (self.head(states) if self.head is not None and self.split else states).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)

    def logprobs(self, states: torch.Tensor, targets: list[int]) -> torch.Tensor:
        """Log-probability of each target token given the state (or logits) in the same row of `states`."""
        dist = self.log_softmax(states)
        return dist.gather(1, torch.tensor(targets, device=dist.device)[:, None])[:, 0]

    def whole(self, batch: Sequence[Sample]) -> torch.Tensor:
        """Per sample, the summed log-probability of its response from one cache-free forward over prompt +
        response (right-padded; `sequence_layout` gives steering the generation's positions)."""
        device = self.model.device
        ids, mask = pad_batch([s.prompt + s.response for s in batch], self.model.tokenizer.pad_token_id,
                              side="right", device=device)
        rows, cols, targets = [], [], []
        for b, s in enumerate(batch):
            start = len(s.prompt) - 1  # the position that predicts the first response token
            for k, tok in enumerate(s.response):
                rows.append(b)
                cols.append(start + k)
                targets.append(tok)
        r, c = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        with torch.no_grad(), sequence_layout(torch.tensor([len(s.prompt) for s in batch])):
            states, _ = self.states(input_ids=ids, attention_mask=mask, use_cache=False)
            lp = self.logprobs(states[r, c], targets)
        return torch.zeros(len(batch), device=lp.device).index_add_(0, r.to(lp.device), lp)

    def by_prompt(self, batch: Sequence[Sample]) -> torch.Tensor:
        """The same sums with each distinct prompt computed once: a left-padded prefill of the distinct prompts
        with the KV cache (its last position predicts each response's first token), then the responses but
        their last tokens in cached forwards, each on a copy of the cache with its rows repeated per sample
        (right-padded; positions continue from each prompt's length). Left padding keeps each prompt next to
        its response in the cache, as in generation, so sliding-window attention sees the same tokens as in
        a cache-free forward; steering sees a prefill then a cached step, as in generation."""
        device, pad = self.model.device, self.model.tokenizer.pad_token_id
        distinct = list(dict.fromkeys(tuple(s.prompt) for s in batch))
        row = {p: j for j, p in enumerate(distinct)}
        of = torch.tensor([row[tuple(s.prompt)] for s in batch])
        ids, pmask = pad_batch([list(p) for p in distinct], pad, side="left", device=device)
        sums = torch.zeros(len(batch))
        with torch.no_grad():
            # every row's prompt ends at the last column: 'response' steers that column, 'prompt' all of them
            with sequence_layout(torch.full((len(distinct),), ids.shape[1])):
                states, cache = self.states(input_ids=ids, attention_mask=pmask, use_cache=True,
                                            position_ids=(pmask.cumsum(-1) - 1).clamp(min=0))
            if not hasattr(cache, "batch_select_indices"):  # a cache this cannot repeat rows of
                return self.whole(batch)
            sums += self.logprobs(states[of, -1], [s.response[0] for s in batch]).cpu()
            for chunk in _similar_lengths([b for b, s in enumerate(batch) if len(s.response) > 1],
                                          [len(s.response) - 1 for s in batch], self.max_rows):
                conts = [batch[b].response[:-1] for b in chunk]
                states = self.continued(cache, of[chunk], pmask, conts, last_use=len(chunk) == len(batch))
                r, c = token_positions([len(cont) for cont in conts], device)
                lp = self.logprobs(states[r, c], [t for b in chunk for t in batch[b].response[1:]]).cpu()
                sums.index_add_(0, torch.tensor(chunk)[r.cpu()], lp)
        return sums

    def continued(self, cache: Any, of: torch.Tensor, prompt_mask: torch.Tensor, conts: Sequence[list[int]], *,
                  last_use: bool = False) -> torch.Tensor:
        """States (or logits) of `conts` run on the prompts' KV cache, continuation k after prompt row of[k]:
        on a copy of the cache with its rows repeated per continuation (the cache itself when this is its
        last use), right-padded, positions continuing from each prompt's length (its unpadded tokens in
        `prompt_mask`, the prefill's attention mask)."""
        device = self.model.device
        ids, mask = pad_batch(list(conts), self.model.tokenizer.pad_token_id, side="right", device=device)
        rows = of.to(device)
        copied = copy.copy(cache) if last_use else copy.deepcopy(cache)
        copied.batch_select_indices(rows)
        before = prompt_mask.to(device)[rows]
        positions = before.sum(-1, keepdim=True) + torch.arange(ids.shape[1], device=device)[None, :]
        states, _ = self.states(input_ids=ids, attention_mask=torch.cat([before, mask], dim=1),
                                position_ids=positions, use_cache=True, **{self.cache_key: copied})
        return states


def token_positions(lengths: Sequence[int], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every token of rows of the given lengths, row by row: indexes a padded batch's
    states down to its real tokens, so the LM head runs on those only."""
    r = torch.tensor([k for k, n in enumerate(lengths) for _ in range(n)], dtype=torch.long, device=device)
    c = torch.tensor([j for n in lengths for j in range(n)], dtype=torch.long, device=device)
    return r, c


def _similar_lengths(indices: Sequence[int], lengths: Sequence[int], max_rows: int, waste: float = 0.25
                     ) -> list[list[int]]:
    """`indices` longest first, cut into runs of at most `max_rows` whose padding to the run's longest stays
    within `waste` of their tokens, so responses of very different lengths do not share one padded forward
    (and forwards stay the size of a cache-free batch: on a CPU, larger ones cost more per token)."""
    out: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i in sorted(indices, key=lambda i: -lengths[i]):
        if cur and (len(cur) >= max_rows or lengths[cur[0]] * (len(cur) + 1) > (1 + waste) * (tokens + lengths[i])):
            out.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += lengths[i]
    if cur:
        out.append(cur)
    return out
