"""Why load_model picks bfloat16 on CPUs with native bf16: decoder forward throughput, float32 vs bfloat16.

    .venv/bin/python benchmarks/dtype_speed.py    # output: benchmarks/results/dtype_speed.txt
"""

from __future__ import annotations

import time

import torch

import personavec as pv


def tokens_per_second(model: pv.Model, ids: torch.Tensor, repeats: int = 3) -> float:
    times = []
    with torch.no_grad():
        model.hf.base_model(input_ids=ids, use_cache=False)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model.hf.base_model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t)
    return ids.numel() / sorted(times)[len(times) // 2]


def main() -> None:
    ids = torch.randint(100, 40000, (16, 128), generator=torch.Generator().manual_seed(0))
    rates = {}
    for dtype in ("float32", "bfloat16"):
        rates[dtype] = tokens_per_second(pv.load_model(dtype=dtype), ids)
        print(f"{dtype:9s} {rates[dtype]:8.0f} tokens/s (16 × 128 tokens, median of 3)")
    print(f"bfloat16 / float32: {rates['bfloat16'] / rates['float32']:.1f}x "
          f"(native bf16: {torch.cpu._is_avx512_bf16_supported()}, threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
