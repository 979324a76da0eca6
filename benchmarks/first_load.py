"""A first load's GGUF conversion (what every new user and every fresh CI machine pays once): personavec's path,
which parses the file once for transformers' three reads and builds gguf's tensor-name table once, against
transformers' own path (a parse to check the file, then a parse each for the config, the tokenizer and the
weights), in the same process, each into an empty cache folder; the two folders must be byte for byte equal.

    .venv/bin/python benchmarks/first_load.py [--threads 1]   # output: benchmarks/results/first_load.txt
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

from personavec import models


@contextlib.contextmanager
def transformers_own_path(gguf: Path) -> Iterator[None]:
    """The conversion before personavec shared the parse: a separate parse that checks the file, then
    transformers reading it as it does by itself."""
    import gguf as gguf_pkg

    gguf_pkg.GGUFReader(str(gguf))
    yield


def convert(folder: Path, baseline: bool) -> tuple[float, int]:
    """Seconds to convert, and how many times the file was parsed (GGUFReader objects made)."""
    import gguf as gguf_pkg

    parses = 0
    real_init = gguf_pkg.GGUFReader.__init__

    def counted(self: object, *args: object, **kwargs: object) -> None:
        nonlocal parses
        parses += 1
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    patch = mock.patch.object(models, "_parsed_once", transformers_own_path) if baseline else contextlib.nullcontext()
    t = time.perf_counter()
    with patch, mock.patch.object(gguf_pkg.GGUFReader, "__init__", counted):
        models._convert(models.embedded_gguf(), folder)
    return time.perf_counter() - t, parses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        convert(root / "warm-up", baseline=False)  # imports and the file in the page cache, for both runs alike
        (own, own_parses), (theirs, their_parses) = (convert(root / "personavec", baseline=False),
                                                     convert(root / "transformers", baseline=True))
        files = sorted(p.name for p in (root / "personavec").iterdir())
        same = files == sorted(p.name for p in (root / "transformers").iterdir()) and all(
            (root / "personavec" / f).read_bytes() == (root / "transformers" / f).read_bytes() for f in files)
    print(f"embedded GGUF ({models.EMBEDDED_FILE}) → safetensors folder, {args.threads} thread(s)")
    print(f"transformers' own path   {theirs:6.1f} s, the file parsed {their_parses} times")
    print(f"personavec               {own:6.1f} s, the file parsed {own_parses} time(s)")
    print(f"ratio transformers / personavec: {theirs / own:.2f}x; folders byte for byte equal: {same} ({len(files)} files)")


if __name__ == "__main__":
    main()
