"""Turn a judge's next-token distribution into a 0–100 score (the paper's logprob-weighted mean).

Reading probabilities instead of sampled text gives a smooth, deterministic score. Tokenizers differ: some
have one token per number 0–100 (GPT-4o, Llama 3), others split numbers into digits (SmolLM2, Qwen).
`aggregate_top_logprobs` reads an API's top-20 list of the first answer token; `integer_distribution`
walks a trie of the numbers' token sequences on a local model, so multi-token numbers get their true
probability instead of the probability of their first digit."""

from __future__ import annotations

import logging
import math
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..models import cache_kwarg, last_logits_kwargs, output_cache

if TYPE_CHECKING:
    from ..models import Model

log = logging.getLogger("personavec")

_INTEGER = re.compile(r"(0|[1-9][0-9]*)")
_BYTE_DIGIT = re.compile(r"<0x3[0-9]>")  # SentencePiece byte-fallback tokens for '0'..'9'


def parse_score_token(text: str, max_value: int = 100) -> int | None:
    """The integer 0..max_value a token's text spells (surrounding whitespace ignored), else None.

    Only canonical ASCII decimals count: int() would also accept '+5', '1_0', '05' and non-ASCII digits."""
    s = text.strip()
    if not _INTEGER.fullmatch(s):
        return None
    n = int(s)
    return n if n <= max_value else None


def aggregate_top_logprobs(top: Sequence[tuple[str, float]], min_mass: float = 0.25) -> float | None:
    """Probability-weighted mean of the number tokens among `top` (token text, logprob) pairs.

    Returns None when the number tokens carry less than `min_mass` probability in total: the judge was
    mostly saying something else (a refusal, a word) and a mean over its stray digits would be noise."""
    mass = 0.0
    total = 0.0
    for token, logprob in top:
        n = parse_score_token(token)
        if n is None:
            continue
        p = math.exp(logprob)
        mass += p
        total += n * p
    if mass < min_mass or mass <= 0.0:
        return None
    return total / mass


def aggregate_distribution(dist: Mapping[int, float], min_mass: float = 0.25) -> float | None:
    """Normalized mean of an unnormalized {number: probability} map, or None below `min_mass`."""
    mass = sum(dist.values())
    if mass < min_mass or mass <= 0.0:
        return None
    return sum(n * p for n, p in dist.items()) / mass


@dataclass(frozen=True)
class NumberTrie:
    """Token sequences of the numbers 0..max_value, and the prefixes that need a forward pass.

    `internal` holds every prefix with children (the empty root first): one forward pass on
    prompt+prefix gives both the probabilities of its children and the probability of stopping there."""

    paths: dict[int, tuple[int, ...]]
    internal: tuple[tuple[int, ...], ...]


def build_number_trie(tokenizer: Any, max_value: int = 100) -> NumberTrie:
    """Tokenize str(n) for n in 0..max_value as a continuation (no special tokens) and index the prefixes."""
    paths: dict[int, tuple[int, ...]] = {}
    seen: set[tuple[int, ...]] = set()
    for n in range(max_value + 1):
        path = tuple(int(t) for t in tokenizer.encode(str(n), add_special_tokens=False))
        if not path or path in seen:  # two numbers with one token sequence: the smaller keeps it
            continue
        seen.add(path)
        paths[n] = path
    internal: set[tuple[int, ...]] = set()
    for path in paths.values():
        for k in range(len(path)):
            internal.add(path[:k])
    return NumberTrie(paths=paths, internal=tuple(sorted(internal, key=lambda p: (len(p), p))))


def digit_token_mask(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Boolean mask over the vocabulary of tokens that would continue a number (text starts with a digit).

    Reads raw token strings rather than decoding one id at a time: SentencePiece's decode drops the
    word-boundary marker, so '▁5' (a new word) would look like a continuation."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(vocab_size, len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    for i, tok in enumerate(tokens):
        if isinstance(tok, bytes):
            tok = tok.decode("utf-8", errors="replace")
        if isinstance(tok, str) and tok and ("0" <= tok[0] <= "9" or _BYTE_DIGIT.fullmatch(tok)):
            mask[i] = True
    return mask


_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def _cached(tokenizer: Any, key: tuple[Any, ...], make: Any) -> Any:
    """Memoize per tokenizer object (the digit mask scans the whole vocabulary)."""
    try:
        slot = _CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: compute every time
        return make()
    if key not in slot:
        slot[key] = make()
    return slot[key]


def number_trie(tokenizer: Any, max_value: int = 100) -> NumberTrie:
    """`build_number_trie`, memoized per tokenizer object."""
    trie: NumberTrie = _cached(tokenizer, ("trie", max_value), lambda: build_number_trie(tokenizer, max_value))
    return trie


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities on the CPU in at least float32 (bf16 sums over a vocabulary lose digits)."""
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).cpu()


@torch.no_grad()
def _next_token_probs(model: Model, seqs: list[list[int]], batch_size: int, max_tokens: int) -> list[torch.Tensor]:
    """Next-token probability vectors (float32, CPU) after each sequence, in batched forwards.

    Left padding with explicit position ids so each row's last position is its real last token and
    every row sees the positions it would see alone."""
    from ..chat import batches_by_length, pad_batch

    hf = model.hf
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    extra = last_logits_kwargs(hf)
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for batch in batches_by_length([len(s) for s in seqs], max_tokens=max_tokens, max_batch=batch_size):
        ids, mask = pad_batch([seqs[i] for i in batch], pad_id, side="left", device=model.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                    **extra).logits[:, -1, :]
        probs = _softmax(logits)
        for row, i in enumerate(batch):
            out[i] = probs[row]
    return out


@torch.no_grad()
def _shared_prefix_probs(model: Model, prompts: Sequence[list[int]], suffixes: Sequence[tuple[int, ...]],
                         pad_id: int) -> list[list[torch.Tensor]]:
    """Next-token probabilities after each prompt and after prompt+suffix for every suffix.

    The prompts run once (left-padded, with the KV cache); the cache is then repeated per suffix and
    the short right-padded suffixes run on top, so a digit-by-digit tokenizer costs one prompt pass
    plus a few tokens instead of eleven prompt passes."""
    from ..chat import pad_batch

    hf, device = model.hf, model.device
    ids, mask = pad_batch([list(p) for p in prompts], pad_id, side="left", device=device)
    first = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
               use_cache=True, **last_logits_kwargs(hf))
    rows: list[list[torch.Tensor]] = [[p] for p in _softmax(first.logits[:, -1])]
    if not suffixes:
        return rows
    s = len(suffixes)
    cache = output_cache(first)
    cache.batch_repeat_interleave(s)  # prompt j's cache at rows j*s .. j*s+s-1
    suf_ids, suf_mask = pad_batch([list(x) for x in suffixes] * len(prompts), pad_id, side="right", device=device)
    full_mask = torch.cat([mask.repeat_interleave(s, dim=0), suf_mask], dim=1)
    start = mask.sum(-1).repeat_interleave(s)[:, None]
    positions = start + torch.arange(suf_ids.shape[1], device=device)[None, :]
    logits = hf(input_ids=suf_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                **{cache_kwarg(hf): cache}).logits
    last = suf_mask.sum(-1) - 1
    probs = _softmax(logits[torch.arange(len(last), device=device), last])
    for j in range(len(prompts)):
        rows[j].extend(probs[j * s:(j + 1) * s])
    return rows


_NO_SHARED_CACHE: weakref.WeakSet[Any] = weakref.WeakSet()  # models whose KV cache cannot be repeated


def _node_probs(model: Model, prompts: Sequence[list[int]], internal: Sequence[tuple[int, ...]],
                batch_size: int, max_tokens: int) -> list[list[torch.Tensor]]:
    """For each prompt, the next-token probabilities after prompt+prefix for each prefix in `internal`."""
    from ..chat import batches_by_length

    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    assert internal and internal[0] == ()
    suffixes = list(internal[1:])
    if model.hf not in _NO_SHARED_CACHE:
        try:
            out: list[list[torch.Tensor]] = [[] for _ in prompts]
            per_forward = max(1, batch_size // max(1, len(suffixes)))
            for group in batches_by_length([len(p) for p in prompts], max_tokens=max_tokens, max_batch=per_forward):
                got = _shared_prefix_probs(model, [prompts[i] for i in group], suffixes, pad_id)
                for i, node_probs in zip(group, got, strict=True):
                    out[i] = node_probs
            return out
        except (AttributeError, NotImplementedError) as exc:
            # legacy tuple caches or caches that cannot be repeated: the same numbers, computed slower
            log.debug("number trie without a shared prompt cache (%s: %s)", type(exc).__name__, exc)
            _NO_SHARED_CACHE.add(model.hf)
    rows = [list(p) + list(prefix) for p in prompts for prefix in internal]
    flat = _next_token_probs(model, rows, batch_size=batch_size, max_tokens=max_tokens)
    k = len(internal)
    return [flat[j * k:(j + 1) * k] for j in range(len(prompts))]


def integer_distributions(model: Model, prompts: Sequence[list[int]], max_value: int = 100,
                          batch_size: int = 32, max_tokens: int = 16384) -> list[dict[int, float]]:
    """`integer_distribution` for several prompts, batched (`batch_size` rows per forward pass)."""
    tok = model.tokenizer
    trie = number_trie(tok, max_value)
    if not prompts:
        return []
    probs = _node_probs(model, prompts, trie.internal, batch_size, max_tokens)
    vocab = probs[0][0].shape[-1]
    digits: torch.Tensor = _cached(tok, ("digits", vocab), lambda: digit_token_mask(tok, vocab))
    results: list[dict[int, float]] = []
    for per_prompt in probs:
        node = dict(zip(trie.internal, per_prompt, strict=True))
        stop = {prefix: 1.0 - float(p[digits].sum()) for prefix, p in node.items()}
        dist: dict[int, float] = {}
        for n, path in trie.paths.items():
            p_path = 1.0
            for i, t in enumerate(path):
                p_path *= float(node[path[:i]][t]) if t < vocab else 0.0
            dist[n] = p_path * (max(stop[path], 0.0) if path in node else 1.0)
        results.append(dist)
    return results


def integer_distribution(model: Model, prompt_ids: list[int], max_value: int = 100) -> dict[int, float]:
    """Unnormalized P(the model answers exactly n) for n in 0..max_value, after `prompt_ids`.

    P(n) is the product of the probabilities of n's tokens times the probability of stopping after them
    (1 − the mass of digit-initial tokens), so '5' followed by '7' counts for 57, not for 5. Leaves of the
    trie (e.g. '100', or every number for tokenizers with one token per number) stop with probability 1.
    Cost: one forward over the prompt, then one batched forward over the trie's short prefixes on the
    prompt's KV cache (or, for models whose cache cannot be repeated, one left-padded row per prefix).
    The trie and the digit mask are memoized per tokenizer object: do not add tokens to it afterwards."""
    return integer_distributions(model, [prompt_ids], max_value=max_value)[0]
