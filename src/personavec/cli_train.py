"""`personavec train`, `personavec shift` and `personavec data elicit`: training-time steering."""
