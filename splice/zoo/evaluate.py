"""Score models on the zoo's tasks with lm-eval, in process; tasks are loaded once.

``evaluate(models, tasks)`` returns ``{model: {task: accuracy}}``: ``acc`` for the
multiple-choice tasks, ``exact_match`` for the ``*_gen`` twins.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from splice.errors import SpliceError
from splice.progress import progress
from splice.zoo.tasks import ALL_TASKS, MC_TASKS, write_tasks

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Model = Union[str, "os.PathLike[str]", "PreTrainedModel"]


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"zoo_math,zoo_lang"`` or a list -> task names; ``None``: the multiple-choice tasks;
    ``"all"``: MC and generate-until. Unknown names are a :class:`SpliceError`."""
    if spec is None:
        return list(MC_TASKS)
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return list(ALL_TASKS)
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown or not names:
        raise SpliceError(
            f"unknown zoo task {', '.join(unknown) or '(none)'}; choose from: {', '.join(ALL_TASKS)}, all"
        )
    return names


def load_model(path: str | os.PathLike[str]) -> PreTrainedModel:
    """A zoo model folder as a float32 model in eval mode (weights may be stored in bf16)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise SpliceError(f"{path}: not a model folder (no config.json)")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def _metric(result: Mapping[str, Any]) -> float:
    for key in ("acc,none", "exact_match,strip"):
        if key in result:
            return float(result[key])
    raise KeyError(f"no accuracy in {sorted(result)}")


def evaluate(
    models: Mapping[str, Model] | Sequence[str | os.PathLike[str]],
    tasks: str | Sequence[str] | None = None,
    *,
    zoo: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    threads: int = 1,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Accuracy of every model on every task: ``{name: {task: accuracy}}``.

    ``models`` is a list of model folders (named by their path) or a mapping name -> folder or
    model object. ``zoo`` is the built zoo whose ``tasks/`` to use (default: :func:`default_dir`,
    built if needed); ``tokenizer`` defaults to the zoo's base model.
    """
    import torch

    from splice.zoo.build import default_dir

    names = parse_tasks(tasks)
    if not isinstance(models, Mapping):
        models = {str(m): m for m in models}
    for name, m in models.items():
        if isinstance(m, str | os.PathLike) and not (Path(m) / "config.json").is_file():
            raise SpliceError(f"{name}: not a model folder (no config.json)")
    zoo_dir = Path(zoo) if zoo is not None else default_dir()
    if zoo is None:
        from splice.zoo.build import build

        build(zoo_dir, show_progress=show_progress)
    task_dir = zoo_dir / "tasks"
    if not task_dir.is_dir():
        raise SpliceError(
            f"{zoo_dir}: not a built zoo (no tasks/); run `splice zoo build {zoo_dir}`"
        )
    write_tasks(task_dir)

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    quiet = contextlib.ExitStack()
    # one thread by default: these models are too small for a second one to pay, and on a
    # shared CPU two threads wait on each other (5x slower measured here)
    quiet.callback(torch.set_num_threads, torch.get_num_threads())
    torch.set_num_threads(threads)
    for log in ("lm-eval", "lm_eval", "datasets", "transformers"):
        logger = logging.getLogger(log)
        quiet.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    with quiet:
        from lm_eval.evaluator import evaluate as lm_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        tok = AutoTokenizer.from_pretrained(tokenizer or zoo_dir / "base")
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        with contextlib.redirect_stderr(io.StringIO()):  # datasets' "Generating split" bars
            task_dict = manager.load(names)
        out: dict[str, dict[str, float]] = {}
        for name in progress(list(models), "zoo eval", enabled=show_progress):
            m = models[name]
            model = load_model(m) if isinstance(m, str | os.PathLike) else m
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=128)
            # lm-eval's own bars and logs would bury the table; the bar above shows progress
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                res = lm_evaluate(
                    lm,
                    task_dict,
                    limit=limit,
                    bootstrap_iters=0,
                    log_samples=False,
                    verbosity="ERROR",
                )
            assert res is not None
            out[name] = {t: _metric(res["results"][t]) for t in names}
    return out


def format_table(scores: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per model, one column per task."""
    tasks = list(dict.fromkeys(t for row in scores.values() for t in row))
    width = max([5, *(len(m) for m in scores)])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{t:>13}" for t in tasks)]
    for m, row in scores.items():
        lines.append(
            f"{m:<{width}}  " + "  ".join(f"{row.get(t, float('nan')):>13.3f}" for t in tasks)
        )
    return "\n".join(lines)
