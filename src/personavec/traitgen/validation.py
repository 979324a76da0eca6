"""A generator's reply read and checked: the object found in the text, then the trait schema plus the
generation targets (pair count, exactly `n_questions` per set, references for every evaluation question),
with every problem listed so the generator can be asked to fix them all at once."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from pydantic import ValidationError

from ..traits.schema import MIN_PAIRS, Trait, normalize_question
from .prompts import N_QUESTIONS

EXPECTED_KEYS = {"pairs", "extraction_questions", "evaluation_questions", "rubric", "references"}
_FENCE = re.compile(r"```[ \t]*([A-Za-z]*)[ \t]*\n(.*?)```", re.DOTALL)


def parse_answer(text: str) -> dict[str, Any]:
    """The object in a reply: a fenced ```json/```yaml block, else the outermost {...}, else the whole text
    as YAML. Raises ValueError saying what was found instead."""
    candidates = [m.group(2) for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start:end + 1])
    candidates.append(text)
    for chunk in candidates:
        for loads in (json.loads, yaml.safe_load):
            try:
                data = loads(chunk)
            except (ValueError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                return data
    snippet = " ".join(text.split())[:80]
    raise ValueError(f"the reply holds no JSON object (it begins: {snippet!r})" if snippet
                     else "the reply is empty")


def validate_answer(data: dict[str, Any], name: str, description: str, n_pairs: int = MIN_PAIRS,
                    n_questions: int = N_QUESTIONS) -> tuple[Trait | None, list[str]]:
    """(trait, []) when the reply is usable, else (None, problems). Extra questions beyond `n_questions` are
    cut, never padded; the name and description come from the user."""
    missing = sorted(EXPECTED_KEYS - data.keys())
    problems = _key_problems(data, missing)
    body: dict[str, Any] = {k: data[k] for k in EXPECTED_KEYS & data.keys()}
    problems += _pair_problems(body, n_pairs)
    problems += _question_problems(body, n_questions)
    problems += _reference_problems(body)
    rubric = body.get("rubric")
    if isinstance(rubric, str) and "100" not in rubric:
        problems.append("rubric: it must ask for a score from 0 to 100")
    try:
        trait = Trait.model_validate({"name": name, "description": description.strip(), **body})
    except ValidationError as exc:
        problems += [p for p in _pydantic_problems(exc) if not p.startswith(tuple(m + ":" for m in missing))]
        return None, _dedupe(problems)
    return (None, problems) if problems else (trait, [])


def _key_problems(data: dict[str, Any], missing: list[str]) -> list[str]:
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    extra = sorted(set(data) - EXPECTED_KEYS - {"name", "description"})
    if extra:
        problems.append(f"unexpected keys: {', '.join(extra)}")
    return problems


def _pair_problems(body: dict[str, Any], n_pairs: int) -> list[str]:
    pairs = body.get("pairs")
    if isinstance(pairs, list) and MIN_PAIRS <= len(pairs) < n_pairs:  # fewer than MIN_PAIRS: the schema says
        return [f"pairs: {n_pairs} positive/negative pairs are needed, found {len(pairs)}"]
    return []


def _question_problems(body: dict[str, Any], n_questions: int) -> list[str]:
    """Too few questions is a problem; too many are cut here (in `body`)."""
    problems = []
    for key in ("extraction_questions", "evaluation_questions"):
        qs = body.get(key)
        if isinstance(qs, list):
            if len(qs) < n_questions:
                problems.append(f"{key}: exactly {n_questions} questions are needed, found {len(qs)}")
            body[key] = qs[:n_questions]
    return problems


def _reference_problems(body: dict[str, Any]) -> list[str]:
    """References for questions that were cut are dropped (in `body`); every kept question needs some."""
    refs, evaluation = body.get("references"), body.get("evaluation_questions")
    if not (isinstance(refs, list) and isinstance(evaluation, list)):
        return []
    kept = {normalize_question(str(q)) for q in evaluation}
    body["references"] = [r for r in refs if not isinstance(r, dict)
                          or normalize_question(str(r.get("question", ""))) in kept]
    covered = {normalize_question(str(r.get("question", ""))) for r in refs if isinstance(r, dict)}
    lacking = [q for q in evaluation if normalize_question(str(q)) not in covered]
    if lacking:
        return [f"references: every evaluation question needs reference answers; "
                f"{len(lacking)} have none, e.g. {str(lacking[0])[:60]!r}"]
    return []


def _pydantic_problems(exc: ValidationError) -> list[str]:
    problems = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e["loc"]) or "object"
        problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return problems


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
