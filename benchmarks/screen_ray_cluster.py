"""`personavec screen --ray ADDRESS` against a real Ray cluster: a head node started with `ray start --head`
on loopback (one node, 2 CPUs; a multi-machine cluster joins more nodes to the same head), driven through
the CLI exactly as a user would, compared with the single-process CLI run on the same data.

    python benchmarks/screen_ray_cluster.py --out benchmarks/results/screen_ray_cluster [--n 500] [--fast]

Ray's token authentication is on (RAY_AUTH_MODE=token for the head and the client). The cluster's temp
folder is private and the head is stopped at the end (`ray stop`, which stops every Ray process of this user
on this machine: do not run it beside other Ray work). Prints wall times, the ratio and the largest |ΔP|
difference; writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).parent))
from screen_speed import write_data

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def screen(data: Path, out: Path, args: argparse.Namespace, *extra: str, env: dict[str, str] | None = None) -> float:
    cmd = [str(BIN / "personavec"), "screen", str(data), "--vector", args.vector, "--out", str(out),
           "--max-new-tokens", "16", "--chunk-size", "128", "--cache", str(out.with_suffix(".sqlite")),
           *(["--fast"] if args.fast else []), *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/screen_ray_cluster"))
    ap.add_argument("--vector", default="experiments/out/steering_response/evil.pv.safetensors")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--fast", action="store_true", help="fast mode (default: full mode, base answers generated)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="screen-ray-cluster-"))
    data = work / "data.jsonl"
    write_data(data, args.n)
    single_s = screen(data, work / "single.csv", args)
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    # The `ray start` head of Ray 2.60 here enables token authentication; a client joining by address must say so.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", str(temp),
                    "--disable-usage-stats"], check=True, env=env, stdout=subprocess.DEVNULL)
    try:
        ray_s = screen(data, work / "ray.csv", args, "--ray", f"127.0.0.1:{port}", "--workers", "2",
                       "--cpus-per-worker", "1", env=env)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(temp, ignore_errors=True)
    a, b = (pacsv.read_csv(work / f"{name}.csv") for name in ("single", "ray"))
    same_rows = a.column("index").to_pylist() == b.column("index").to_pylist()
    diff = float(np.abs(np.array(a.column("evil_delta_p").to_pylist())
                        - np.array(b.column("evil_delta_p").to_pylist())).max())
    mode = "fast" if args.fast else "full"
    report = {"command": " ".join(sys.argv), "mode": mode, "n": args.n, "single_process_s": single_s,
              "ray_cluster_s": ray_s, "ratio_single_over_ray": single_s / ray_s, "same_rows": same_rows,
              "max_abs_diff_delta_p": diff, "cluster": "ray start --head on 127.0.0.1, 2 CPUs, 2 actors x 1 CPU",
              "load_average_at_end": os.getloadavg()}
    print(f"{mode} n={args.n}: single process {single_s:.1f}s, Ray cluster at 127.0.0.1:{port} (2 actors) "
          f"{ray_s:.1f}s -> ratio {single_s / ray_s:.2f} (both include model loading); same rows {same_rows}; "
          f"max |ΔP difference| {diff:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
