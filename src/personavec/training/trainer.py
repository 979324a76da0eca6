"""LoRA finetuning (PEFT + the Hugging Face Trainer) with training-time interventions and the
finetuning-shift callback.

The run folder OUT holds manifest.json (settings hash: a rerun resumes only the same run), Trainer
checkpoints (checkpoint-N/, the newest two kept; a rerun resumes from the newest complete one), shift.jsonl (the
finetuning shift at every checkpoint, when a vector is given), and at the end a plain PEFT adapter
(adapter_config.json + adapter_model.safetensors: LoRA weights only, no steering state) and
train_summary.json.

Several processes: `accelerate launch --num_processes N -m personavec.cli train ...` runs the same code under
DDP (the Trainer reads the accelerate environment; gloo on CPUs, NCCL on GPUs). Each process loads the model,
attaches the training-time hooks to its own copy and trains on its share of each global batch
(N × --batch-size rows per step; the loss is averaged over all assistant tokens of the global batch, so the
adapter matches one process with an N times larger batch). Only the main process writes the run folder
(manifest, adapter, summary, shift log); Trainer checkpoints hold one rng_state_K.pth per process."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from ..capture import read
from ..errors import PersonavecError
from ..io import append_jsonl, read_jsonl, sha256_file, write_json
from ..progress import Progress, no_progress
from ..runs import open_run
from .checkpoints import last_complete_checkpoint
from .dataset import IGNORE, DatasetSummary, collate, load_dataset
from .interventions import InterventionCallback, Interventions
from .shift import eval_prompts, last_prompt_means, project, shift_record

if TYPE_CHECKING:
    from ..models import Model
    from ..vectors import PersonaVector

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
log = logging.getLogger("personavec")


@dataclass(frozen=True)
class TrainSettings:
    """LoRA and optimizer settings. The paper used rank 32, alpha 64, rsLoRA, lr 1e-5, one epoch on 7-8B
    models; a 135M model with a few hundred rows needs a larger learning rate to move at all."""

    rank: int = 32
    alpha: int = 64
    rslora: bool = True
    dropout: float = 0.0
    target_modules: str = "all-linear"
    lr: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    max_length: int = 512
    save_steps: int = 50
    warmup: float = 0.0  # warm-up steps, or a fraction of the steps when below 1
    seed: int = 0
    shift_questions: int | None = 20  # evaluation questions for the per-checkpoint shift (None = all)

    def validate(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 8:
            raise PersonavecError("--rank, --alpha, --batch-size and --grad-accum must be positive, --max-length ≥ 8")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.epochs) and self.epochs > 0):
            raise PersonavecError("--lr and --epochs must be positive numbers")
        if self.max_steps is not None and self.max_steps < 1:
            raise PersonavecError("--max-steps must be at least 1")
        if not 0 <= self.dropout < 1:
            raise PersonavecError("--dropout must lie in [0, 1)")


@dataclass
class TrainResult:
    """What a finished run produced. `model` is the trained model (its .hf is the PeftModel)."""

    out: Path
    model: Any
    steps: int
    dataset: DatasetSummary
    losses: list[dict[str, Any]] = field(default_factory=list)
    shifts: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    main: bool = True  # False in the other processes of a multi-process run: they wrote nothing


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss {value} at step {step}")
        self.step, self.value = step, value


class PersonavecTrainer(Trainer):
    """The Trainer plus the projection penalty and a stop on a non-finite loss (before the update)."""

    def __init__(self, *args: Any, pv_model: Model, interventions: Interventions,
                 pause: InterventionCallback | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pv_model = pv_model
        self.iv = interventions
        self.pause = pause
        self.penalties: list[float] = []

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not self.iv.penalty:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            result = self._penalized(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if isinstance(result, tuple) else result
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach().float().mean()))
        return result

    def _penalized(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
        """loss + W · mean over assistant tokens of ((h − h_base) · v̂)² at the vector's layer."""
        layer = self.iv.resolved_penalty_layer()
        assert layer is not None and self.iv.penalty_vector is not None
        store: dict[str, torch.Tensor] = {}
        with read(self.pv_model, [layer], lambda _layer, h: store.__setitem__("h", h)):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        base = self._base_hidden(model, inputs, layer)
        v = self.iv.penalty_vector.at(layer).float()
        unit = (v / v.norm()).to(store["h"].device, store["h"].dtype)
        selected = (inputs["labels"] != IGNORE).to(store["h"].device)  # the block may sit on another device
        delta = ((store["h"] - base) @ unit)[selected]
        penalty = self.iv.penalty * delta.float().pow(2).mean()
        self.penalties.append(float(penalty.detach()))
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            penalty = penalty / self.args.gradient_accumulation_steps  # the LM loss is already normalized so
        loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def _base_hidden(self, model: Any, inputs: dict[str, Any], layer: int) -> torch.Tensor:
        """The base model's output of `layer` (adapter disabled, training hooks lifted), forward stopped there."""
        peft_model = self.accelerator.unwrap_model(model)
        store: dict[str, torch.Tensor] = {}
        paused = self.pause.paused() if self.pause is not None else contextlib.nullcontext()

        def grab(_layer: int, h: torch.Tensor) -> None:
            store["h"] = h.detach()

        with torch.no_grad(), peft_model.disable_adapter(), paused, read(self.pv_model, [layer], grab, stop_after=True):
            peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        return store["h"]


class ProgressCallback(TrainerCallback):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress("train", state.global_step, state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress("train", state.global_step, state.max_steps)


class ShiftCallback(TrainerCallback):
    """Log the finetuning shift at every checkpoint (and at the end) into OUT/shift.jsonl.

    Measured on the model as it would be saved: eval mode, training hooks lifted; the base activations
    come from the same model with its adapter disabled, computed once."""

    def __init__(self, model: Model, vector: PersonaVector, trait: str, n_questions: int | None, path: Path,
                 pause: InterventionCallback | None) -> None:
        self.model, self.vector, self.path, self.pause = model, vector, path, pause
        self.samples = eval_prompts(model, trait, n_questions)
        self.base: torch.Tensor | None = None
        self.logged = {int(r["step"]) for r in read_jsonl(path)}

    def measure(self, step: int) -> dict[str, Any] | None:
        if step in self.logged:
            return None
        hf = self.model.hf
        was_training = hf.training
        hf.eval()
        paused = self.pause.paused() if self.pause is not None else contextlib.nullcontext()
        try:
            with paused:
                if self.base is None:
                    with hf.disable_adapter():
                        self.base = last_prompt_means(self.model, self.samples)
                ft = last_prompt_means(self.model, self.samples)
        finally:
            hf.train(was_training)
        row = shift_record(project(ft, self.base, self.vector), self.vector, step=step,
                           n_questions=len(self.samples))
        append_jsonl(self.path, [row])
        self.logged.add(step)
        return row

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.measure(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.measure(state.global_step)


def _lora_config(s: TrainSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=s.rank, lora_alpha=s.alpha, use_rslora=s.rslora, lora_dropout=s.dropout,
                      target_modules=s.target_modules, task_type="CAUSAL_LM")


def train(model: Model, data: str | Path, out: str | Path, settings: TrainSettings | None = None,
          interventions: Interventions | None = None, *, shift_vector: PersonaVector | None = None,
          shift_trait: str | None = None, allow_mismatch: bool = False,
          callbacks: Sequence[TrainerCallback] = (), progress: Progress = no_progress) -> TrainResult:
    """Finetune a LoRA adapter on the chat dataset `data` into the run folder `out` (resumable).

    The adapter is injected into `model.hf` in place; use `result.model` (whose .hf is the PeftModel).
    Interventions are hooks or loss terms present only inside `trainer.train()`."""
    s = settings or TrainSettings()
    s.validate()
    iv = interventions or Interventions()
    iv.check(model, allow_mismatch)
    if shift_vector is not None:
        shift_vector.check_model(model, allow_mismatch)
    examples, summary = load_dataset(data, model.tokenizer, s.max_length)
    # Under `accelerate launch`, creating the arguments joins the process group.
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr, num_train_epochs=s.epochs, max_steps=s.max_steps or -1, warmup_steps=s.warmup,
        lr_scheduler_type="linear", logging_steps=1, save_strategy="steps", save_steps=s.save_steps,
        save_total_limit=2, report_to=[], seed=s.seed, data_seed=s.seed, remove_unused_columns=False,
        label_names=["labels"], disable_tqdm=True, use_cpu=model.device.type == "cpu",
        bf16=False, fp16=False, dataloader_num_workers=0)
    main = args.process_index == 0
    if args.world_size > 1 and len({str(d) for d in (getattr(model.hf, "hf_device_map", None) or {}).values()}) > 1:
        raise PersonavecError("a model split across devices with --device-map cannot be trained in several "
                              "processes (each process trains a whole copy); drop --device-map or use one process")
    manifest = {
        "model_id": model.model_id, "model_source": model.source, "fingerprint": model.fingerprint,
        "dtype": str(model.dtype), "data_sha256": sha256_file(data), "settings": asdict(s),
        "interventions": iv.describe(), "shift_vector": None if shift_vector is None else shift_vector.digest()}
    with args.main_process_first(local=False, desc="personavec run folder"):
        # The main process creates (or checks) the run folder; the others only check what it wrote.
        if not main and not (Path(out) / "manifest.json").is_file():
            raise PersonavecError(f"the main process did not create the run folder {out}; see its error")
        folder = open_run(out, "train", manifest, option="--out")
    if all((folder / f).exists() for f in ADAPTER_FILES) and (folder / "train_summary.json").exists():
        raise PersonavecError(f"{folder} already holds a finished adapter; use another --out to train again")

    from peft import get_peft_model

    set_seed(s.seed)  # the LoRA initialization follows --seed (and is the same in every process)
    peft_model = get_peft_model(model.hf, _lora_config(s))
    tm = dataclasses.replace(model, hf=peft_model)
    pause = InterventionCallback(tm, iv, allow_mismatch) if iv.hooks_needed else None
    cbs: list[TrainerCallback] = [ProgressCallback(progress)]
    if pause is not None:
        cbs.insert(0, pause)
    if shift_vector is not None:
        cbs.append(ShiftCallback(tm, shift_vector, shift_trait or shift_vector.trait, s.shift_questions,
                                 folder / "shift.jsonl", pause))
    cbs.extend(callbacks)
    trainer = PersonavecTrainer(model=peft_model, args=args, train_dataset=examples,
                                data_collator=collate(int(model.tokenizer.pad_token_id)), callbacks=cbs,
                                pv_model=tm, interventions=iv, pause=pause)
    trainer.remove_callback(PrinterCallback)  # the library never prints; progress goes through `progress`
    found = last_complete_checkpoint(folder)
    resume = found.checkpoint
    if found.skipped:
        log.warning("%s: passed over incomplete checkpoint(s) from an interrupted save: %s; %s", folder,
                    ", ".join(found.skipped), f"resuming from {resume}" if resume else "starting from step 0")
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLoss as exc:
        last = last_complete_checkpoint(folder).checkpoint
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise PersonavecError(f"training stopped: the loss became {exc.value} at step {exc.step}; {kept}; lower "
                              "--coef, --lr or --projection-penalty and train into a new --out") from None
    finally:
        if pause is not None:
            pause.detach()
        peft_model.eval()
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    if main:
        peft_model.save_pretrained(str(folder))
        shifts = read_jsonl(folder / "shift.jsonl")
        write_json(folder / "train_summary.json", {
            "dataset": asdict(summary), "steps": trainer.state.global_step, "losses": losses,
            "penalty_mean": (sum(trainer.penalties) / len(trainer.penalties)) if trainer.penalties else None,
            "shift": shifts[-1] if shifts else None, "resumed_from": resume,
            "interventions": iv.describe(), "world_size": args.world_size,
            "base_model": {"model_id": model.model_id, "source": model.source, "fingerprint": model.fingerprint}})
    trainer.accelerator.wait_for_everyone()  # every process returns once the adapter is on disk
    return TrainResult(out=folder, model=tm, steps=trainer.state.global_step, dataset=summary, losses=losses,
                       shifts=read_jsonl(folder / "shift.jsonl"), resumed_from=resume, main=main)
