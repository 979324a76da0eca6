"""`personavec trait new` and the vector algebra, comparison and GGUF interop commands."""
