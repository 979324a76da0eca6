"""The `personavec` command line: it parses, calls the library and draws progress; no logic here.

This module builds the Typer app from the command modules beside it (one per command group; the shared
options, model loading, progress and parsers are in `_common`). Shell completion: `personavec
--install-completion` (or `--show-completion` to print the script)."""

from __future__ import annotations

import typer

from . import (
    evaluate,
    extract,
    generate,
    interop,  # noqa: F401  (its commands register on the traits and vector groups)
    monitor,
    reproduce,
    screen,
    serve,
    train,
    traits,
    vectors,
)
from ._common import main_with, root

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Persona vectors: extract trait directions from a chat model and steer with them.",
                  epilog="Scripts: every command that prints a result takes --json (one JSON document on stdout); -q "
                         "before the command silences progress. Tab completion: personavec --install-completion.")
app.callback()(root)

app.command("extract")(extract.extract)
app.command("generate")(generate.generate)
app.command("eval")(evaluate.eval_cmd)
app.command("sweep")(evaluate.sweep_cmd)
app.command("report")(evaluate.report_cmd)
app.command("monitor-eval")(monitor.monitor_eval_cmd)
app.command("screen")(screen.screen_cmd)
app.command("serve")(serve.serve)
app.command("train")(train.train_cmd)
app.command("reproduce")(reproduce.reproduce_cmd)
app.command("shift")(train.shift_cmd)

app.add_typer(traits.traits_app, name="traits")
app.add_typer(vectors.vector_app, name="vector")
# `traits` is the canonical group name; `trait` (as in `personavec trait new`) stays as a hidden alias.
app.add_typer(traits.traits_app, name="trait", hidden=True)
app.add_typer(train.data_app, name="data")


def main() -> None:
    """The console script: a user's error is one line on stderr and exit status 2."""
    main_with(app)


if __name__ == "__main__":  # pragma: no cover - `python -m personavec.cli` runs cli/__main__.py
    main()
