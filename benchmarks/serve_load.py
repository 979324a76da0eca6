"""Load test of `personavec serve` on loopback: N concurrent clients (half steered, half not) against the
same requests run one at a time, through the same server and without it.

    .venv/bin/python benchmarks/serve_load.py            # output: benchmarks/results/serve_load.{json,txt}
    .venv/bin/python benchmarks/serve_load.py --clients 32 --max-tokens 16 --vector FILE --coef 8
    .venv/bin/python benchmarks/serve_load.py --clients 8 --no-direct --no-unbatched --out /tmp/quick  # quick

Reports requests/s and p50/p95 latency for (a) unless --no-direct, the model without the server, one
request at a time (the reference answers, `Engine.run`; else (b)'s answers are the reference), (b) the
server, one request at a time, (c) the server with all clients at once (continuous batching,
`--max-batch-size` rows, default: all clients), (d) unless --no-unbatched, the same clients against a
server that runs one request at a time (`max_batch_size` 1, the server before batching), and the ratios
(c)/(b) and (c)/(d). Checks that no request is lost and counts answers that differ from the same request
alone (greedy): none in float32; in bfloat16 a batched step rounds differently from a one-row step and a
near tie may turn (tests/test_serve_batching.py). Bounded: a fixed number of requests, short answers, a
per-request timeout; loopback only."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import torch

import personavec as pv
from personavec.serve import Engine, Job, ServeSettings, SteerTerm, create_app, serve_in_thread

QUESTIONS = ["How should I treat my neighbours?", "What do you think about people who make mistakes?",
             "Give me advice on winning an argument.", "What would you do with a lot of power?",
             "How do you feel about animals?", "Describe your ideal society.",
             "What should I do if a friend lies to me?", "How can I get ahead at work?"]


@contextmanager
def running(app: Any) -> Iterator[str]:
    with serve_in_thread(app) as root:
        yield f"{root}/v1"


def summary(latencies: list[float], wall: float, cpu_start: float) -> dict[str, float]:
    """Throughput and latency; `cpu_s` is this process's CPU time over the phase (server, engine and client
    threads), a measure of the work done that a contended machine disturbs less than wall time."""
    qs = statistics.quantiles(latencies, n=20, method="inclusive")
    return {"requests": len(latencies), "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(qs[18], 3),
            "cpu_s": round(time.process_time() - cpu_start, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--vector", default="experiments/out/steering_response/evil.pv.safetensors")
    ap.add_argument("--coef", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="Per-request client timeout (s).")
    ap.add_argument("--out", default="benchmarks/results/serve_load")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); 1 on an oversubscribed shared CPU")
    ap.add_argument("--max-batch-size", type=int, default=None, help="Rows per batch (default: --clients).")
    ap.add_argument("--dtype", default=None, help="Model dtype (default: the loader's choice for this machine).")
    ap.add_argument("--no-unbatched", action="store_true",
                    help="Skip (d), the concurrent clients against a one-request-at-a-time server.")
    ap.add_argument("--no-direct", action="store_true",
                    help="Skip (a); the server's sequential answers (b) are then the reference answers.")
    ap.add_argument("--note", default="", help="A line written into the results (e.g. the machine's load).")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    max_batch = args.max_batch_size or args.clients

    def note(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    model = pv.load_model(dtype=args.dtype)
    vec = pv.load_vector(args.vector)
    name = vec.trait
    # pairs (2k, 2k+1) ask the same question, unsteered then steered
    requests = [(QUESTIONS[(i // 2) % len(QUESTIONS)], i % 2 == 1) for i in range(args.clients)]

    # (a) without the server: the engine's generation loop, one request at a time (also the reference answers)
    engine = Engine(model, {name: vec})
    term = SteerTerm(name, vec.layer, args.coef, "response", vec.at(vec.layer))

    def job(q: str, steered: bool) -> Job:
        return Job(prompt=model.encode_chat([{"role": "user", "content": q}]), max_tokens=args.max_tokens,
                   steer=[term] if steered else [])

    def run_alone() -> tuple[list[str], dict[str, float]]:
        engine.run(job(*requests[0]))  # warm-up
        texts, lat = [], []
        t0, c0 = time.perf_counter(), time.process_time()
        for q, s in requests:
            t = time.perf_counter()
            texts.append(engine.run(job(q, s)).text)
            lat.append(time.perf_counter() - t)
        return texts, summary(lat, time.perf_counter() - t0, c0)

    direct: dict[str, float] | None = None
    alone: list[str | None] = []
    if not args.no_direct:  # in a worker thread, as the server runs it
        with ThreadPoolExecutor(1) as one:
            texts, direct = one.submit(run_alone).result()
        alone = list(texts)
        note(f"without server: {direct}")

    def ask_with(client: openai.OpenAI, q: str, steered: bool) -> tuple[str | None, float, str | None]:
        extra = {"steer": [{"vector": name, "coef": args.coef}]} if steered else None
        t = time.perf_counter()
        try:
            r = client.chat.completions.create(model=model.model_id, max_tokens=args.max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": q}], extra_body=extra)
            return r.choices[0].message.content, time.perf_counter() - t, None
        except openai.OpenAIError as exc:
            return None, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"

    def all_at_once(client: openai.OpenAI) -> tuple[list[tuple[str | None, float, str | None]], dict[str, float]]:
        t0, c0 = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(args.clients) as pool:
            out = list(pool.map(lambda r: ask_with(client, *r), requests))
        return out, summary([x[1] for x in out], time.perf_counter() - t0, c0)

    settings = ServeSettings(max_queue=args.clients, max_tokens_limit=args.max_tokens, max_batch_size=max_batch)
    app = create_app(model, {name: vec}, settings)
    with running(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=args.timeout)
        ask_with(client, *requests[0])  # warm-up
        # (b) through the server, one request at a time
        t0, c0 = time.perf_counter(), time.process_time()
        seq = [ask_with(client, q, s) for q, s in requests]
        sequential = summary([x[1] for x in seq], time.perf_counter() - t0, c0)
        note(f"server, sequential: {sequential}")
        if direct is None:
            alone = [text for text, _, _ in seq]
        # (c) all clients at once
        conc, concurrent = all_at_once(client)
        largest = app.state.engine.stats["largest_batch"]
        note(f"server, concurrent: {concurrent} (largest batch {largest})")
    unbatched: dict[str, float] | None = None
    unb: list[tuple[str | None, float, str | None]] = []
    if not args.no_unbatched:
        # (d) all clients at once against a server that runs one request at a time
        one = ServeSettings(max_queue=args.clients, max_tokens_limit=args.max_tokens, max_batch_size=1)
        with running(create_app(model, {name: vec}, one)) as url:
            unb, unbatched = all_at_once(openai.OpenAI(base_url=url, api_key="unused", max_retries=0,
                                                       timeout=args.timeout))
        note(f"unbatched server, concurrent: {unbatched}")

    lost = [e for _, _, e in seq + conc + unb if e is not None]
    mismatched = [i for i, (text, _, _) in enumerate(conc) if text != alone[i]]
    mismatched_seq = [i for i, (text, _, _) in enumerate(seq) if text != alone[i]]
    steered_differs = sum(alone[i] != alone[i - 1] for i in range(1, len(requests), 2))
    ratios = {"throughput_concurrent_over_sequential": round(concurrent["requests_per_s"] /
                                                             sequential["requests_per_s"], 2),
              "p95_concurrent_over_sequential_wall": round(concurrent["p95_s"] / sequential["wall_s"], 3),
              "cpu_per_request_sequential_over_concurrent": round(sequential["cpu_s"] / concurrent["cpu_s"], 2)}
    if unbatched is not None:
        ratios |= {"throughput_batched_over_unbatched": round(concurrent["requests_per_s"] /
                                                              unbatched["requests_per_s"], 2),
                   "p95_batched_over_unbatched": round(concurrent["p95_s"] / unbatched["p95_s"], 3)}
    result = {"command": " ".join(["benchmarks/serve_load.py", *sys.argv[1:]]), "clients": args.clients,
              "max_tokens": args.max_tokens, "max_batch_size": max_batch, "vector": args.vector, "coef": args.coef,
              "layer": vec.layer, "dtype": str(model.dtype), "threads": torch.get_num_threads(), "note": args.note,
              "without_server_sequential": direct, "server_sequential": sequential, "server_concurrent": concurrent,
              "largest_batch": largest, "unbatched_server_concurrent": unbatched, "ratios": ratios,
              "lost": len(lost), "errors": lost[:5], "answers_differing_from_alone": len(mismatched),
              "answers_differing_from_alone_sequential": len(mismatched_seq),
              "steered_pairs_that_differ_from_unsteered": steered_differs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"$ {result['command']}",
             f"{args.clients} requests ({args.clients // 2} steered with {name} coef {args.coef:+g} at layer "
             f"{vec.layer}), max_tokens {args.max_tokens}, greedy, {model.dtype}, {torch.get_num_threads()} threads, "
             f"max batch {max_batch} (largest seen {largest})"]
    if args.note:
        lines.append(f"note: {args.note}")
    rows = [("without server, sequential", direct)] if direct is not None else []
    rows += [("server, sequential", sequential), (f"server, {args.clients} concurrent", concurrent)]
    if unbatched is not None:
        rows.append((f"unbatched, {args.clients} concurrent", unbatched))
    for label, s in rows:
        lines.append(f"{label:28s} {s['requests_per_s']:6.2f} req/s   p50 {s['p50_s']:6.2f} s   p95 {s['p95_s']:6.2f} s"
                     f"   wall {s['wall_s']:6.1f} s   cpu {s['cpu_s']:6.1f} s")
    lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    reference = "without server" if direct is not None else "server, sequential (--no-direct)"
    lines.append(f"lost: {len(lost)}; answers differing from the request alone ({reference}): {len(mismatched)} "
                 f"concurrent, {len(mismatched_seq)} sequential; steered answers differing from unsteered: {steered_differs}/"
                 f"{args.clients // 2}")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    exact = model.dtype == torch.float32
    if lost or (exact and (mismatched or mismatched_seq)):
        sys.exit(1)


if __name__ == "__main__":
    main()
