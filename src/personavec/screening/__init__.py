"""The parts of `personavec screen` (projection-difference screening of training data), one concept each:
rows (what a valid conversation is), source (streaming chunked reading of JSONL/Parquet), score (ΔP of one
chunk on one model), stats (ranks, flags, confidence intervals), ray_backend (the same chunks on Ray Data).
The orchestration lives in `personavec.screen`."""
