"""Vectors that travel: llama.cpp / repeng control-vector GGUF files (``personavec.interop.gguf``)."""

from __future__ import annotations

from .gguf import export_gguf, from_llama_cpp, import_gguf, read_control_vector, to_llama_cpp

__all__ = ["export_gguf", "from_llama_cpp", "import_gguf", "read_control_vector", "to_llama_cpp"]
