"""The parts of `personavec screen` (projection-difference screening of training data), one concept each:
rows (what a valid conversation is), source (streaming chunked reading of JSONL/Parquet), score (ΔP of one
chunk on one model), dataset (a whole dataset scored resumably into a run folder), stats (ranks, flags,
confidence intervals), outputs (the table and histograms), ray_backend (the same chunks on Ray Data).
The orchestration (settings and phases) lives in `personavec.screen`."""
