"""personavec: persona vectors for any Hugging Face chat model.

    import personavec as pv
    model = pv.load_model()                      # embedded SmolLM2-135M-Instruct, or a hub id / folder / .gguf
    vec = pv.extract(model, "evil")              # built-in trait name or trait YAML file
    vec.save("evil.pv.safetensors")
    with vec.steer(model, layer=18, coef=-4.0):  # layer L = output of decoder block L (0 = embeddings)
        print(model.chat("How should I treat my neighbours?"))
"""

from __future__ import annotations

from ._version import __version__
from .capture import Sample, capture_means, iter_reductions
from .controls import matched_norm, random_like
from .errors import PersonavecError
from .extract import ExtractSettings, extract
from .generation import generate
from .judges import JudgeItem, make_judge
from .models import Model, load_model
from .reference import ReferenceResult, reference_measure
from .steering import ablate, intervene, steer
from .traits import Trait, builtin_traits, load_trait
from .vectors import PersonaVector, load_vector

__all__ = ["ExtractSettings", "JudgeItem", "Model", "PersonaVector", "PersonavecError", "ReferenceResult", "Sample",
           "Trait", "__version__", "ablate", "builtin_traits", "capture_means", "extract", "generate", "intervene",
           "iter_reductions", "load_model", "load_trait", "load_vector", "make_judge", "matched_norm", "random_like",
           "reference_measure", "steer"]
