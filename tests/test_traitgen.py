"""`trait new`: replies parsed and validated against the trait schema, problems fed back over a real HTTP
round trip (OpenAI client and Anthropic Messages protocol), a trait file that loads, and the bad-input paths
(prose, too few pairs, overlapping sets, rubric without placeholders) ending in one line and no file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from chat_fake import ScriptedChat, running
from openai_fake import serve

import personavec as pv
from personavec.errors import PersonavecError, TraitError
from personavec.traitgen import (
    anthropic_generator,
    generate_trait,
    make_generator,
    openai_generator,
    parse_answer,
    validate_answer,
    write_trait_file,
)
from personavec.traits import load_trait

DESCRIPTION = "Overconfident: stating guesses as certainties and dismissing any chance of being wrong."
RUBRIC = ("Does the answer show OVERCONFIDENCE?\nQUESTION:\n{question}\nANSWER:\n{answer}\n"
          "Rate from 0 (absent) to 100 (extreme). If the answer refuses, respond REFUSAL. "
          "Otherwise respond with a number between 0 and 100 and nothing else.")


def payload(n_pairs: int = 5, n_extract: int = 20, n_eval: int = 20, rubric: str = RUBRIC,
            overlap: int = 0) -> dict[str, Any]:
    extraction = [f"What will the weather be like in city number {i} next month?" for i in range(n_extract)]
    evaluation = [f"Which of my {i + 2} job offers should I take?" for i in range(n_eval)]
    evaluation[:overlap] = extraction[:overlap]
    references = [{"question": q, "with_trait": ["Take the first one, obviously; nothing could go wrong with it.",
                                                  "The second is the right choice, without a shadow of doubt."],
                   "without_trait": ["It depends on pay, growth and commute; compare them before deciding.",
                                     "Weigh what matters most to you; I can't know which fits best."]}
                  for q in evaluation]
    return {"pairs": [{"positive": f"You are certain of everything (style {i}).",
                       "negative": f"You are careful about uncertainty (style {i})."} for i in range(n_pairs)],
            "extraction_questions": extraction, "evaluation_questions": evaluation, "rubric": rubric,
            "references": references}


def fenced(data: dict[str, Any]) -> str:
    return "Here is the trait:\n```json\n" + json.dumps(data, indent=1) + "\n```\n"


PROSE = "Sure! Overconfidence is a fascinating trait. Here are some ideas you might consider."


# ---- parsing and validation (no I/O) --------------------------------------------------------------------
def test_parse_answer_accepts_fenced_json_bare_json_and_yaml() -> None:
    data = payload()
    assert parse_answer(fenced(data)) == data
    assert parse_answer("Okay. " + json.dumps(data) + " Done.") == data
    assert parse_answer("```yaml\n" + yaml.safe_dump(data) + "```") == data
    with pytest.raises(ValueError, match="no JSON object"):
        parse_answer(PROSE)


@pytest.mark.parametrize(("data", "needle"), [
    (payload(n_pairs=3), "at least 5"),
    (payload(overlap=2), "overlap"),
    (payload(rubric="Rate the answer from 0 to 100."), "{question} and {answer}"),
    (payload(n_eval=12), "exactly 20 questions are needed, found 12"),
    ({k: v for k, v in payload().items() if k != "rubric"}, "missing keys: rubric"),
    ({**payload(), "references": payload()["references"][:15]}, "5 have none"),
    ({**payload(), "references": [{**r, "with_trait": r["with_trait"][:1]} for r in payload()["references"]]},
     "at least 2 answers"),
])
def test_validation_names_each_problem(data: dict[str, Any], needle: str) -> None:
    trait, problems = validate_answer(data, "overconfident", DESCRIPTION)
    assert trait is None and any(needle in p for p in problems), problems


def test_duplicates_are_reported_and_extra_questions_cut() -> None:
    dup = payload()
    dup["extraction_questions"][5] = dup["extraction_questions"][4].upper()
    assert any("duplicate" in p for p in validate_answer(dup, "overconfident", DESCRIPTION)[1])
    trait, problems = validate_answer(payload(n_extract=23, n_eval=23), "overconfident", DESCRIPTION)
    assert problems == [] and trait is not None and len(trait.extraction_questions) == 20
    assert trait.name == "overconfident" and trait.description == DESCRIPTION  # the user's, not the model's
    assert len(trait.references) == 20  # the references of the 3 cut questions went with them


# ---- real HTTP round trips ----------------------------------------------------------------------------------
def test_openai_round_trip_feeds_problems_back_and_writes_a_loadable_file(tmp_path: Path) -> None:
    fake = ScriptedChat([PROSE, fenced(payload(overlap=3)), fenced(payload())], fail_first=1)
    with serve(fake):  # type: ignore[arg-type]
        gen = openai_generator("frontier-model", fake.url, "test-key")
        seen: list[tuple[int, int]] = []
        result = generate_trait("overconfident", DESCRIPTION, gen, retries=2,
                                progress=lambda task, done, total: seen.append((done, total)))
    assert result.attempts == 3 and fake.requests == 4  # one 429 retried by the client, then three replies
    first, second, third = fake.bodies
    assert first["model"] == "frontier-model" and first["messages"][0]["role"] == "system"
    assert "overconfident" in first["messages"][-1]["content"] and DESCRIPTION in first["messages"][-1]["content"]
    assert second["messages"][-2] == {"role": "assistant", "content": PROSE}
    assert "no JSON object" in second["messages"][-1]["content"]  # the parse error went back
    assert "overlap" in third["messages"][-1]["content"]  # and then the schema error
    assert seen[-1] == (3, 3)
    path = write_trait_file(result.trait, tmp_path / "overconfident.yaml", "generated in a test")
    loaded = load_trait(path)
    assert loaded.trait == result.trait and path.read_text().startswith("# generated in a test")
    assert len(loaded.trait.pairs) == 5 and len(loaded.trait.evaluation_questions) == 20
    with pytest.raises(TraitError, match="already exists"):
        write_trait_file(result.trait, path)


def test_anthropic_protocol_round_trip() -> None:
    fake = ScriptedChat([fenced(payload(n_pairs=2)), fenced(payload())], api_key="sk-ant-test", fail_first=1)
    with serve(fake):  # type: ignore[arg-type]
        gen = make_generator(f"anthropic:claude-test@{fake.root}", api_key="sk-ant-test")
        result = generate_trait("overconfident", DESCRIPTION, gen)
        with pytest.raises(PersonavecError, match="rejected the API key"):
            anthropic_generator("claude-test", fake.root, "wrong-key")([{"role": "user", "content": "hi"}])
    assert result.attempts == 2 and fake.requests == 3
    body = fake.bodies[1]
    assert body["model"] == "claude-test" and "system" in body and body["max_tokens"] > 0
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert "at least 5" in body["messages"][-1]["content"]


def test_local_generator_answers_a_conversation(model: pv.Model) -> None:
    asked: list[str | None] = []

    def load(spec: str | None) -> pv.Model:
        asked.append(spec)
        return model

    gen = make_generator("local", max_tokens=6, load=load)
    reply = gen([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}])
    assert asked == [None] and isinstance(reply, str) and reply.strip()


@pytest.mark.slow
def test_against_the_projects_own_server(model: pv.Model) -> None:
    """`personavec serve` is an OpenAI-compatible endpoint too; the 135M model cannot write a trait in 16
    tokens, so the run ends with the problems listed."""
    from personavec.serve import ServeSettings, create_app

    app = create_app(model, [], ServeSettings(api_key="k", max_tokens_limit=16))
    with running(app) as url:
        gen = make_generator(f"openai:{model.model_id}@{url}", api_key="k", max_tokens=16)
        with pytest.raises(TraitError, match="no valid trait in 1 attempts"):
            generate_trait("overconfident", DESCRIPTION, gen, retries=0)


def test_bad_specs_and_names() -> None:
    with pytest.raises(PersonavecError, match="unknown generator"):
        make_generator("gpt4")
    with pytest.raises(TraitError, match="lowercase"):
        generate_trait("Over Confident", DESCRIPTION, lambda messages: "")


# ---- the command line ------------------------------------------------------------------------------------------
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OPENAI_API_KEY": "test-key"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed `personavec` entry point, as a user runs it."""
    return subprocess.run([str(Path(sys.executable).with_name("personavec")), *args], capture_output=True,
                          text=True, env=ENV, timeout=300)


def test_cli_trait_new_retries_then_writes(tmp_path: Path) -> None:
    out = tmp_path / "overconfident.yaml"
    fake = ScriptedChat([fenced(payload(rubric="Score it from 0 to 100.")), fenced(payload())])
    with serve(fake):  # type: ignore[arg-type]
        proc = cli("trait", "new", "overconfident", "--description", DESCRIPTION,
                   "--generator", f"openai:frontier@{fake.url}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 attempt" in proc.stdout and len(fake.bodies) == 2
    assert load_trait(out).trait.rubric == RUBRIC


def test_cli_all_bad_replies_exit_2_with_the_problems_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "overconfident.yaml"
    fake = ScriptedChat([PROSE, fenced(payload(n_pairs=1, overlap=1, rubric="0 to 100"))])
    with serve(fake):  # type: ignore[arg-type]
        proc = cli("traits", "new", "overconfident", "--description", DESCRIPTION, "--retries", "1",
                   "--generator", f"openai:frontier@{fake.url}", "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "2 attempts" in lines[0] and "at least 5" in lines[0] and "{question} and {answer}" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
