"""lm-evaluation-harness multiple-choice tasks (MMLU, or a folder of the user's task YAMLs) on an already-loaded
`Model`, in-process and item by item, so that a caller can draw intervals and paired steered − unsteered
differences from the per-item correctness.

The harness's own Hugging Face model class (`lm_eval.models.huggingface.HFLM`) wraps `model.hf` and
`model.tokenizer`; nothing is loaded twice and no hook is added here, so steering applied by the caller is
what is measured. lm-eval scores each choice with a cache-free, right-padded forward over context +
continuation and does not declare `personavec.steering.sequence_layout`, so under the default
positions="response" only the last column would be steered: steer every position for these tasks,
`with vec.steer(model, layer=L, coef=c, positions="all"): run_tasks(model, loaded)` (what `personavec
reproduce` does).

Data and the network: task data come from the Hugging Face `datasets` cache (MMLU: `cais/mmlu`, one
configuration per subject) or, for a task YAML over local files, from those files. The environment decides
whether the network is tried, as `huggingface_hub` and `datasets` read it when they are imported; nothing here
overrides the user's choice. With HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) nothing is fetched and missing
data fail at once; without them missing data are downloaded, and where there is no network the hub client
retries for about 20 s before the load fails (once: tasks are loaded once for all conditions, see
`load_tasks`). A task that cannot be loaded, or a missing lm-eval, is an `LmEvalUnavailable` error with a
one-line message that says what to do; `personavec reproduce` records that line as the reason the tasks
were skipped."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PersonavecError
from ..progress import Progress, no_progress

if TYPE_CHECKING:
    from ..models import Model

__all__ = ["LmEvalResult", "LmEvalUnavailable", "LoadedTasks", "TaskItems", "load_tasks", "run_tasks"]

INSTALL = "pip install 'personavec[capability]'"
#: The hint for a task whose data could not be loaded (MMLU's own data set named, as it is the usual case).
DATA_HINT = ("download the data once with network access (MMLU: the cais/mmlu data set); the Hugging Face cache "
             "then serves it, also with HF_HUB_OFFLINE=1")


class LmEvalUnavailable(PersonavecError):
    """lm-eval is not installed, or a task cannot be loaded (unknown name, data not cached and no network)."""


@dataclass(frozen=True)
class TaskItems:
    """One requested task (or group, such as mmlu: its subtasks' items together), item by item."""

    task: str
    subtasks: list[str]  # the leaf tasks whose items these are (the task itself for a plain task)
    item_ids: list[str]  # "<subtask>/<doc_id>", sorted: the pairing key between conditions
    correct: list[float]  # lm-eval's per-item `acc`: 1.0 when the choice of largest summed log-likelihood is right
    loglikelihoods: list[list[float]]  # per item, each choice's summed log-likelihood (nats)

    @property
    def accuracy(self) -> float | None:
        """The mean over all items (for a group: lm-eval's size-weighted group accuracy)."""
        return sum(self.correct) / len(self.correct) if self.correct else None


@dataclass(frozen=True)
class LmEvalResult:
    tasks: dict[str, TaskItems]  # by requested name, in the order asked for
    limit: int | None  # items per leaf task (None: all)
    lm_eval_version: str


@dataclass(frozen=True)
class LoadedTasks:
    """Tasks loaded once (data read, documents built), to be run on several conditions of the same model."""

    names: tuple[str, ...]
    subtasks: dict[str, list[str]]  # requested name → its leaf task names
    objects: list[Any]  # the harness's Task / Group objects to evaluate
    manager: Any  # the lm_eval TaskManager that loaded them


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().strip("'\"")
    return ((text.splitlines() or [type(exc).__name__])[0])[:200]


def _data_error(exc: BaseException) -> bool:
    """An error of reading a task's data: missing files, an unreachable or offline hub, a bad configuration,
    or any error of the `datasets` library (its own classes, matched by module)."""
    return isinstance(exc, OSError | ValueError | KeyError) or \
        any(c.__module__.split(".")[0] == "datasets" for c in type(exc).__mro__)


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LmEvalUnavailable(f"lm-eval tasks need the lm-eval harness: {INSTALL}") from None


def load_tasks(names: Sequence[str], *, include_path: str | Path | None = None,
               include_defaults: bool = True) -> LoadedTasks:
    """Load lm-eval tasks by name (tasks, groups such as "mmlu", or tags), the harness's own plus those of the
    task YAMLs in `include_path`; only multiple-choice tasks (per-item `acc`) are accepted.

    Raises `LmEvalUnavailable` (one line) when lm-eval is missing, a name is unknown, or a task's data cannot
    be read (not in the Hugging Face cache and no network, or HF_HUB_OFFLINE=1). `include_defaults=False`
    indexes only `include_path` (seconds faster: lm-eval's own index covers thousands of YAMLs)."""
    names = tuple(names)
    if not names:
        raise PersonavecError("name at least one lm-eval task")
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise LmEvalUnavailable(f"the lm-eval task folder {include_path} does not exist")
    manager = TaskManager(include_path=None if include_path is None else str(include_path),
                          include_defaults=include_defaults)
    subtasks: dict[str, list[str]] = {}
    objects: list[Any] = []
    for name in names:
        if name not in manager.all_tasks and not Path(name).is_file():
            where = f" (nor in {include_path})" if include_path is not None else ""
            raise LmEvalUnavailable(f"lm-eval has no task named '{name}'{where}; see `lm-eval ls tasks` or "
                                    "pass a folder of task YAMLs")
        try:
            loaded = manager.load([name])
        except Exception as exc:
            if not _data_error(exc):
                raise
            raise LmEvalUnavailable(f"lm-eval task '{name}' could not load its data ({_one_line(exc)}); "
                                    f"{DATA_HINT}") from None
        tasks, groups = loaded["tasks"], loaded["groups"]
        for task_name, task in tasks.items():
            if task.get_config("output_type") not in ("multiple_choice", "loglikelihood"):
                raise LmEvalUnavailable(f"lm-eval task '{task_name}' is not multiple-choice "
                                        f"({task.get_config('output_type')}): only tasks scored by "
                                        "log-likelihood give per-item accuracy here")
        subtasks[name] = sorted(tasks)
        objects += [groups[name]] if name in groups else list(tasks.values())
    return LoadedTasks(names, subtasks, objects, manager)


def _items(name: str, subtasks: list[str], samples: dict[str, list[dict[str, Any]]]) -> TaskItems:
    rows: dict[str, dict[str, Any]] = {}
    for sub in subtasks:
        for row in samples.get(sub, []):
            if "acc" not in row:
                raise LmEvalUnavailable(f"lm-eval task '{sub}' reports no per-item 'acc' metric; only multiple-"
                                        "choice tasks with metric acc are supported")
            rows.setdefault(f"{sub}/{int(row['doc_id'])}", row)  # the first filter's row when there are several
    ids = sorted(rows, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])))
    return TaskItems(task=name, subtasks=subtasks, item_ids=ids, correct=[float(rows[k]["acc"]) for k in ids],
                     loglikelihoods=[[float(r[0]) for r in rows[k]["filtered_resps"]] for k in ids])


def run_tasks(model: Model, tasks: Sequence[str] | LoadedTasks, *, include_path: str | Path | None = None,
              limit: int | None = None, batch_size: int = 8, progress: Progress = no_progress) -> LmEvalResult:
    """Run lm-eval multiple-choice tasks zero-shot (unless a task's YAML sets its own shots) on `model` as it
    runs now, through lm-eval's `HFLM` and `simple_evaluate` with per-item samples; `limit` items per leaf
    task (the first ones; for mmlu, per subject). `tasks`: names (loaded here, see `load_tasks`) or tasks
    loaded once for several conditions. Steer with positions="all" to measure a steered model (see the
    module's docstring). Global random seeds are left alone (scoring by log-likelihood draws nothing)."""
    loaded = tasks if isinstance(tasks, LoadedTasks) else load_tasks(tasks, include_path=include_path)
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tokenizer = model.tokenizer
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)  # the harness sets a pad token on the tokenizer it is given
    progress("lm-eval", 0, 1)
    # log-softmax in float32, as personavec's own likelihoods: in bfloat16 a choice's log-likelihood is
    # rounded to 1/8 nat at -20 and close choices tie
    lm = HFLM(pretrained=model.hf, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float32")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(loaded.objects), task_manager=loaded.manager, limit=limit,
                                  log_samples=True, bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None, fewshot_random_seed=0)
    progress("lm-eval", 1, 1)
    if out is None:  # only a non-zero rank of a distributed launch gets None
        raise PersonavecError("lm-eval returned no results (run it in a single process)")
    samples = out.get("samples", {})
    return LmEvalResult(tasks={n: _items(n, loaded.subtasks[n], samples) for n in loaded.names}, limit=limit,
                        lm_eval_version=str(getattr(lm_eval, "__version__", "")))
