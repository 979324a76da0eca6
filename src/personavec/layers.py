"""Find the decoder blocks of a causal LM.

Layer numbering used everywhere in personavec: index 0 is the embedding output (the input of block 0),
index L (1..n_layers) is the output of decoder block L-1 counted from zero, i.e. "after L blocks".
A vector for layer L is therefore added by a hook on block L-1.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import LayerError

# Dotted paths tried in order; they cover Llama, Mistral, Qwen2, Gemma, Phi (model.layers),
# GPT-2 / GPT-J / Falcon (transformer.h), GPT-NeoX / Pythia (gpt_neox.layers), OPT (model.decoder.layers),
# multimodal wrappers (model.language_model.layers) and PEFT wrappers (base_model.model.…).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "transformer.blocks",
    "backbone.layers",
    "layers",
    "h",
)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    cur: object = module
    for part in path.split("."):
        if not hasattr(cur, part):
            return None
        cur = getattr(cur, part)
    return cur if isinstance(cur, nn.Module) else None


def _n_layers_from_config(model: nn.Module) -> int | None:
    from .models import text_config  # models imports this module

    config = getattr(model, "config", None)
    if config is None:
        return None
    config = text_config(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList of decoder blocks). `path` overrides discovery."""
    if path is not None:
        found = _get(model, path)
        if not isinstance(found, nn.ModuleList):
            raise LayerError(f"layers path '{path}' is not a ModuleList in {type(model).__name__}; "
                             "check the name with print(model)")
        return path, found
    for prefix in ("", "base_model.model.", "base_model."):
        for candidate in LAYER_PATHS:
            found = _get(model, prefix + candidate)
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                return prefix + candidate, found
    expected = _n_layers_from_config(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == expected:
            return name, module
    raise LayerError(f"cannot find the decoder blocks of {type(model).__name__}; "
                     "pass layers_path='dotted.path.to.blocks' (e.g. 'model.layers')")


def check_layer(layer: int, n_layers: int) -> int:
    """Validate a layer index in personavec numbering (1..n_layers are steerable block outputs)."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LayerError(f"layer must be an integer, got {layer!r}")
    if not 1 <= layer <= n_layers:
        raise LayerError(f"layer {layer} is out of range: this model has layers 1..{n_layers} "
                         "(0 is the embedding output and cannot be steered)")
    return layer


def module_device(module: nn.Module) -> torch.device | None:
    """The device a module computes on: accelerate's execution device when a `device_map` dispatched it (its
    weights may then sit on 'meta' while offloaded to the CPU or disk), else the device of its first parameter
    or buffer that is not on 'meta'; None when neither says."""
    hook = getattr(module, "_hf_hook", None)
    for h in (hook, *getattr(hook, "hooks", ())):  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return next((t.device for t in itertools.chain(module.parameters(), module.buffers())
                 if t.device.type != "meta"), None)


def block_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder block's output (a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def block_hooks(blocks: Iterable[nn.Module]) -> list[Callable[..., Any]]:
    """The forward and pre-forward hooks on `blocks` that are not transformers' own (transformers 5 adds
    output-capturing hooks the first time output_hidden_states is used; they change no output)."""
    return [h for b in blocks for h in (*b._forward_hooks.values(), *b._forward_pre_hooks.values())
            if not str(getattr(h, "__module__", "")).startswith("transformers.")]
