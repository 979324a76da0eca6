"""How close the embedded model runs to this CPU's own limits, on one thread (what each `make test` worker gets):
the float32 matrix-product peak beside a batched decoder forward (compute-bound), and the memory-copy rate
beside one decode step (bound by reading the weights). A suite that already runs near both limits can only
get faster by doing fewer tokens' work. The forward's GFLOPS count 2 FLOPs per weight per token (attention's
own products, small at 64 tokens, are left out, so the figure is a slight underestimate).

    .venv/bin/python benchmarks/cpu_floor.py    # output: benchmarks/results/cpu_floor.txt
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import personavec as pv
from personavec.models import cache_kwarg, output_cache


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 576, generator=g), torch.randn(576, 1536, generator=g)
    peak = 2 * 512 * 576 * 1536 / median_seconds(lambda: a @ b, 20) / 1e9
    src = torch.randn(64 * 1024 * 1024, generator=g)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src)) / 1e9  # bytes read + written

    model = pv.load_model(dtype="float32")
    decoder = model.hf.get_decoder()
    n_params = sum(p.numel() for p in decoder.parameters()) - decoder.get_input_embeddings().weight.numel()
    head = model.hf.get_output_embeddings().weight
    ids = torch.randint(100, 40000, (8, 64), generator=g)
    with torch.no_grad():
        fwd = median_seconds(lambda: decoder(input_ids=ids, use_cache=False))
        prompt = torch.randint(100, 40000, (3, 40), generator=g)
        cache = output_cache(model.hf(input_ids=prompt, use_cache=True, logits_to_keep=1))
        last, key = prompt[:, -1:], cache_kwarg(model.hf)

        def step() -> None:  # the cache grows by one position a step: 40 → 50 over the runs
            model.hf(input_ids=last, use_cache=True, **{key: cache})

        dec = median_seconds(step, 9)
    gflops = ids.numel() * 2 * n_params / fwd / 1e9
    weight_bytes = (n_params + head.numel()) * 4
    print(f"torch {torch.__version__}, 1 thread, float32; AVX-512 bf16: {torch.cpu._is_avx512_bf16_supported()}")
    print(f"matrix product 512x576 @ 576x1536      {peak:6.1f} GFLOPS (this CPU's practical peak)")
    print(f"decoder forward, 8 x 64 tokens           {gflops:6.1f} GFLOPS ({gflops / peak:.0%} of the peak; "
          f"{ids.numel() / fwd:.0f} tokens/s, {n_params / 1e6:.0f}M weights without the embeddings)")
    print(f"memory copy                              {copy_gbs:6.1f} GB/s (bytes read + written)")
    read_gbs = copy_gbs / 2  # a copy reads each byte once and writes it once
    print(f"one decode step, 3 rows, LM head included {dec * 1e3:4.0f} ms: it reads {weight_bytes / 1e6:.0f} MB of weights, "
          f"{weight_bytes / dec / 1e9:.1f} GB/s against the copy's read rate of {read_gbs:.1f} GB/s "
          f"(floor {weight_bytes / read_gbs / 1e6:.0f} ms)")

if __name__ == "__main__":
    main()
