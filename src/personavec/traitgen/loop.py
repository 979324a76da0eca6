"""Generation as a conversation: ask, validate, answer a failing reply with its problems, and stop after
`retries` corrections with the last problems listed. Nothing is written here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import TraitError
from ..progress import Progress, no_progress
from ..traits.schema import MIN_PAIRS, NAME_RE, Trait
from .prompts import N_QUESTIONS, Message, build_messages, retry_message
from .validation import parse_answer, validate_answer

Generator = Callable[[list[Message]], str]

DEFAULT_RETRIES = 2


@dataclass
class GeneratedTrait:
    """A validated trait and the conversation that produced it (every reply and every correction)."""

    trait: Trait
    attempts: int
    transcript: list[Message] = field(default_factory=list)


def generate_trait(name: str, description: str, generator: Generator, *, retries: int = DEFAULT_RETRIES,
                   n_pairs: int = MIN_PAIRS, n_questions: int = N_QUESTIONS,
                   progress: Progress = no_progress) -> GeneratedTrait:
    """Ask `generator` for the trait's artifacts; feed validation problems back up to `retries` times.
    Raises TraitError listing the last reply's problems when no reply validates."""
    _check_inputs(name, description, retries, n_pairs, n_questions)
    messages = build_messages(name, description, n_pairs, n_questions)
    attempts = retries + 1
    problems: list[str] = []
    for attempt in range(1, attempts + 1):
        progress("generate trait", attempt - 1, attempts)
        reply = generator(messages)
        messages.append({"role": "assistant", "content": reply})
        trait, problems = _check_reply(reply, name, description, n_pairs, n_questions)
        if trait is not None:
            progress("generate trait", attempts, attempts)
            return GeneratedTrait(trait=trait, attempts=attempt, transcript=messages)
        messages.append(retry_message(problems))
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    raise TraitError(f"the generator gave no valid trait in {attempts} attempts; last problems: {shown}; "
                     "try a stronger generator model or --retries")


def _check_inputs(name: str, description: str, retries: int, n_pairs: int, n_questions: int) -> None:
    """The user's inputs, refused before any call to the generator."""
    if not NAME_RE.match(name):
        raise TraitError(f"trait name '{name}': use lowercase letters, digits, '-' or '_' (e.g. 'manipulative')")
    if not description.strip():
        raise TraitError("the trait description is empty; say in a sentence or two what the trait is")
    if n_pairs < MIN_PAIRS or n_questions < 1 or retries < 0:
        raise TraitError(f"need at least {MIN_PAIRS} pairs, 1 question per set and 0 or more retries")


def _check_reply(reply: str, name: str, description: str, n_pairs: int,
                 n_questions: int) -> tuple[Trait | None, list[str]]:
    try:
        return validate_answer(parse_answer(reply), name, description, n_pairs, n_questions)
    except ValueError as exc:
        return None, [str(exc)]
