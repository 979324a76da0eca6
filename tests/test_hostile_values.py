"""Values that pass a type check but would break the model, and hostile files: each is refused in one line (a
user's error: exit status 2 and one `error:` line from the command line), never an empty answer or a
traceback, and the files a command was given are left exactly as they were. On the real embedded model."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Cli, error_line, hook_ids
from safetensors.torch import save_file

import personavec as pv
from personavec.engines import Steering
from personavec.errors import ModelLoadError, PersonavecError, SteeringError, TraitError, VectorError
from personavec.evaluate import Condition, EvalSettings, evaluate
from personavec.interop import export_gguf, import_gguf
from personavec.models import embedded_gguf
from personavec.steering import RowSteering
from personavec.textfiles import read_user_text
from personavec.training import Interventions

LAYER = 18
NOT_UTF8 = b"Say hello.\n\xff\xfe caf\xe9\n"


def _direction(model: pv.Model, norm: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(model.hidden_size, generator=g)
    return v / v.norm() * norm


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            h.update(f.read_bytes())
    return h.hexdigest()


def _dtype_name(model: pv.Model) -> str:
    return str(model.dtype).removeprefix("torch.")


def _vector(model: pv.Model, **meta: Any) -> pv.PersonaVector:
    g = torch.Generator().manual_seed(0)
    shape = (model.n_layers + 1, model.hidden_size)
    tensors = {p: torch.randn(shape, generator=g) for p in ("response", "prompt")}
    return pv.PersonaVector(tensors, {"trait": "test", "model_id": model.model_id, "fingerprint": model.fingerprint,
                                      **meta})


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text, text
    return text


@pytest.fixture(scope="module")
def model_bf16(request: pytest.FixtureRequest) -> pv.Model:
    """The embedded model in bfloat16: the session's default model where it is bfloat16 (CPUs fast at it),
    else a load of its own."""
    default: pv.Model = request.getfixturevalue("model")
    return default if default.dtype == torch.bfloat16 else pv.load_model(dtype="bfloat16")


# ---- steering values, checked in the dtype they run in -------------------------------------------------------
# (model fixture, coefficient, vector norm): each product is finite in float64 and passes check_coef
OVERFLOWS = [
    pytest.param("model32", 1e40, 8.0, id="float32-1e40-overflows-the-product"),
    pytest.param("model32", 1e30, 8.0, id="float32-1e30-overflows-the-norm-layer"),
    pytest.param("model32", -1e20, 8.0, id="float32-negative"),
    pytest.param("model_bf16", 1e40, 8.0, id="bfloat16-1e40"),
    pytest.param("model_bf16", 1e5, 1e15, id="bfloat16-huge-vector"),
]


def _limit(message: str) -> float:
    found = re.search(r"below about (\S+) in magnitude", message)
    assert found, message
    return float(found.group(1))


def _check_refusal(message: str, model: pv.Model, coef: float) -> None:
    for needle in (f"coefficient {coef:g}", f"layer {LAYER}", _dtype_name(model), "smaller coefficient"):
        assert needle in message, message


@pytest.mark.parametrize(("which", "coef", "norm"), OVERFLOWS)
def test_steer_refuses_a_coefficient_that_overflows_the_model_dtype(request: pytest.FixtureRequest, which: str,
                                                                   coef: float, norm: float) -> None:
    model: pv.Model = request.getfixturevalue(which)
    v = _direction(model, norm)
    before = hook_ids(model)
    with pytest.raises(SteeringError) as exc:
        pv.steer(model, {LAYER: v}, coef=coef)
    _check_refusal(_one_line(exc), model, coef)
    assert hook_ids(model) == before  # refused before any hook went on
    # the magnitude the message offers is usable: half of it steers and the model still answers
    with pv.steer(model, {LAYER: v}, coef=math.copysign(_limit(str(exc.value)) / 2, coef)):
        assert model.chat("Say hello.", max_new_tokens=4) != ""


@pytest.mark.parametrize(("which", "coef", "norm"), OVERFLOWS)
def test_row_steering_refuses_the_same_coefficients(request: pytest.FixtureRequest, which: str, coef: float,
                                                    norm: float) -> None:
    model: pv.Model = request.getfixturevalue(which)
    v = _direction(model, norm)
    rows = [[(LAYER, v, 1.0, "response")], [(LAYER, v, coef, "all")], []]  # one bad row in a batch of three
    with pytest.raises(SteeringError) as exc:
        RowSteering(model, rows)
    _check_refusal(_one_line(exc), model, coef)
    assert not RowSteering(model, [rows[0], [], rows[0]]).is_noop  # the other rows alone are fine


def _no_work(*_: Any) -> None:
    raise AssertionError("a condition started before the grid's coefficients were checked")


@pytest.mark.parametrize("caller", [
    pytest.param(lambda m, vec: vec.steer(m, layer=LAYER, coef=1e40), id="vector-steer"),
    pytest.param(lambda m, vec: Steering.from_vector(vec, m, layer=LAYER, coef=1e40), id="engine-steering"),
    pytest.param(lambda m, vec: Interventions(preventative=vec, coef=1e40, layer=LAYER).check(m),
                 id="training-preventative"),
    pytest.param(lambda m, vec: evaluate(m, "evil", vector=vec, conditions=[Condition(None, 0.0), Condition(LAYER, 1e40)],
                                         settings=EvalSettings(n_questions=1, max_new_tokens=2), progress=_no_work),
                 id="evaluate-grid"),
])
def test_every_caller_refuses_before_doing_any_work(model: pv.Model,
                                                    caller: Callable[[pv.Model, pv.PersonaVector], Any]) -> None:
    before = hook_ids(model)
    with pytest.raises(SteeringError) as exc:
        caller(model, _vector(model))
    _check_refusal(_one_line(exc), model, 1e40)
    assert hook_ids(model) == before


@pytest.mark.parametrize(("args", "needle"), [
    pytest.param(["--coef", "1e40"], "coefficient 1e+40", id="1e40"),
    pytest.param(["--coef", "1", "--coef", "1e30"], "coefficient 1e+30", id="checked-before-any-answer"),
    pytest.param(["--coef", "-1e25", "--layer", "all"], "coefficient -1e+25", id="all-layers"),
])
def test_generate_refuses_an_overflowing_coefficient_in_one_line(cli: Cli, model: pv.Model, tmp_path: Path,
                                                                 args: list[str], needle: str) -> None:
    vfile = _vector(model).save(tmp_path / "v.pv.safetensors")
    before = _digest(vfile)
    res = cli("generate", "--vector", str(vfile), *args, "--max-new-tokens", "4", "Say hello.", ok=False)
    line = error_line(res)
    assert needle in line and _dtype_name(model) in line and "smaller coefficient" in line, line
    assert "coef" not in res.stdout  # no answer at all, neither an empty one nor the first coefficient's
    assert _digest(vfile) == before


def test_gguf_export_refuses_a_coefficient_that_overflows_float32(cli: Cli, model: pv.Model, tmp_path: Path) -> None:
    vfile = _vector(model).save(tmp_path / "v.pv.safetensors")
    before, out = _digest(vfile), tmp_path / "v.gguf"
    res = cli("vector", "export", str(vfile), "--format", "gguf", "--coef", "1e39", "--out", str(out), ok=False)
    assert "coefficient 1e+39" in error_line(res) and "float32" in error_line(res)
    assert not out.exists() and _digest(vfile) == before
    with pytest.raises(SteeringError, match="float32"):
        export_gguf(pv.load_vector(vfile), out, layers=[LAYER], coef=-1e39)


# ---- vector files with values no model can use ------------------------------------------------------------------
def _poisoned(position: str, row: int, col: int, value: float) -> Callable[[pv.Model, Path], None]:
    def write(model: pv.Model, path: Path) -> None:
        vec = _vector(model)
        tensors = {k: t.clone() for k, t in vec.tensors.items()}
        tensors[position][row, col] = value
        save_file(tensors, str(path), metadata={"personavec": json.dumps(vec.meta)})
    return write


def _metadata(raw: str) -> Callable[[pv.Model, Path], None]:
    def write(model: pv.Model, path: Path) -> None:
        save_file(dict(_vector(model).tensors), str(path), metadata={"personavec": raw})
    return write


BAD_VECTOR_FILES = [
    pytest.param(_poisoned("response", 7, 3, math.nan), ["tensor 'response'", "layer 7", "element 3", "nan"],
                 id="nan"),
    pytest.param(_poisoned("prompt", 12, 0, math.inf), ["tensor 'prompt'", "layer 12", "element 0", "inf"], id="inf"),
    pytest.param(_poisoned("response", 0, 575, -math.inf), ["layer 0", "element 575", "-inf"], id="minus-inf"),
    pytest.param(_metadata("{not json"), ["malformed personavec metadata"], id="metadata-not-json"),
    pytest.param(_metadata("[1, 2]"), ["malformed personavec metadata"], id="metadata-not-an-object"),
    pytest.param(_metadata(json.dumps({"trait": "t", "best_layer": "18"})), ["best_layer '18'"], id="best-layer-text"),
    pytest.param(_metadata(json.dumps({"trait": "t", "best_layer": 99})), ["best_layer 99"], id="best-layer-range"),
    pytest.param(_metadata('{"trait": "t", "best_coef": NaN}'), ["best_coef nan"], id="best-coef-nan"),
]


@pytest.mark.parametrize(("write", "needles"), BAD_VECTOR_FILES)
def test_bad_vector_files_are_refused_at_load(cli: Cli, model: pv.Model, tmp_path: Path,
                                              write: Callable[[pv.Model, Path], None], needles: list[str]) -> None:
    path = tmp_path / "bad.pv.safetensors"
    write(model, path)
    before = _digest(path)
    with pytest.raises(VectorError) as exc:
        pv.load_vector(path)
    assert all(n in _one_line(exc) for n in needles), exc.value
    line = error_line(cli("generate", "--vector", str(path), "--max-new-tokens", "4", "hi", ok=False))
    assert all(n in line for n in needles), line
    assert _digest(path) == before


def _pretrained_with_nan(model: pv.Model, tmp_path: Path) -> Path:
    folder = _vector(model).save_pretrained(tmp_path / "folder")
    _poisoned("response", 5, 1, math.nan)(model, folder / "vector.pv.safetensors")
    return folder


def _gguf_with_inf(model: pv.Model, tmp_path: Path) -> Path:
    import gguf

    path = tmp_path / "cv.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_uint32("controlvector.layer_count", 2)
    for k, value in ((4, 0.5), (9, math.inf)):
        row = np.full(model.hidden_size, 0.1, dtype=np.float32)
        row[2] = value
        writer.add_tensor(f"direction.{k}", row)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("make", "load", "needles"), [
    pytest.param(_pretrained_with_nan, lambda path, _model: pv.PersonaVector.from_pretrained(path),
                 ["tensor 'response'", "layer 5", "element 1"], id="pretrained-folder"),
    pytest.param(_gguf_with_inf, import_gguf, ["direction.9", "layer 10", "element 2", "inf"], id="gguf-control-vector"),
])
def test_vector_interop_refuses_non_finite_values(model: pv.Model, tmp_path: Path,
                                                  make: Callable[[pv.Model, Path], Path],
                                                  load: Callable[[Path, pv.Model], Any], needles: list[str]) -> None:
    path = make(model, tmp_path)
    before = _digest(path)
    with pytest.raises(VectorError) as exc:
        load(path, model)
    assert all(n in _one_line(exc) for n in needles), exc.value
    assert _digest(path) == before


def test_no_vector_file_is_written_that_load_would_refuse(cli: Cli, model: pv.Model, tmp_path: Path) -> None:
    vfile = _vector(model).save(tmp_path / "v.pv.safetensors")
    before, out = _digest(vfile), tmp_path / "scaled.pv.safetensors"
    line = error_line(cli("vector", "scale", str(vfile), "--by", "1e39", "--out", str(out), ok=False))
    assert "NaN or infinite" in line and "nothing was written" in line, line
    assert not out.exists() and _digest(vfile) == before


# ---- model files that are not models ---------------------------------------------------------------------------
def _random_gguf(model: pv.Model, tmp_path: Path) -> Path:
    path = tmp_path / "x.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def _truncated_gguf(model: pv.Model, tmp_path: Path) -> Path:
    path = tmp_path / "cut.gguf"
    with open(embedded_gguf(), "rb") as fh:
        path.write_bytes(fh.read(1 << 20))
    return path


def _empty_gguf(model: pv.Model, tmp_path: Path) -> Path:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    return path


def _control_vector_as_model(model: pv.Model, tmp_path: Path) -> Path:
    return export_gguf(_vector(model), tmp_path / "cv.gguf", layers=[LAYER])


def _folder(model: pv.Model, tmp_path: Path, garbage: str) -> Path:
    folder = tmp_path / "model"
    model.hf.config.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    (folder / garbage).write_bytes(np.random.default_rng(1).bytes(5000))
    return folder


@pytest.mark.parametrize(("make", "needle"), [
    pytest.param(_random_gguf, "not a readable GGUF file", id="random-bytes-gguf"),
    pytest.param(_truncated_gguf, "not a readable GGUF file", id="truncated-gguf"),
    pytest.param(_empty_gguf, "not a readable GGUF file", id="empty-gguf"),
    pytest.param(_control_vector_as_model, "as a chat model", id="gguf-of-no-model"),
    pytest.param(lambda m, p: _folder(m, p, "config.json"), "cannot load model", id="garbage-config"),
    pytest.param(lambda m, p: _folder(m, p, "model.safetensors"), "cannot load model", id="garbage-weights"),
])
def test_unloadable_models_are_one_line(cli: Cli, model: pv.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        make: Callable[[pv.Model, Path], Path], needle: str) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERSONAVEC_CACHE", str(cache))
    spec = make(model, tmp_path)
    before = _digest(spec)
    with pytest.raises(ModelLoadError) as exc:
        pv.load_model(spec)
    assert needle in _one_line(exc) and str(spec) in str(exc.value), exc.value
    line = error_line(cli("generate", "--model", str(spec), "--max-new-tokens", "4", "hi", ok=False))
    assert needle in line, line
    assert _digest(spec) == before
    assert not list(cache.glob("models/*"))  # no half-converted model left in the cache


def test_a_gguf_is_parsed_once_while_it_converts(model: pv.Model, tmp_path: Path) -> None:
    """transformers reads a GGUF three times (config, tokenizer, weights); the conversion hands it one parse of
    the file, and only for that file and only while converting."""
    import gguf

    from personavec.models import _parsed_once

    path, other = (export_gguf(_vector(model), tmp_path / f"{n}.gguf", layers=[LAYER]) for n in ("a", "b"))
    original = gguf.GGUFReader
    with _parsed_once(path):
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(path) is first and isinstance(first, original)
        assert gguf.GGUFReader(str(other)) is not first
        assert gguf.GGUFReader(str(path), "r+") is not first  # another mode is another reader
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4)
    assert gguf.GGUFReader is original
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4) is not gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"), _parsed_once(tmp_path / "missing.gguf"):
        pass


# ---- text files that are not UTF-8 -----------------------------------------------------------------------------
@pytest.mark.parametrize(("command", "needle"), [
    pytest.param(["generate", "--max-new-tokens", "4", "--file"], "prompt file", id="generate-file"),
    pytest.param(["data", "elicit", "--trait", "evil", "--out", "{out}", "--questions"], "questions file",
                 id="elicit-questions"),
])
def test_non_utf8_text_files_are_one_line(cli: Cli, tmp_path: Path, command: list[str], needle: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(NOT_UTF8)
    args = [a.replace("{out}", str(tmp_path / "out")) for a in command]
    line = error_line(cli(*args, str(path), ok=False))
    assert needle in line and "not UTF-8" in line and str(path) in line, line
    assert path.read_bytes() == NOT_UTF8


@pytest.mark.parametrize(("content", "error", "needle"), [
    pytest.param(NOT_UTF8, PersonavecError, "not UTF-8 text (byte 11)", id="not-utf8"),
    pytest.param(None, TraitError, "does not exist", id="missing"),
    pytest.param("folder", PersonavecError, "is a folder", id="folder"),
])
def test_read_user_text_fails_in_one_line(tmp_path: Path, content: bytes | str | None,
                                          error: type[PersonavecError], needle: str) -> None:
    path = tmp_path / "f.txt"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(error) as exc:
        read_user_text(path, "a file", error)
    assert needle in _one_line(exc)
