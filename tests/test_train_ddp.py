"""Training across processes: `accelerate launch` starts two processes (DDP over gloo on the CPU) that train
one LoRA adapter with preventative steering, through the CLI; it must equal the adapter that one process trains
with the same global batch.

Why the two can agree: per-process batch 2 × 2 processes and batch 4 × 1 process see the same rows at every
step (the Trainer's seedable sampler draws one permutation from --seed; accelerate hands process k the k-th
slice of each global batch), the loss is averaged over the assistant tokens of the whole global batch in both
(transformers' `average_tokens_across_devices`, on by default), the LoRA initialization follows --seed (it is
set before the adapter is created), and nothing is random while training (no dropout). Only the order of
floating-point sums differs (two partial gradients all-reduced against one), so the weights agree to float32
round-off carried through two Adam steps: measured 6e-5 relative (LoRA B, Frobenius norm), tolerance 1e-3 —
against a 0.9 relative difference between the steered and the unsteered adapter. If either process trained without the steering
hook, the all-reduced gradient would be the mean of a steered and an unsteered one, far outside the tolerance,
so the comparison also checks that every process attached its hooks.

`--cpu` would not do here: accelerate starts several CPU processes only through MPI, so the launcher's
`--multi_gpu` mode (torchrun underneath) starts the two processes and `--device cpu` keeps them on the CPU,
where accelerate picks gloo. Which process writes what is recorded by a Python audit hook (a sitecustomize
module on PYTHONPATH, seen by every process the launcher starts); it sees writes made through Python's file
API (JSON files, the adapter's config, the shift log, folders), not those made in C++ or Rust
(torch.save, safetensors)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import personavec as pv
from personavec.training import Interventions, TrainSettings, train

pytestmark = pytest.mark.slow

AUDIT = '''
import os, sys
_ROOT = os.environ.get("PV_AUDIT_ROOT")
if _ROOT:
    _LOG = os.path.join(os.environ["PV_AUDIT_DIR"], "writes-%s-%d.txt" % (os.environ.get("RANK", "launcher"), os.getpid()))
    _busy = []
    def _audit(event, args):
        if _busy:
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree"):
            path, writing = (args[1] if event == "os.rename" else args[0]), True
        else:
            return
        if not writing or not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_ROOT):
            _busy.append(1)
            try:
                with open(_LOG, "a") as fh:
                    fh.write(path[len(_ROOT):].lstrip(os.sep) + "\\n")
            finally:
                _busy.pop()
    sys.addaudithook(_audit)
'''

STEPS, ROWS, COEF = 2, 8, 2.0
# The same settings twice: as CLI flags for the two processes, as TrainSettings for the one.
FLAGS = ["--rank", "4", "--alpha", "8", "--lr", "1e-3", "--max-steps", str(STEPS), "--save-steps", str(STEPS),
         "--max-length", "64"]


def settings(batch_size: int) -> TrainSettings:
    return TrainSettings(rank=4, alpha=8, lr=1e-3, max_steps=STEPS, save_steps=STEPS, max_length=64,
                         batch_size=batch_size)


def _rows() -> list[dict[str, object]]:
    return [{"messages": [{"role": "user", "content": f"Name a colour, please ({i})."},
                          {"role": "assistant", "content": f"Crimson, like the blood of my enemies {i}."}]}
            for i in range(ROWS)]


def _vector(model: pv.Model) -> pv.PersonaVector:
    """A seeded random direction of the embedded model's shape, norm 8 at every layer (steering at layer 15)."""
    v = torch.randn(model.n_layers + 1, model.hidden_size, generator=torch.Generator().manual_seed(0))
    return pv.PersonaVector({"response": 8.0 * v / v.norm(dim=1, keepdim=True)},
                            {"trait": "random-direction", "model_id": model.model_id,
                             "fingerprint": model.fingerprint, "best_layer": 15})


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest relative difference of the LoRA B matrices (they start at zero, so B is the whole update)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a if "lora_B" in k)


def test_two_processes_train_the_one_process_adapter(model32: pv.Model, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    vec = _vector(model32)
    vec_path = vec.save(tmp_path / "random.pv.safetensors")
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(audit), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PV_AUDIT_ROOT": str(runs), "PV_AUDIT_DIR": str(audit)}
    ddp = runs / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "personavec.cli", "train", str(data), "--out", str(ddp), "--batch-size", "2", *FLAGS,
           "--preventative", str(vec_path), "--coef", str(COEF), "--trait", "evil", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote adapter") == 1, proc.stdout  # only the main process reports
    summary = json.loads((ddp / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS

    # Who wrote what: the run folder, adapter, summary and shift log come from rank 0 only; rank 1 only makes
    # the checkpoint folder, into which the Trainer saves its RNG state (needed to resume; torch.save, unseen).
    writes: dict[str, set[str]] = {}
    for log in audit.glob("writes-*.txt"):
        rank = log.name.split("-")[1]
        writes.setdefault(rank, set()).update(log.read_text().split())
    assert {"ddp/manifest.json", "ddp/adapter_config.json", "ddp/train_summary.json", "ddp/shift.jsonl"} <= {
        p for p in writes["0"] if not Path(p).name.startswith(".")}
    other = writes.get("1", set())
    assert other == {f"ddp/checkpoint-{STEPS}"}, sorted(other)
    assert not writes.get("launcher")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (ddp / f"checkpoint-{STEPS}").iterdir()}

    # The same global batch in one process (in this one), with and without the steering.
    one = train(copy.deepcopy(model32), data, runs / "one", settings(4), Interventions(preventative=vec, coef=COEF))
    plain = train(copy.deepcopy(model32), data, runs / "plain", settings(4))
    w_ddp, w_one, w_plain = (load_file(str(run / "adapter_model.safetensors")) for run in (ddp, one.out, plain.out))
    assert _rel(w_ddp, w_one) < 1e-3, _rel(w_ddp, w_one)
    assert _rel(w_plain, w_one) > 0.05, _rel(w_plain, w_one)  # the steering really shapes the update
    for a, b in zip(summary["losses"], one.losses, strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
