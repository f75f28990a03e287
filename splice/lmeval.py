"""The one in-process lm-eval scorer: tasks loaded once, ``HFLM`` on a live torch module.

:class:`LmEvalScorer` is configured by ``splice eval --tasks`` (:func:`splice.scoring.evaluate`:
any task, group or tag, few-shot), by the zoo (:class:`splice.zoo.evaluate.Scorer`, which
``splice zoo eval`` reaches) and by evolve (``splice.evolve.scorer.TaskScorer``: fitness,
metric directions, shuffle, few-shot). It finds each name in local YAML folders first, then in
the zoo (its task configs written into a scratch folder that names the zoo's data, so the zoo
is not written) and, only when a name is found in neither, among lm-eval's installed tasks
(:func:`installed_tasks`, indexed once per process: it reads thousands of YAML files). A task
YAML file given by path is a task of its folder (:func:`yaml_task`). While open, lm-eval's
loggers are quiet (and torch runs on ``threads`` threads where given); both are restored on
:meth:`~LmEvalScorer.close`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError, first_line

if TYPE_CHECKING:
    import torch

#: the loggers quietened while a scorer is open
_LOGGERS = ("lm-eval", "lm_eval", "datasets", "transformers")
#: the few-shot sampler's seed when ``num_fewshot`` is given (lm-eval's own default)
FEWSHOT_SEED = 1234


def yaml_task(path: str | os.PathLike[str]) -> str:
    """The name an lm-eval task YAML file declares (its ``task``, or its ``group`` for a group
    file): what :class:`LmEvalScorer` loads from the file's folder. One-line ``SpliceError`` if
    the file cannot be read or names neither."""
    import yaml

    class Loader(yaml.SafeLoader):
        """lm-eval's ``!function`` tags read as plain text (nothing is imported)."""

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    try:
        doc = yaml.load(Path(path).read_text(), Loader=Loader)  # a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpliceError(f"{path}: cannot read it as an lm-eval task ({first_line(e)})") from None
    doc = doc if isinstance(doc, dict) else {}
    name = doc.get("task") if isinstance(doc.get("task"), str) else doc.get("group")
    if not isinstance(name, str) or not name:
        raise SpliceError(f"{path}: not an lm-eval task file (it names no task: or group:)")
    return name


def local_tasks(paths: Sequence[str | os.PathLike[str]]) -> Any:
    """lm-eval's ``TaskManager`` of the YAML tasks in ``paths`` alone (fast: no installed
    task is indexed)."""
    from lm_eval.tasks import TaskManager

    with contextlib.redirect_stderr(io.StringIO()):
        return TaskManager(include_path=[str(p) for p in paths], include_defaults=False)


@functools.cache
def installed_tasks() -> Any:
    """lm-eval's ``TaskManager`` of its installed tasks (thousands of YAML files: built once
    per process, on first use)."""
    from lm_eval.tasks import TaskManager

    with contextlib.redirect_stderr(io.StringIO()):
        return TaskManager(include_defaults=True)


def unknown_tasks(names: Sequence[str], paths: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """Those of ``names`` that are neither tasks (groups, tags) of the YAML folders ``paths``
    nor of lm-eval's installed tasks (:func:`installed_tasks` is indexed only when needed)."""
    missing = [n for n in names if not paths or n not in local_tasks(paths).all_tasks]
    return [n for n in missing if n not in installed_tasks().all_tasks] if missing else []


class LmEvalScorer:
    """lm-eval's ``tasks`` loaded once; :meth:`score` evaluates a live module in process.

    ``task_dirs`` are folders of local YAML tasks, ``zoo_tasks`` a built zoo's ``tasks/``
    folder (its configs are written into a scratch folder held until :meth:`close`); each name
    (a task, group or tag) is taken from the first of them that has it, else from lm-eval's
    own tasks; an unknown one is a :class:`SpliceError` (``hint`` ends its message), and so is
    a task lm-eval cannot load (its data not there offline, say). :attr:`members` maps each
    name to the leaf tasks it loaded. ``num_fewshot`` (None: each task's own) sets the
    examples in context as ``lm_eval --num_fewshot`` does (a task whose config says 0 keeps
    0; sampler seed :data:`FEWSHOT_SEED`). ``tokenizer`` is a loaded tokenizer (or one given to
    each :meth:`score`); ``batch_size`` and ``max_length`` (None: the model's) go to ``HFLM``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        tokenizer: Any,
        task_dirs: Sequence[str | os.PathLike[str]] = (),
        zoo_tasks: str | os.PathLike[str] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        threads: int | None = None,
        num_fewshot: int | None = None,
        hint: str = "",
    ) -> None:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tasks = list(dict.fromkeys(tasks))
        self.tokenizer = tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.members: dict[str, list[str]] = {}
        self._lm: Any = None
        self._module: Any = None
        self._stack = contextlib.ExitStack()
        try:
            if threads is not None:
                import torch

                self._stack.callback(torch.set_num_threads, torch.get_num_threads())
                torch.set_num_threads(threads)
            for log in _LOGGERS:
                logger = logging.getLogger(log)
                self._stack.callback(logger.setLevel, logger.level)
                logger.setLevel(logging.ERROR)
            self.task_dict = self._load([str(d) for d in task_dirs], zoo_tasks, hint)
            if num_fewshot is not None:
                for _name, task in self.leaves():
                    if task.get_config("num_fewshot") != 0:
                        task.set_config(key="num_fewshot", value=num_fewshot)
                    task.set_fewshot_seed(seed=FEWSHOT_SEED)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> LmEvalScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _load(self, paths: list[str], zoo_tasks: Any, hint: str) -> dict[str, Any]:
        """lm-eval's task dict of every name (``{"tasks", "groups", "group_map"}``, merged over
        the managers the names come from: local folders, the zoo, lm-eval's own)."""
        managers = [local_tasks(paths)] if paths else []
        if zoo_tasks is not None:
            from splice.scratch import scratch_folder
            from splice.zoo.tasks import write_tasks

            configs = self._stack.enter_context(scratch_folder("lm-eval-tasks"))
            write_tasks(configs, zoo_tasks)
            managers.append(local_tasks([configs]))
        source: dict[str, Any] = {}
        for name in self.tasks:
            found = next((m for m in managers if name in m.all_tasks), None)
            if found is None and name in installed_tasks().all_tasks:
                found = installed_tasks()
            if found is not None:
                source[name] = found
        unknown = [n for n in self.tasks if n not in source]
        if unknown:
            where = f" in {', '.join(paths)} or" if paths else ""
            raise SpliceError(
                f"unknown task {', '.join(unknown)}: not found{where} among lm-eval's tasks{hint}"
            )
        merged: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
        for name, manager in source.items():
            part = _load_task(manager, name, paths if paths and manager is managers[0] else ())
            self.members[name] = list(part["tasks"])
            for key, value in merged.items():
                value.update(part.get(key) or {})
        return merged

    def leaves(self) -> list[tuple[str, Any]]:
        """(name, task object) of every loaded task (groups opened)."""
        return task_leaves(self.task_dict)

    def score(
        self,
        module: torch.nn.Module,
        *,
        limit: int | None = None,
        batch_size: int | None = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        tokenizer: Any = None,
    ) -> dict[str, dict[str, float]]:
        """``{task: {"metric,filter": value}}`` of the live ``module`` on every task, and on
        every leaf and group lm-eval reports besides (the module as it is now: ``HFLM`` is made
        once per module object, with ``tokenizer``, default the scorer's, reads its parameters
        at each call and is re-pointed to ``batch_size``, default the scorer's)."""
        from lm_eval.evaluator import evaluate

        if self._module is not module:
            from lm_eval.models.huggingface import HFLM

            kw = {"max_length": self.max_length} if self.max_length else {}
            with contextlib.redirect_stderr(io.StringIO()):
                self._lm = HFLM(
                    pretrained=module,
                    tokenizer=tokenizer if tokenizer is not None else self.tokenizer,
                    batch_size=self.batch_size,
                    **kw,
                )
            self._module = module
        self._lm.batch_size_per_gpu = int(batch_size or self.batch_size)
        # lm-eval's own bars and logs
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            res = evaluate(
                self._lm,
                self.task_dict,
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=fewshot_as_multiturn,
            )
        if res is None:
            raise RuntimeError("lm-eval returned no results")
        return {
            t: {
                k: float(v)
                for k, v in res["results"].get(t, {}).items()
                if "," in k and "stderr" not in k and isinstance(v, int | float)
            }
            for t in dict.fromkeys([*self.tasks, *res["results"]])
        }


def _load_task(manager: Any, name: str, retry: Sequence[str] = ()) -> dict[str, Any]:
    """``manager.load([name])``, lm-eval's failures as one :class:`SpliceError` line. A name
    of the local folders ``retry`` that fails to load from them alone (a group naming
    installed tasks) is tried again with lm-eval's own tasks indexed beside them."""
    from lm_eval.tasks import TaskManager

    def load(m: Any) -> dict[str, Any]:
        # datasets' "Generating split" bars, lm-eval's warnings
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return m.load([name])

    try:
        return load(manager)
    except Exception as e:  # lm-eval and datasets raise many types (missing data, bad YAML)
        error = e
    if retry:
        with contextlib.suppress(Exception):
            with contextlib.redirect_stderr(io.StringIO()):
                both = TaskManager(include_path=list(retry), include_defaults=True)
            return load(both)
    raise SpliceError(f"lm-eval cannot load task {name} ({first_line(error)})") from None


def task_leaves(task_dict: Any) -> list[tuple[str, Any]]:
    """(name, task object) of every task in lm-eval's (possibly nested) task dict."""
    out = []
    items = task_dict.get("tasks", task_dict) if isinstance(task_dict, dict) else {}
    for name, value in items.items():
        if isinstance(value, dict):
            out += task_leaves(value)
        elif value is not None and hasattr(value, "set_config"):
            out.append((str(getattr(value, "task_name", None) or name), value))
    return out
