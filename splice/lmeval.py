"""The one in-process lm-eval scorer: tasks loaded once, ``HFLM`` on a live torch module.

:class:`LmEvalScorer` is configured by the zoo (:class:`splice.zoo.evaluate.Scorer`, which
``splice zoo eval`` and ``splice eval --tasks`` reach) and by evolve
(``splice.evolve.scorer.TaskScorer``: fitness, metric directions, shuffle, few-shot). It
finds tasks in local YAML folders, in the zoo (its task configs written into a scratch folder
that names the zoo's data, so the zoo is not written) and, only when a name is found in
neither, among lm-eval's installed tasks. While open, lm-eval's loggers are quiet (and torch
runs on ``threads`` threads where given); both are restored on :meth:`~LmEvalScorer.close`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch

#: the loggers quietened while a scorer is open
_LOGGERS = ("lm-eval", "lm_eval", "datasets", "transformers")


class LmEvalScorer:
    """lm-eval's ``tasks`` loaded once; :meth:`score` evaluates a live module in process.

    ``task_dirs`` are folders of local YAML tasks, ``zoo_tasks`` a built zoo's ``tasks/``
    folder (its configs are written into a scratch folder held until :meth:`close`); a name
    found in none of them is looked up among lm-eval's own tasks, and an unknown one is a
    :class:`SpliceError` (``hint`` ends its message). ``tokenizer`` is a loaded tokenizer;
    ``batch_size`` and ``max_length`` (None: the model's) go to ``HFLM``.
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
        hint: str = "",
    ) -> None:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tasks = list(dict.fromkeys(tasks))
        self.tokenizer = tokenizer
        self.batch_size, self.max_length = batch_size, max_length
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
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> LmEvalScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _load(self, paths: list[str], zoo_tasks: Any, hint: str) -> Any:
        from lm_eval.tasks import TaskManager

        if zoo_tasks is not None:
            from splice.scratch import scratch_folder
            from splice.zoo.tasks import write_tasks

            configs = self._stack.enter_context(scratch_folder("lm-eval-tasks"))
            write_tasks(configs, zoo_tasks)
            paths.append(configs)
        with contextlib.redirect_stderr(io.StringIO()):
            manager = TaskManager(include_path=paths or None, include_defaults=False)
            if not paths or any(n not in manager.all_tasks for n in self.tasks):
                manager = TaskManager(include_path=paths or None, include_defaults=True)
        unknown = [n for n in self.tasks if n not in manager.all_tasks]
        if unknown:
            where = f" in {', '.join(paths)} or" if paths else ""
            raise SpliceError(
                f"unknown task {', '.join(unknown)}: not found{where} among lm-eval's tasks{hint}"
            )
        # datasets' "Generating split" bars
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return manager.load(self.tasks)

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
    ) -> dict[str, dict[str, float]]:
        """``{task: {"metric,filter": value}}`` of the live ``module`` on every task (the
        module as it is now: ``HFLM`` is made once per module object, reads its parameters at
        each call and is re-pointed to ``batch_size``, default the scorer's)."""
        from lm_eval.evaluator import evaluate

        if self._module is not module:
            from lm_eval.models.huggingface import HFLM

            kw = {"max_length": self.max_length} if self.max_length else {}
            with contextlib.redirect_stderr(io.StringIO()):
                self._lm = HFLM(
                    pretrained=module, tokenizer=self.tokenizer, batch_size=self.batch_size, **kw
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
            for t in self.tasks
        }


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
