"""Fitness from lm-eval: evolve's configuration of the core scorer
(:class:`splice.lmeval.LmEvalScorer`: tasks loaded once, ``HFLM`` wrapping the live module).

Tasks come from ``tasks_dir`` (local YAML tasks), the zoo (names ``zoo_*``: the zoo's task
configs, written into a scratch folder, so the fitness splits ``zoo_*_fit`` of zoo v2 work by
name) or lm-eval's installed tasks (looked up only when a name is found in neither). An
unknown name is a :class:`SpliceError`. Evolve's own parts are here: the metric per task and
its direction, few-shot, the seeded shuffle, ``limit``, the chat template and the fitness.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError, SpliceWarning
from splice.evolve.config import LmEvalArgs, TaskSpec
from splice.lmeval import LmEvalScorer
from splice.lmeval import task_leaves as _leaves

if TYPE_CHECKING:
    import torch


def fitness(
    tasks: Sequence[TaskSpec], scores: Mapping[str, float], higher: Mapping[str, bool]
) -> float:
    """``sum_i weight_i * score_i``, with ``score_i`` negated where lower is better
    (``higher[task name]``). NaN if a score is missing or not finite."""
    total = 0.0
    for col, w in signed_weights(tasks, higher).items():
        s = scores.get(col)
        if s is None or not math.isfinite(s):
            return math.nan
        total += w * s
    return total


def signed_weights(tasks: Sequence[TaskSpec], higher: Mapping[str, bool]) -> dict[str, float]:
    """Per score column: its task's weight in the fitness, negated where lower is better."""
    return {_key(t): t.weight * (1 if higher[_key(t)] else -1) for t in tasks}


def _key(t: TaskSpec) -> str:
    """A task's column in the scores: its name, or ``name:metric`` when the metric is not acc."""
    return t.name if t.metric_key == "acc,none" else f"{t.name}:{t.metric_key}"


def score_columns(tasks: Sequence[TaskSpec]) -> list[str]:
    return [_key(t) for t in tasks]


class TaskScorer:
    """The configured tasks, loaded once; :meth:`score` evaluates a live module.

    ``tokenizer`` is a loaded tokenizer. ``seed`` seeds the shuffle (``lm_eval.shuffle``) and
    the few-shot sampler. Holds a scratch folder (zoo configs) until :meth:`close`.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        tokenizer: Any,
        args: LmEvalArgs,
        tasks_dir: str | os.PathLike[str] | None = None,
        zoo: str | os.PathLike[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.tasks = list(tasks)
        self.args = args
        self.tokenizer = tokenizer
        if tasks_dir is not None and not Path(tasks_dir).is_dir():
            raise SpliceError(f"tasks_dir {tasks_dir}: no such folder")
        zoo_tasks = None
        if any(t.name.startswith("zoo_") for t in self.tasks):
            from splice.zoo.build import default_dir

            zoo_dir = Path(zoo) if zoo is not None else default_dir()
            if (zoo_dir / "tasks").is_dir():
                zoo_tasks = zoo_dir / "tasks"
        self.lm = LmEvalScorer(
            [t.name for t in self.tasks],
            tokenizer=tokenizer,
            task_dirs=[tasks_dir] if tasks_dir is not None else [],
            zoo_tasks=zoo_tasks,
            batch_size=args.batch_size,
            max_length=args.max_length,
            hint=" (give --include-path for local YAML tasks)",
        )
        self.task_dict = self.lm.task_dict
        try:
            for _name, task in self.lm.leaves():
                if args.num_fewshot is not None:
                    task.set_config(key="num_fewshot", value=args.num_fewshot)
                if hasattr(task, "set_fewshot_seed"):
                    task.set_fewshot_seed(seed=seed)
                if args.shuffle:
                    _shuffle(task, seed)
            self.higher = self._directions()
        except BaseException:
            self.close()
            raise
        if args.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            self.close()
            raise SpliceError("lm_eval.apply_chat_template is true but the tokenizer has none")
        self.chat = (
            bool(getattr(tokenizer, "chat_template", None))
            if args.apply_chat_template is None
            else args.apply_chat_template
        )

    def __enter__(self) -> TaskScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.lm.close()

    def _directions(self) -> dict[str, bool]:
        """Per score column: whether higher is better (the config's, else the task's). A metric
        the task does not compute is a ``SpliceError`` here, before any candidate runs."""
        tasks = dict(_leaves(self.task_dict))
        out = {}
        for t in self.tasks:
            declared = None
            task = tasks.get(t.name)
            metrics = _metrics(task)
            name = t.metric_key.split(",")[0]
            if metrics and name not in metrics:
                raise SpliceError(
                    f"task {t.name} has no metric {name} (it computes {', '.join(metrics)})"
                )
            if task is not None:
                with contextlib.suppress(Exception):
                    declared = task.higher_is_better().get(t.metric_key.split(",")[0])
            higher = t.higher_is_better if t.higher_is_better is not None else declared
            if t.higher_is_better is None and declared is False and t.weight < 0:
                higher = True  # mergekit-evolve's convention: the weight's sign says it
                warnings.warn(
                    f"task {t.name}: {t.metric} is lower-is-better and its weight is negative: "
                    "read as mergekit-evolve's way of minimizing it (negated once); set "
                    "higher_is_better to say otherwise",
                    SpliceWarning,
                    stacklevel=3,
                )
            out[_key(t)] = True if higher is None else bool(higher)
        return out

    # ---- scoring ------------------------------------------------------------------------------
    def score(self, module: torch.nn.Module) -> dict[str, float]:
        """``{column: metric}`` of the live ``module`` on every task (the module as it is now:
        ``HFLM`` is made once per module object and reads its parameters at each call)."""
        rows = self.lm.score(
            module,
            limit=self.args.limit,
            apply_chat_template=self.chat,
            fewshot_as_multiturn=self.args.fewshot_as_multiturn and self.chat,
        )
        out = {}
        for t in self.tasks:
            row = rows.get(t.name, {})
            if t.metric_key not in row:
                raise SpliceError(
                    f"task {t.name} has no metric {t.metric_key} (it reports "
                    f"{', '.join(row) or 'nothing'})"
                )
            out[_key(t)] = row[t.metric_key]
        return out

    def fitness(self, scores: Mapping[str, float]) -> float:
        return fitness(self.tasks, scores, self.higher)

    # ---- per item (splice.evolve.fitness) ------------------------------------------------------
    def check_items(self, why: str) -> None:
        """Every fitness metric is a mean over items (else an estimate from some of them means
        nothing): ``SpliceError`` naming the first that is not."""
        from lm_eval.api.metrics import mean

        tasks = dict(_leaves(self.task_dict))
        for t in self.tasks:
            task = tasks.get(t.name)
            name = t.metric_key.split(",")[0]
            agg = None
            with contextlib.suppress(Exception):
                agg = task.aggregation().get(name)
            if task is None or agg is not mean:
                raise SpliceError(
                    f"{why}: task {t.name}'s {name} is not a mean over its documents (or the "
                    "task is a group); use search.fitness: full"
                )

    def fitness_docs(self) -> dict[str, list[int]]:
        """Per score column: the doc ids of the whole fitness split (the first
        ``lm_eval.limit`` documents, as lm-eval's ``limit`` takes them)."""
        tasks = dict(_leaves(self.task_dict))
        out = {}
        for t in self.tasks:
            n = len(tasks[t.name].eval_docs)
            out[_key(t)] = list(range(min(n, self.args.limit or n)))
        return out

    def signed_weights(self) -> dict[str, float]:
        return signed_weights(self.tasks, self.higher)

    def score_items(
        self, module: torch.nn.Module, docs: Mapping[str, Sequence[int]]
    ) -> dict[str, dict[int, float]]:
        """``{column: {doc id: value}}`` of the live ``module`` on the documents ``docs`` (per
        column; empty lists are skipped)."""
        names: dict[str, list[int]] = {}
        for t in self.tasks:
            ids = list(docs.get(_key(t), []))
            if ids:
                names[t.name] = sorted(set(names.get(t.name, [])) | set(ids))
        out: dict[str, dict[int, float]] = {_key(t): {} for t in self.tasks}
        if not names:
            return out
        self.lm.score(
            module,
            samples=names,
            apply_chat_template=self.chat,
            fewshot_as_multiturn=self.args.fewshot_as_multiturn and self.chat,
        )
        for t in self.tasks:
            want = set(docs.get(_key(t), []))
            metric, _, filt = t.metric_key.partition(",")
            for rec in self.lm.samples.get(t.name, []):
                if rec.get("filter", "none") == filt and rec["doc_id"] in want:
                    out[_key(t)][int(rec["doc_id"])] = float(rec[metric])
            if len(out[_key(t)]) != len(want):
                raise SpliceError(
                    f"task {t.name}: lm-eval returned {len(out[_key(t)])} of {len(want)} "
                    f"documents' {t.metric_key}"
                )
        return out


def _metrics(task: Any) -> list[str]:
    """The metric names a task computes (empty where lm-eval does not say)."""
    try:
        return [str(m) for m in task.aggregation()]
    except Exception:
        return []


def _shuffle(task: Any, seed: int) -> None:
    """The task's documents in a seeded random order (mergekit-evolve's ``shuffle``, which
    shuffles unseeded), so ``limit`` takes a random subset, the same in every candidate."""
    dataset = getattr(task, "dataset", None)
    if dataset is None or not hasattr(dataset, "keys"):
        return
    for split in list(dataset.keys()):
        dataset[split] = dataset[split].shuffle(seed=seed)
