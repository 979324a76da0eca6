"""Shared by every test file: the embedded model loaded once per test session and dtype (tests must leave it
unsteered), the hook-id helper, an evil vector extracted once, and the command line run in-process.

The command line: `cli(*args)` runs exactly what the `personavec` console script runs (`main_with(app)`:
a user's error is one `error:` line on stderr and exit status 2) inside this process, with the loader pointed
at the session's models, so a command costs no torch import and no model load. Only what needs a real
process (the console script and `python -m` entry points themselves, signals, several processes) runs as a
subprocess."""

from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

import personavec as pv
import personavec.cli._common
import personavec.models

CLI_ENV = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one torch thread each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


#: The files that take longest under `make test` (benchmarks/results/make_test.log), longest first. They are
#: collected first and `make test` keeps that order (`--no-loadscope-reorder`; xdist would otherwise start files
#: with many tests first), so neither worker is left running a long file alone at the end.
SLOW_FILES = ("test_reproduce.py", "test_sweep.py", "test_screen.py", "test_serve.py", "test_train_ddp.py",
              "test_train.py", "test_cli.py", "test_extract.py", "test_monitor.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def hook_ids(model: pv.Model) -> list[tuple[frozenset[int], frozenset[int]]]:
    """The forward and pre-forward hook ids of every block (transformers itself may own some)."""
    return [(frozenset(b._forward_hooks), frozenset(b._forward_pre_hooks)) for b in model.layers]


def _shared(model: pv.Model) -> Iterator[pv.Model]:
    # transformers 5 installs its own output-capturing forward hooks on the blocks the first time
    # output_hidden_states=True is used; install them now so the check below can tell them from a test's.
    with torch.no_grad():
        model.hf(input_ids=torch.tensor([[3, 4]], device=model.device), output_hidden_states=True)
    baseline = hook_ids(model)
    yield model
    # Every test must remove its hooks: a leftover hook would silently change later results.
    assert hook_ids(model) == baseline, f"a test left hooks on the decoder blocks of the {model.hf.dtype} model"


@pytest.fixture(scope="session")
def model() -> Iterator[pv.Model]:
    """The embedded model as `load_model()` gives it (bfloat16 where the CPU is fast at it, else float32)."""
    torch.manual_seed(0)
    yield from _shared(pv.load_model())


@pytest.fixture(scope="session")
def model32() -> Iterator[pv.Model]:
    """The embedded model in float32: cache-vs-no-cache and batching comparisons need more precision than
    bfloat16 gives, and training on a CPU needs it. Tests that change weights (training) take a deepcopy."""
    yield from _shared(pv.load_model(dtype="float32"))


#: An evil vector this model's extraction produced (experiments/out/steering_response/evil.extract: 10
#: questions, 48-token rollouts), committed beside the monitoring experiment.
EVIL_VECTOR = Path(__file__).resolve().parents[1] / "experiments" / "out" / "monitor_eval" / "evil.pv.safetensors"


@pytest.fixture(scope="session")
def evil_vector() -> pv.PersonaVector:
    """The committed evil vector as a fresh extraction leaves it: its tensors and extraction metadata, without
    the sweep's layer choice and the monitor's calibration that later runs wrote into the file. Extracting one
    per session cost about 70 s of the suite; `test_extract.py` runs the extraction itself."""
    vec = pv.load_vector(EVIL_VECTOR)
    later = ("best_coef", "best_layer", "coherence_min", "monitor", "sweep_judge", "sweep_run")
    return pv.PersonaVector(vec.tensors, {k: v for k, v in vec.meta.items() if k not in later})


# ---- the command line, in-process ------------------------------------------------------------------------
Cli = Callable[..., Result]


class _ConsoleScript:
    """What click's test runner calls: `main(args)` runs the console script's own entry (`main_with(app)`,
    which turns a PersonavecError into one `error:` line and exit status 2) with those arguments."""

    name = "personavec"

    def main(self, args: Any = (), prog_name: str | None = None, **_: Any) -> None:
        from personavec.cli import app
        from personavec.cli._common import main_with

        argv = sys.argv
        sys.argv = [prog_name or self.name, *args]
        try:
            main_with(app)
        finally:
            sys.argv = argv


_NOT_THE_EMBEDDED_DEFAULT = ("device_map", "load_in", "layers_path", "revision", "trust_remote_code",
                             "offload_folder")


@pytest.fixture()
def cli(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """`cli(*args)` runs the command line in-process and returns click's Result (exit_code, stdout, stderr);
    it asserts exit status 0 unless `ok=False`; `columns` is the terminal width rich draws for.

    A command that loads the embedded default model gets the session's, fetched only then (a command that
    loads no model loads none): the default dtype → `model` itself (commands only read it); float32 (the
    training commands' default) → a private copy of `model32` (training injects its adapter into the model it
    is given); any other spec, device or loading option → a real load. The hub is offline, as the console
    script's tests run it."""
    import huggingface_hub.constants

    original = personavec.models.load_model

    def load_model(spec: Any = None, **kwargs: Any) -> Any:
        same_place = kwargs.get("device") in (None, "auto") and not any(
            kwargs.get(k) for k in _NOT_THE_EMBEDDED_DEFAULT)
        if spec is None and same_place:
            if kwargs.get("dtype") is None:
                return request.getfixturevalue("model")
            if kwargs["dtype"] in ("float32", "fp32", torch.float32):
                return copy.deepcopy(request.getfixturevalue("model32"))
        return original(spec, **kwargs)

    monkeypatch.setattr(personavec.models, "load_model", load_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True, columns: int = 200) -> Result:
        env = {**CLI_ENV, "COLUMNS": str(columns)}
        # rich fixes a console's width when COLUMNS is set as it is made, so the width a test asks for is
        # given to the command line's consoles directly, and their own setting restored after
        consoles = (personavec.cli._common.out, personavec.cli._common.err)
        saved = [c._width for c in consoles]
        for c in consoles:
            c.width = columns
        try:
            res = runner.invoke(_ConsoleScript(), list(args), env=env)  # type: ignore[arg-type]
        finally:
            for c, w in zip(consoles, saved, strict=True):
                c._width = w
        if ok:
            assert res.exit_code == 0, (res.output, res.exception)
        return res

    return invoke


def error_line(res: Result) -> str:
    """The one `error:` line of a user's error: exit status 2 through the console script's handler (not a
    traceback: any other exception would be the Result's exception, with status 1)."""
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def assert_user_error(res: Result, needle: str) -> None:
    assert needle in error_line(res), res.stderr


# ---- checks computed here, independently of the code under test -------------------------------------------
def visible_text(html: str) -> str:
    """A page's text as a reader sees it: without the embedded images (their base64 can hold any short string)
    and without tags."""
    return re.sub(r"<[^>]+>", "", re.sub(r'src="data:[^"]*"', "", html))


def _number(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def largest_rise(cells: list[dict[str, Any]], coherence_min: float | None = None) -> tuple[dict[str, Any], float]:
    """The sweep's choice recomputed from its cells (dicts, or cells.csv rows as strings) by the documented
    rule for the reference measure: among the trait's own positive-coefficient cells whose mean coherence (if
    measured) is at least `coherence_min` (default: half the unsteered coherence), the largest rise of the mean
    trait measure over coefficient 0. Returns that cell and its rise, and asserts the rise is strictly the
    largest, so that exactly one layer can be the right answer."""
    own = [c for c in cells if not c.get("control")]
    assert all(_number(c.get("judge_free_mean")) is None for c in own), "the rule here is the reference measure's"
    base = next(c for c in own if _number(c["coef"]) == 0)
    base_coherence = _number(base.get("coherence_mean"))
    if coherence_min is None:
        coherence_min = 0.5 * base_coherence if base_coherence is not None else float("-inf")
    rises = []
    for c in own:
        coef, coherence = _number(c["coef"]), _number(c.get("coherence_mean"))
        if coef is not None and coef > 0 and (coherence is None or coherence >= coherence_min):
            rises.append((float(c["trait_mean"]) - float(base["trait_mean"]), c))
    rises.sort(key=lambda r: r[0], reverse=True)
    assert rises and (len(rises) == 1 or rises[0][0] > rises[1][0]), rises
    return rises[0][1], rises[0][0]
