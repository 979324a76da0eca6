"""Why load_model picks bfloat16 on CPUs with native bf16: decoder forward throughput, float32 vs bfloat16.

    .venv/bin/python benchmarks/dtype_speed.py    # output: benchmarks/results/dtype_speed.txt
"""

from __future__ import annotations

import torch
from cpu_floor import median_seconds  # a sibling script: `python benchmarks/…` puts benchmarks/ on the path

import personavec as pv


def tokens_per_second(model: pv.Model, ids: torch.Tensor, repeats: int = 3) -> float:
    with torch.no_grad():
        return ids.numel() / median_seconds(lambda: model.hf.base_model(input_ids=ids, use_cache=False), repeats)


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
