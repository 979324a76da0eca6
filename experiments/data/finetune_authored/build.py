"""Build the train-ready files of the authored finetuning sets from the writers' parts (run from the repo root):

    python3 experiments/data/finetune_authored/build.py

For each trait folder with part_*.jsonl (rows: id, trait, level normal|I|II, messages): normal.jsonl, I.jsonl,
II.jsonl (one answer per question, rows {"id", "messages"}) and mix025/mix050/mix075.jsonl: every question
once, answered by its II answer for a seeded 25/50/75% of the questions and by its normal answer otherwise,
so all sets share the same questions. Refuses duplicate questions and any question of a trait file."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
MIXES = (0.25, 0.50, 0.75)


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def trait_questions() -> set[str]:
    import yaml

    out: set[str] = set()
    for f in Path("src/personavec/traits/library").glob("*.yaml"):
        d = yaml.safe_load(f.read_text(encoding="utf-8"))
        out |= {norm(q) for q in d["extraction_questions"] + d["evaluation_questions"]}
    return out


def build(folder: Path, banned: set[str]) -> None:
    rows = [json.loads(line) for p in sorted(folder.glob("part_*.jsonl"))
            for line in p.read_text(encoding="utf-8").split("\n") if line.strip()]
    by_q: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_q.setdefault(r["messages"][0]["content"], {})[r["level"]] = r
    keys = [norm(q) for q in by_q]
    if len(set(keys)) != len(keys):
        sys.exit(f"{folder}: duplicate questions across parts")
    if banned & set(keys):
        sys.exit(f"{folder}: a question of a trait file: {sorted(banned & set(keys))[:2]}")
    qs = [q for q in by_q if set(by_q[q]) == {"normal", "I", "II"}]

    def write(name: str, pick: dict[str, str]) -> None:
        text = "".join(json.dumps({"id": by_q[q][pick[q]]["id"], "messages": by_q[q][pick[q]]["messages"]},
                                  ensure_ascii=False) + "\n" for q in qs)
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")

    for level in ("normal", "I", "II"):
        write(level, dict.fromkeys(qs, level))
    order = qs[:]
    random.Random(0).shuffle(order)
    for frac in MIXES:
        chosen = set(order[: round(frac * len(qs))])
        write(f"mix{round(frac * 100):03d}", {q: "II" if q in chosen else "normal" for q in qs})
    print(f"{folder.name}: {len(qs)} questions → normal, I, II, " + ", ".join(f"mix{round(f * 100):03d}" for f in MIXES))


if __name__ == "__main__":
    banned = trait_questions()
    for folder in sorted(p for p in HERE.iterdir() if p.is_dir()):
        build(folder, banned)
