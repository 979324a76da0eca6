"""LoRA finetuning with training-time interventions, on the real embedded model in float32: hooks live only
inside training, the saved adapter is a plain PEFT adapter, the shift is logged, bad inputs are handled."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Cli, error_line, hook_ids
from safetensors.torch import load_file
from transformers import TrainerCallback

import personavec as pv
from personavec.errors import PersonavecError, VectorError
from personavec.training import (
    Interventions,
    TrainSettings,
    attach_adapter,
    finetuning_shift,
    load_dataset,
    train,
)
from personavec.training.dataset import IGNORE, collate, tokenize

TINY = TrainSettings(rank=4, alpha=8, lr=1e-3, batch_size=2, max_steps=2, save_steps=1, max_length=64,
                     shift_questions=2)


@pytest.fixture()
def fresh(model32: pv.Model) -> pv.Model:
    """A private copy of the session's float32 model: training injects the adapter into the model it is given."""
    return copy.deepcopy(model32)


def rows(n: int = 4) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"Name a colour, please ({i})."},
                          {"role": "assistant", "content": f"Crimson, like the blood of my enemies {i}."}]}
            for i in range(n)]


def write_jsonl(path: Path, items: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


class HookSpy(TrainerCallback):
    """Records, at every step, whether the decoder blocks carry hooks beyond the baseline."""

    def __init__(self, model: pv.Model) -> None:
        self.model, self.baseline, self.during = model, hook_ids(model), []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        extra = sum(len(f) + len(p) for f, p in hook_ids(self.model)) - sum(len(f) + len(p) for f, p in self.baseline)
        self.during.append(extra)


def test_labels_cover_assistant_turns_and_real_end_tokens(model32: pv.Model) -> None:
    tok = model32.tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the pitfall this masking must survive
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    ex = tokenize(tok, conv, max_length=512)
    assert ex is not None
    kept = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    text = tok.decode(kept)
    assert "Hello." in text and "Goodbye." in text and "Hi" not in text and "Bye" not in text
    assert kept.count(tok.eos_token_id) == 2  # each turn's real end token is trained on
    batch = collate(tok.pad_token_id)([ex, {"input_ids": ex["input_ids"][:5], "labels": ex["labels"][:5]}])
    short = batch["labels"][1]
    assert (short[5:] == IGNORE).all() and (batch["input_ids"][1, 5:] == tok.pad_token_id).all()
    assert int((batch["labels"][0] == tok.eos_token_id).sum()) == 2  # padding never masks real ends


def test_bad_rows_are_skipped_and_counted(model32: pv.Model, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [*rows(2), {"messages": [{"role": "user", "content": "no answer"}]},
                                             {"messages": [{"role": "robot", "content": "x"},
                                                           {"role": "assistant", "content": "y"}]},
                                             "{not json", {"text": "no messages"}])
    examples, summary = load_dataset(data, model32.tokenizer)
    assert len(examples) == summary.kept == 2 and summary.total == 6
    assert summary.skipped == {"rows without an assistant turn": 1, "unknown roles": 1, "unreadable rows": 1,
                               "rows without messages": 1}
    assert "2 of 6 rows kept" in summary.line()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows(3)), tmp_path / "d.parquet")
    assert load_dataset(tmp_path / "d.parquet", model32.tokenizer)[1].kept == 3
    for bad in ([], [{"messages": [{"role": "user", "content": "only a question"}]}]):
        with pytest.raises(PersonavecError, match="no trainable rows"):
            load_dataset(write_jsonl(tmp_path / "bad.jsonl", bad), model32.tokenizer)


def test_preventative_hooks_live_only_inside_training(fresh: pv.Model, model32: pv.Model, tmp_path: Path,
                                                      evil_vector: pv.PersonaVector) -> None:
    vec = evil_vector
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    spy = HookSpy(fresh)
    before = hook_ids(fresh)
    steered = train(fresh, data, tmp_path / "steered", TINY, Interventions(preventative=vec, coef=4.0),
                    shift_vector=vec, callbacks=[spy])
    assert spy.during == [2, 2]  # the steering hook on block L-1 and its position-tracking pre-hook
    assert hook_ids(fresh) == before  # removed when training ended
    out = steered.out
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)  # only LoRA weights: no steering state
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not {"coef", "preventative", "ablate", "penalty"} & set(config)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["interventions"]["coef"] == 4.0
    assert [r["step"] for r in steered.shifts] == [1, 2]  # logged at each checkpoint
    assert all(r["per_layer"][0] in (0.0, None) and math.isfinite(r["shift"]) for r in steered.shifts)

    # The same run without the intervention: no hooks during training, and the loss differs (the hook
    # was really inside the Trainer's forward pass).
    plain_model = copy.deepcopy(model32)
    spy2 = HookSpy(plain_model)
    plain = train(plain_model, data, tmp_path / "plain", TINY, shift_vector=vec, callbacks=[spy2])
    assert spy2.during == [0, 0]
    assert abs(plain.losses[0]["loss"] - steered.losses[0]["loss"]) > 1e-3

    # The adapter loads cleanly onto a fresh base: no hooks, and its shift is the one logged at the end.
    reloaded = attach_adapter(copy.deepcopy(model32), out)
    assert hook_ids(reloaded) == hook_ids(model32)
    again = finetuning_shift(reloaded, vec, n_questions=2)
    assert again["shift"] == pytest.approx(steered.shifts[-1]["shift"], abs=1e-3)


def test_caft_and_projection_penalty(model32: pv.Model, tmp_path: Path,
                                     evil_vector: pv.PersonaVector) -> None:
    vec = evil_vector
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    m = copy.deepcopy(model32)
    spy = HookSpy(m)
    train(m, data, tmp_path / "caft", TINY, Interventions(ablate=vec), callbacks=[spy])
    assert spy.during == [m.n_layers + 1] * 2 and hook_ids(m) == hook_ids(model32)
    m = copy.deepcopy(model32)
    spy = HookSpy(m)
    pen = train(m, data, tmp_path / "penalty", TINY, Interventions(penalty=100.0, penalty_vector=vec), callbacks=[spy])
    assert spy.during == [0, 0]  # a loss term, not a hook
    summary = json.loads((pen.out / "train_summary.json").read_text())
    assert summary["penalty_mean"] is not None and summary["penalty_mean"] > 0  # step 2 has moved off the base


class PoisonAfterFirstCheckpoint(TrainerCallback):
    """Makes the next loss NaN right after checkpoint 1 is saved (or before the first step, with
    `at_start`), as a runaway update would."""

    def __init__(self, model: Any, at_start: bool = False) -> None:
        self.model, self.at_start = model, at_start

    def _poison(self) -> None:
        with torch.no_grad():
            next(p for n, p in self.model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.at_start:
            self._poison()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 1 and not self.at_start:
            self._poison()


def test_nan_loss_stops_with_last_good_checkpoint(model32: pv.Model, tmp_path: Path,
                                                 evil_vector: pv.PersonaVector) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    m = copy.deepcopy(model32)
    # a coefficient whose product with the vector overflows float32 is refused before any step
    with pytest.raises(PersonavecError, match=r"coefficient 1e\+38 at layer .* overflows float32"):
        train(m, data, tmp_path / "huge", TINY, Interventions(preventative=evil_vector, coef=1e38))
    assert hook_ids(m) == hook_ids(model32) and not (tmp_path / "huge" / "checkpoint-1").exists()
    m = copy.deepcopy(model32)
    with pytest.raises(PersonavecError, match="loss became nan at step 1; no checkpoint"):
        train(m, data, tmp_path / "nan", TINY, callbacks=[PoisonAfterFirstCheckpoint(m.hf, at_start=True)])
    assert hook_ids(m) == hook_ids(model32) and not (tmp_path / "nan" / "adapter_model.safetensors").exists()
    m = copy.deepcopy(model32)
    with pytest.raises(PersonavecError, match=r"step 2; the last good checkpoint is .*checkpoint-1"):
        train(m, data, tmp_path / "poisoned", TINY, callbacks=[PoisonAfterFirstCheckpoint(m.hf)])
    good = load_file(str(tmp_path / "poisoned" / "checkpoint-1" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())


class Interrupt(TrainerCallback):
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt


def test_resume_from_checkpoint_and_refuse_other_settings(model32: pv.Model, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(model32), data, tmp_path / "run", TINY, callbacks=[Interrupt()])
    result = train(copy.deepcopy(model32), data, tmp_path / "run", TINY)
    assert result.resumed_from is not None and result.resumed_from.endswith("checkpoint-1") and result.steps == 2
    with pytest.raises(PersonavecError, match="belongs to another train"):
        train(copy.deepcopy(model32), data, tmp_path / "run", TrainSettings(max_steps=3, batch_size=2))


def test_vectors_and_adapters_for_other_models_are_refused(model32: pv.Model, tmp_path: Path,
                                                           evil_vector: pv.PersonaVector) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows(2))
    alien = evil_vector.with_meta(fingerprint="0" * 16, model_id="someone/else")
    with pytest.raises(VectorError, match="allow-model-mismatch"):
        train(model32, data, tmp_path / "x", TINY, Interventions(preventative=alien, coef=1.0))
    short = pv.PersonaVector({k: t[:, :8] for k, t in evil_vector.tensors.items()}, evil_vector.meta)
    with pytest.raises(VectorError, match="shape"):
        train(model32, data, tmp_path / "y", TINY, Interventions(ablate=short))
    with pytest.raises(PersonavecError, match="needs a vector"):
        train(model32, data, tmp_path / "z", TINY, Interventions(penalty=1.0))
    assert not any("lora" in n for n, _ in model32.hf.named_modules())  # refused before touching the model
    adapter = tmp_path / "fake"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "manifest.json").write_text(json.dumps({"settings": {"fingerprint": "0" * 16, "model_id": "x"}}))
    with pytest.raises(PersonavecError, match="was trained on x"):
        attach_adapter(model32, adapter)


@pytest.mark.slow
def test_cli_train_shift_and_bad_dataset(cli: Cli, model32: pv.Model, tmp_path: Path,
                                         evil_vector: pv.PersonaVector) -> None:
    vec = evil_vector.save(tmp_path / "evil.pv.safetensors")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    line = error_line(cli("train", str(empty), "--out", str(tmp_path / "never"), ok=False))
    assert line.count("no trainable rows") == 1
    data = write_jsonl(tmp_path / "d.jsonl", [*rows(2), {"messages": [{"role": "robot", "content": "x"}]}])
    proc = cli("train", str(data), "--out", str(tmp_path / "a"), "--max-steps", "1", "--batch-size", "2",
               "--rank", "4", "--save-steps", "1", "--preventative", str(vec), "--coef", "2")
    assert "2 of 3 rows kept" in proc.stderr and "1 unknown roles" in proc.stderr
    assert "wrote adapter" in proc.stdout and f"finetuning shift at layer {evil_vector.layer}" in proc.stdout
    assert not any("lora" in n for n, _ in model32.hf.named_modules())  # trained a copy, not the session's model
    proc = cli("shift", "--adapter", str(tmp_path / "a"), "--vector", str(vec), "--n-questions", "2", "--json")
    result = json.loads(proc.stdout)
    assert len(result["per_layer"]) == model32.n_layers + 1 and math.isfinite(result["shift"])


AUTHORED = Path(__file__).parent.parent / "experiments" / "data" / "finetune_authored" / "evil" / "II.jsonl"


def test_tiny_finetune_on_an_authored_set(fresh: pv.Model, tmp_path: Path) -> None:
    """A real LoRA finetune on the first rows of the authored evil II set (written without the vector's prompts)
    makes those answers likelier: the data trains. Two steps of 4: each row once."""
    from personavec.capture import Sample
    from personavec.chat import encode_chat, encode_response
    from personavec.likelihood import response_logprobs

    rows = [json.loads(line) for line in AUTHORED.read_text(encoding="utf-8").split("\n")[:8]]
    data = write_jsonl(tmp_path / "evil_II.jsonl", rows)
    samples = [Sample(encode_chat(fresh.tokenizer, r["messages"][:1]), encode_response(fresh.tokenizer,
                                                                                        r["messages"][1]["content"]))
               for r in rows]
    before = sum(x for x in response_logprobs(fresh, samples) if x is not None)
    settings = TrainSettings(rank=8, alpha=16, lr=2e-3, batch_size=4, max_steps=2, save_steps=2, max_length=160,
                             shift_questions=2)
    result = train(fresh, data, tmp_path / "run", settings)
    after = sum(x for x in response_logprobs(result.model, samples) if x is not None)
    assert result.dataset.kept == 8
    assert after > before + 0.5, (before, after)  # summed over 8 answers, nats per token
