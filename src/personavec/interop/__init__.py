"""Vectors and trait files that travel: llama.cpp / repeng control-vector GGUF files (``personavec.interop.gguf``),
the persona_vectors reference implementation's .pt vectors and trait JSON files
(``personavec.interop.reference_impl``), and Hugging Face style folders with a model card
(``personavec.interop.pretrained``; also ``PersonaVector.save_pretrained`` / ``from_pretrained``)."""

from __future__ import annotations

from .gguf import export_gguf, from_llama_cpp, import_gguf, read_control_vector, to_llama_cpp
from .pretrained import model_card
from .reference_impl import (
    export_reference_vector,
    from_reference_layer,
    import_reference_traits,
    import_reference_vector,
    to_reference_layer,
)

__all__ = ["export_gguf", "export_reference_vector", "from_llama_cpp", "from_reference_layer", "import_gguf",
           "import_reference_traits", "import_reference_vector", "model_card", "read_control_vector",
           "to_llama_cpp", "to_reference_layer"]
