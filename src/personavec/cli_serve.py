"""`personavec serve`: the steering-aware, monitoring OpenAI-compatible server."""
