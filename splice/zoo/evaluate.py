"""Score models on the zoo's tasks with lm-eval, in process; tasks are loaded once (the zoo's
configuration of the core scorer :class:`splice.lmeval.LmEvalScorer`).

``evaluate(models, tasks)`` returns ``{model: {task: accuracy}}``: ``acc`` for the
multiple-choice tasks, ``exact_match`` for the ``*_gen`` twins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from splice.errors import SpliceError
from splice.progress import progress
from splice.zoo.tasks import ALL_TASKS, MC_TASKS, check_data

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from splice.checkpoint import Checkpoint

Model = Union[str, "os.PathLike[str]", "PreTrainedModel"]


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"zoo_math,zoo_lang"`` or a list -> task names; ``None``: the multiple-choice tasks;
    ``"all"``: MC and generate-until. Unknown names are a :class:`SpliceError`."""
    if spec is None:
        return list(MC_TASKS)
    raw = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(str(t).strip() for t in raw if str(t).strip()))
    if names == ["all"]:
        return list(ALL_TASKS)
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown or not names:
        raise SpliceError(
            f"unknown zoo task {', '.join(unknown) or '(none)'}; choose from: {', '.join(ALL_TASKS)}, all"
        )
    return names


#: why a model with NaN or inf weights is refused
_FINITE = "a model with NaN or inf weights cannot be scored"


def check_model(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> Checkpoint:
    """The local model folder at ``path``, read and checked by the core reader (config, weights
    and their shapes; pickled ``.bin`` only with ``allow_pickle``; custom code only with
    ``trust_remote_code``): one-line :class:`SpliceError` otherwise."""
    from splice.modeling import check_runnable

    # zoo eval takes local folders only (no hub downloads)
    return check_runnable(
        path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, local_only=True
    )


def load_model(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> PreTrainedModel:
    """README's ``splice.zoo.load_model``: the folder checked (:func:`check_model`), then
    :func:`splice.modeling.load_causal_lm` in float32 (NaN or inf: "cannot be scored")."""
    from splice.modeling import load_causal_lm

    ckpt = check_model(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return load_causal_lm(
        ckpt,
        dtype="float32",
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        why=_FINITE,
    )


def _embeddings(m: Checkpoint | PreTrainedModel) -> int | None:
    """Rows of a model's input embedding (None where unknown)."""
    from splice.checkpoint import Checkpoint

    if isinstance(m, Checkpoint):
        emb = m.tensors.get(m.arch.embed) if m.arch.embed else None
        return emb.shape[0] if emb is not None and emb.shape else None
    get = getattr(m, "get_input_embeddings", None)
    layer = get() if get is not None else None
    return getattr(layer, "num_embeddings", None)


def _metric(result: Mapping[str, Any]) -> float:
    for key in ("acc,none", "exact_match,strip"):
        if key in result:
            return float(result[key])
    raise KeyError(f"no accuracy in {sorted(result)}")


def _task_dir(zoo_dir: Path) -> Path:
    """The built zoo's ``tasks/`` folder, its data checked (one :class:`SpliceError` line)."""
    task_dir = zoo_dir / "tasks"
    if not task_dir.is_dir():
        raise SpliceError(
            f"{zoo_dir}: not a built zoo (no tasks/); run `splice zoo build {zoo_dir}`"
        )
    check_data(task_dir)
    return task_dir


def check_zoo(
    zoo: str | os.PathLike[str] | None,
    models: Mapping[str, Checkpoint | PreTrainedModel],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    show_progress: bool = False,
) -> tuple[Path, Any]:
    """The zoo whose tasks score ``models`` (checked folders or live models) and the tokenizer
    that reads them (``tokenizer``, default the zoo's base): ``zoo`` must be built (None:
    :func:`default_dir`, built if needed), its task data well formed and every model's
    embeddings must cover the tokenizer; one :class:`SpliceError` line otherwise."""
    from splice.modeling import load_tokenizer
    from splice.zoo.build import default_dir

    zoo_dir = Path(zoo) if zoo is not None else default_dir()
    if zoo is None:
        from splice.zoo.build import build

        build(zoo_dir, show_progress=show_progress)
    _task_dir(zoo_dir)
    tok = load_tokenizer(tokenizer or zoo_dir / "base")
    for name, m in models.items():
        rows = _embeddings(m)
        if rows is not None and rows < len(tok):
            raise SpliceError(
                f"{name}: has {rows} token embeddings but the zoo's tokenizer has {len(tok)} "
                "tokens; zoo eval scores models with the zoo's vocabulary"
            )
    return zoo_dir, tok


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
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, dict[str, float]]:
    """Accuracy of every model on every task: ``{name: {task: accuracy}}``.

    ``models`` is a list of model folders (named by their path) or a mapping name -> folder or
    model object. ``zoo`` is the built zoo whose ``tasks/`` to use (default: :func:`default_dir`,
    built if needed); ``tokenizer`` defaults to the zoo's base model. Every model folder is
    checked (:func:`check_model`) before any work; pickled ``.bin`` weights are read only with
    ``allow_pickle`` and a model's own code runs only with ``trust_remote_code``.
    """
    from splice.modeling import load_causal_lm

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = parse_tasks(tasks)
    for label, value in (("limit", limit), ("batch_size", batch_size), ("threads", threads)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise SpliceError(f"{label} must be a whole number of 1 or more, got {value!r}")
    if not isinstance(models, Mapping):
        models = {str(m): m for m in models}
    if not models:
        raise SpliceError("no model to score")
    checked: dict[str, Checkpoint] = {}
    for name, m in models.items():
        if isinstance(m, str | os.PathLike):
            checked[name] = check_model(
                m, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
            )
    zoo_dir, tok = check_zoo(
        zoo,
        {name: checked.get(name, m) for name, m in models.items()},
        tokenizer=tokenizer,
        show_progress=show_progress,
    )
    with Scorer(
        names, zoo=zoo_dir, tokenizer=tok, batch_size=batch_size, threads=threads
    ) as scorer:
        out: dict[str, dict[str, float]] = {}
        for name in progress(list(models), "zoo eval", enabled=show_progress):
            m = models[name]
            model = (
                load_causal_lm(
                    checked[name],
                    trust_remote_code=trust_remote_code,
                    allow_pickle=allow_pickle,
                    why=_FINITE,
                )
                if name in checked
                else m
            )
            out[name] = scorer.score(model, limit=limit)
    return out


class Scorer:
    """The zoo's lm-eval tasks loaded once, scoring any number of live models in process (the
    path a search takes: merge into a module, score it, repeat): the zoo's configuration of
    :class:`splice.lmeval.LmEvalScorer`.

    ``with Scorer(["zoo_math_lang_fit"]) as s: s.score(model)`` -> ``{task: accuracy}``.
    ``zoo`` is a built zoo (default :func:`default_dir`), ``tokenizer`` a folder or a loaded
    tokenizer (default: the zoo's base). While open, torch runs on ``threads`` threads (one by
    default: these models are too small for a second to pay, and on a shared CPU two threads
    wait on each other) and lm-eval's loggers are quiet; both are restored on close.
    """

    def __init__(
        self,
        tasks: str | Sequence[str] | None = None,
        *,
        zoo: str | os.PathLike[str] | None = None,
        tokenizer: Any = None,
        batch_size: int = 64,
        threads: int = 1,
        max_length: int = 128,
    ) -> None:
        from splice.lmeval import LmEvalScorer
        from splice.modeling import load_tokenizer
        from splice.zoo.build import default_dir

        self.tasks = parse_tasks(tasks)
        zoo_dir = Path(zoo) if zoo is not None else default_dir()
        task_dir = _task_dir(zoo_dir)
        if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(tokenizer or zoo_dir / "base")
        self.tokenizer = tokenizer
        self.lm = LmEvalScorer(
            self.tasks,
            tokenizer=tokenizer,
            zoo_tasks=task_dir,
            batch_size=batch_size,
            max_length=max_length,
            threads=threads,
        )
        self.task_dict = self.lm.task_dict

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.lm.close()

    def score(
        self, model: PreTrainedModel, *, limit: int | None = None, batch_size: int | None = None
    ) -> dict[str, float]:
        """``{task: accuracy}`` of a live model (``acc``; ``exact_match`` for ``*_gen``)."""
        rows = self.lm.score(model, limit=limit, batch_size=batch_size)
        return {t: _metric(rows[t]) for t in self.tasks}


def throughput(
    model: PreTrainedModel,
    task: str = "zoo_math_lang",
    *,
    batch_sizes: Sequence[int] = (16, 64, 256, 1024),
    repeat: int = 3,
    zoo: str | os.PathLike[str] | None = None,
    threads: int = 1,
) -> list[dict[str, float]]:
    """Loglikelihood requests per second of lm-eval scoring ``model`` on one multiple-choice
    ``task`` in process (:class:`Scorer`: tasks loaded once, ``HFLM`` on the live module), for
    each batch size: best of ``repeat`` runs after a warm-up. One request is one (prompt,
    choice) pair. Returns ``[{batch_size, requests, seconds, requests_per_s, items_per_s}]``."""
    import time

    if task.endswith("_gen"):
        raise SpliceError(f"{task}: throughput is measured on multiple-choice tasks")
    rows = []
    with Scorer([task], zoo=zoo, threads=threads) as scorer:
        loaded = scorer.task_dict.get("tasks", scorer.task_dict)
        t = loaded[task]
        docs = list(t.test_docs())
        requests = sum(len(d["choices"]) for d in docs)
        scorer.score(model, batch_size=batch_sizes[0])  # warm-up
        for bs in batch_sizes:
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                scorer.score(model, batch_size=bs)
                best = min(best, time.perf_counter() - t0)
            rows.append(
                {
                    "batch_size": bs,
                    "requests": requests,
                    "seconds": round(best, 3),
                    "requests_per_s": round(requests / best, 1),
                    "items_per_s": round(len(docs) / best, 1),
                }
            )
    return rows


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
