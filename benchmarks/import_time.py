"""What a command pays before it does anything: `import personavec` and `personavec --help` in fresh
interpreters, against the same with scipy.stats imported first (what every import paid while `personavec.stats`
imported it at module level), median of several runs each, in one process.

    .venv/bin/python benchmarks/import_time.py [--repeats 7]   # output: benchmarks/results/import_time.txt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CASES = {
    "import personavec": "import personavec",
    "personavec --help": "import sys; sys.argv = ['personavec', '--help']; from personavec.cli import main; main()",
}
EAGER_SCIPY = "import scipy.stats; "


def median_run(code: str, repeats: int) -> float:
    """Median wall seconds of `python -c code` in a fresh interpreter (one untimed run first: the page cache)."""
    times = []
    for k in range(repeats + 1):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=False, stdout=subprocess.DEVNULL)
        if k:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"fresh interpreters, median of {args.repeats}")
    for name, code in CASES.items():
        lazy, eager = median_run(code, args.repeats), median_run(EAGER_SCIPY + code, args.repeats)
        print(f"{name:18s} {lazy:5.2f} s; with scipy.stats imported first {eager:5.2f} s; ratio {eager / lazy:.2f}x")


if __name__ == "__main__":
    main()
