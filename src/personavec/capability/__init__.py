"""Capability checks: perplexity on held-out neutral text and a small zero-shot multiple-choice quiz, so
that capability lost to steering or finetuning is visible next to the trait score; `mmlu` runs the
EleutherAI harness on the same in-memory model for a standard number.

None of these functions add hooks: they run the model as it is, so steering applied by the caller
(`with vec.steer(model, layer=L, coef=c): capability(model)`) is what they measure. The local checks
keep the generation meaning of steering positions, so the default positions="response" steers what it
steers while the model answers: perplexity scores each text as the response to its first token, the
cloze quiz scores each choice as the response to its question (both through `response_logprobs`, which
declares the prompt/response layout to the hooks), and the letter quiz reads the next token after
left-padded prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch

from ..capture import Sample
from ..chat import batches_by_length, encode_chat, encode_response, pad_batch
from ..errors import PersonavecError
from ..likelihood import response_logprobs
from ..models import last_logits_kwargs
from ..progress import Progress, no_progress

if TYPE_CHECKING:
    from ..models import Model

__all__ = ["QuizItem", "capability", "mmlu", "neutral_texts", "perplexity", "quiz_accuracy", "quiz_items"]

LETTERS = "ABCDEFGHIJ"


class QuizItem(TypedDict):
    """One multiple-choice question; `answer` is the letter of the right choice ("A" = choices[0])."""

    question: str
    choices: list[str]
    answer: str


def _shipped(name: str) -> list[dict[str, Any]]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def neutral_texts() -> list[str]:
    """The shipped held-out neutral paragraphs (everyday and encyclopedic prose, written for personavec)."""
    return [str(row["text"]) for row in _shipped("neutral.jsonl")]


def quiz_items() -> list[QuizItem]:
    """The shipped easy general-knowledge quiz (answers spread evenly over A–D, so a letter bias scores 25%)."""
    return [QuizItem(question=r["question"], choices=list(r["choices"]), answer=r["answer"])
            for r in _shipped("quiz.jsonl")]


def _pad_id(model: Model) -> int:
    pad_id = model.tokenizer.pad_token_id
    return 0 if pad_id is None else int(pad_id)


def perplexity(model: Model, texts: Sequence[str] | None = None, *, batch_size: int = 8,
               max_tokens: int = 8192, progress: Progress = no_progress) -> float:
    """Per-token perplexity of `texts` (default: the shipped neutral set), pooled over all scored tokens.

    Each text is tokenized as the tokenizer does by default (with its BOS, if it adds one) and scored by
    `response_logprobs` as a continuation of its first token, so under positions="response" steering every
    position that predicts a scored token is steered, as while generating."""
    texts = neutral_texts() if texts is None else list(texts)
    seqs = [[int(t) for t in model.tokenizer(text)["input_ids"]] for text in texts]
    samples = [Sample(s[:1], s[1:]) for s in seqs if len(s) >= 2]
    if not samples:
        raise PersonavecError("perplexity needs at least one text of two or more tokens")
    means = response_logprobs(model, samples, batch_size=batch_size, max_tokens=max_tokens, progress=progress,
                              task="perplexity")
    total = sum(float(m) * len(s.response) for m, s in zip(means, samples, strict=True) if m is not None)
    return math.exp(-total / sum(len(s.response) for s in samples))


def _render(item: Mapping[str, Any]) -> str:
    options = "\n".join(f"{LETTERS[k]}. {choice}" for k, choice in enumerate(item["choices"]))
    return f"{item['question']}\n\n{options}\n\nAnswer with the letter only."


def _letter_ids(tokenizer: Any, n: int) -> list[list[int]]:
    """Single-token ids of "A" and " A" (and so on): tokenizers differ in which one follows the prompt."""
    out = []
    for letter in LETTERS[:n]:
        ids = {enc[0] for v in (letter, f" {letter}")
               if len(enc := tokenizer.encode(v, add_special_tokens=False)) == 1}
        if not ids:
            raise PersonavecError(f"the tokenizer has no single token for the answer letter '{letter}'; "
                                  "use quiz_accuracy(..., method='cloze')")
        out.append(sorted(ids))
    return out


def _check_item(k: int, item: Mapping[str, Any]) -> int:
    choices = item.get("choices")
    if not isinstance(item.get("question"), str) or not isinstance(choices, list) or \
            not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) and c for c in choices):
        raise PersonavecError(f"quiz item {k} needs a 'question' string and 2–{len(LETTERS)} non-empty 'choices'")
    answer = item.get("answer")
    if not isinstance(answer, str) or answer not in LETTERS[:len(choices)]:
        raise PersonavecError(f"quiz item {k}: answer {answer!r} is not one of {', '.join(LETTERS[:len(choices)])}")
    return LETTERS.index(answer)


def _letter_scores(model: Model, prompts: list[list[int]], items: list[Mapping[str, Any]], batch_size: int,
                   max_tokens: int, progress: Progress) -> list[torch.Tensor]:
    """Per item, the log-probability of each option letter as the next token after its prompt.

    Left padding puts every row's last prompt token in the last column, the one positions="response"
    steers in a cache-free forward, as in the prefill of generation."""
    letter_ids = _letter_ids(model.tokenizer, max(len(item["choices"]) for item in items))
    out: list[torch.Tensor] = [torch.empty(0)] * len(items)
    done = 0
    progress("quiz", 0, len(items))
    for group in batches_by_length([len(p) for p in prompts], max_tokens=max_tokens, max_batch=batch_size):
        ids, mask = pad_batch([prompts[i] for i in group], _pad_id(model), side="left", device=model.device)
        with torch.no_grad():
            logits = model.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                              use_cache=False, **last_logits_kwargs(model.hf)).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for row, i in enumerate(group):
            out[i] = torch.stack([logp[row, letter_ids[k]].max() for k in range(len(items[i]["choices"]))])
        done += len(group)
        progress("quiz", done, len(items))
    return out


def _cloze_scores(model: Model, prompts: list[list[int]], items: list[Mapping[str, Any]], batch_size: int,
                  max_tokens: int, progress: Progress) -> list[torch.Tensor]:
    """Per item, the summed log-probability of each choice's text as the assistant's reply."""
    samples = [Sample(p, encode_response(model.tokenizer, c)) for p, item in zip(prompts, items, strict=True)
               for c in item["choices"]]
    means = response_logprobs(model, samples, batch_size=batch_size, max_tokens=max_tokens, progress=progress,
                              task="quiz")
    sums = [-math.inf if m is None else m * len(s.response) for m, s in zip(means, samples, strict=True)]
    starts = [0]
    for item in items:
        starts.append(starts[-1] + len(item["choices"]))
    return [torch.tensor(sums[starts[i]:starts[i + 1]]) for i in range(len(items))]


def quiz_accuracy(model: Model, items: Sequence[Mapping[str, Any]] | None = None, *,
                  method: Literal["cloze", "letter"] = "cloze", batch_size: int = 8, max_tokens: int = 8192,
                  progress: Progress = no_progress) -> float:
    """Fraction of quiz questions (default: the shipped quiz) answered right, zero-shot, without generation.

    method="letter": the question and lettered options go in one user turn ending "Answer with the letter
    only.", and the letters' next-token log-probabilities after the generation prompt are compared (each
    the better of "A" and " A"). Small models cannot bind letters to options (SmolLM2-135M puts "A" first
    for every question: 25%, exactly chance, however easy), so the default is method="cloze": the
    question alone is the user turn and each choice's text is scored as the reply (summed
    log-probability, lm-eval's `acc`), through `response_logprobs`."""
    items = list(quiz_items() if items is None else items)
    if not items:
        raise PersonavecError("quiz_accuracy needs at least one question")
    if method not in ("cloze", "letter"):
        raise PersonavecError(f"unknown quiz method '{method}'; use 'cloze' or 'letter'")
    answers = [_check_item(k, item) for k, item in enumerate(items)]
    render = _render if method == "letter" else (lambda item: str(item["question"]))
    prompts = [encode_chat(model.tokenizer, [{"role": "user", "content": render(item)}]) for item in items]
    score = _letter_scores if method == "letter" else _cloze_scores
    scores = score(model, prompts, items, batch_size, max_tokens, progress)
    return sum(int(int(s.argmax()) == a) for s, a in zip(scores, answers, strict=True)) / len(items)


def capability(model: Model, *, progress: Progress = no_progress) -> dict[str, float]:
    """Both shipped checks in one call: {"perplexity", "quiz_accuracy", "quiz_n"}."""
    items = quiz_items()
    return {"perplexity": perplexity(model, progress=progress),
            "quiz_accuracy": quiz_accuracy(model, items, progress=progress),
            "quiz_n": len(items)}


def mmlu(model: Model, *, limit: int | float | None = None,
         tasks: str | Sequence[str | dict[str, Any]] = "mmlu", batch_size: int = 8) -> dict[str, Any]:
    """Run lm-eval (EleutherAI harness) tasks, MMLU by default, on the already-loaded model.

    The harness wraps `model.hf` itself, so steering hooks active on the model apply. It scores with
    cache-free right-padded forwards, where positions="response" steers only the last column: steer with
    positions="all" to measure a steered model here. Returns {"accuracy": acc of the first task or None,
    "results": the harness's per-task metrics}. Needs `pip install personavec[capability]` and the data sets
    downloaded (or a network connection) for the Hugging Face `datasets` cache."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PersonavecError("mmlu needs the lm-eval harness; run 'pip install personavec[capability]'") from None
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise PersonavecError("mmlu needs at least one lm-eval task name")
    manager = TaskManager()
    load = manager.load

    def load_or_explain(spec: Any) -> Any:
        try:
            return load(spec)
        except OSError as exc:  # datasets/hub: ConnectionError, LocalEntryNotFoundError, DatasetNotFoundError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise PersonavecError(f"cannot load the lm-eval data set(s) {names} ({first}); download them first "
                                  "(run once with network access) or run online") from None

    manager.load = load_or_explain
    lm = HFLM(pretrained=model.hf, tokenizer=model.tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False,
                          random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    results: dict[str, Any] = dict((out or {}).get("results", {}))
    first_name = names[0] if isinstance(names[0], str) else str(names[0].get("task", ""))
    acc = results.get(first_name, {}).get("acc,none")
    return {"accuracy": None if acc is None else float(acc), "results": results}
