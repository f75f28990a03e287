"""Scores of a causal LM: perplexity on a text, and lm-eval tasks (the zoo's or any other).

:func:`perplexity` is token-level perplexity with sliding windows (Hugging Face's recipe): the
text is tokenized once (BOS first, if the tokenizer has one), windows of ``seq_len`` tokens start
every ``stride`` tokens, and each window scores only the tokens the previous one did not, so
with ``stride < seq_len`` every token after the first is scored exactly once with at least
``seq_len - stride`` tokens of context. Windows run in batches; log-probabilities are taken in
float32 and summed in float64.

:func:`evaluate` scores several models: perplexity on a text and/or lm-eval tasks, each a
zoo task, a task, group or tag of lm-eval's or of a folder of YAML tasks (``include_path``), or
a YAML file (:func:`resolve_tasks`), all run in process by one
:class:`splice.lmeval.LmEvalScorer` (the scorer ``splice zoo eval`` configures). It returns plain
numbers ``{model: {"ppl": ..., "zoo_math": ...}}`` (:func:`task_columns` names the task
columns); ``splice eval`` prints them, and every surgery verb reports with it. A per-layer
sliced model (``splice slice --basis per-layer``) is scored like any other
(:func:`splice.modeling.load_causal_lm` with ``sliced=True``).

``--ppl zoo`` is the zoo's held-out English text (``text/heldout_en.txt`` of a built zoo:
documents of the pre-training distribution never trained on, joined as the zoo trains),
``zoo:zeta`` its Zeta half and ``zoo:both`` all its documents, English and Zeta alternately
(:data:`HELDOUT_NAMES`). The same names given to ``--calibration`` are fresh calibration text
instead (:func:`splice.calib.calibration_text`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from splice.errors import SpliceError, SpliceWarning
from splice.threads import threads_for

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from splice.checkpoint import Checkpoint

Model = Union[str, "os.PathLike[str]", "PreTrainedModel"]

#: ``--ppl`` names of the zoo's held-out text, read from a built zoo's ``text/``
#: (:func:`splice.zoo.build.read_heldout`): name -> language
HELDOUT_NAMES = {"zoo": "en", "zoo:en": "en", "zoo:zeta": "zeta", "zoo:both": "both"}
#: items per batch of an lm-eval task
TASK_BATCH = 64


@dataclass(frozen=True)
class Perplexity:
    """``ppl = exp(nll)``: ``nll`` the mean negative log-likelihood (nats) of ``tokens`` scored
    tokens, over ``windows`` windows of ``seq_len`` tokens taken every ``stride`` tokens."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_text(
    source: str | os.PathLike[str],
    *,
    option: str = "--ppl",
    zoo: str | os.PathLike[str] | None = None,
    include_path: str | os.PathLike[str] | None = None,
) -> str:
    """A text file, ``lm-eval:TASK`` (a task's documents) or a named text, for ``option``.
    ``--ppl`` reads the :data:`HELDOUT_NAMES` as the held-out text of the built zoo ``zoo``
    (default the shared zoo): ``zoo`` (or ``zoo:en``) its English documents, what ``base``
    and ``math`` read; ``zoo:zeta`` its Zeta ones; ``zoo:both`` the two alternately. Any other
    option reads every name as :func:`splice.calib.calibration_text` does (``zoo``: fresh
    calibration text). A name is the named text even where a file of that name is here.
    ``include_path``: a folder of YAML tasks ``lm-eval:TASK`` may name."""
    from splice.calib import calibration_text, is_text_source

    src = str(source)
    if option == "--ppl" and isinstance(source, str) and src in HELDOUT_NAMES:
        from splice.zoo.build import read_heldout

        if Path(src).exists():
            import warnings

            warnings.warn(
                f"{option} {src}: read as the zoo's held-out text, not the file or folder of "
                f"that name here (give ./{src} for that)",
                SpliceWarning,
                stacklevel=2,
            )
        return read_heldout(zoo, HELDOUT_NAMES[src])
    if not (Path(src).exists() or is_text_source(src)):
        raise SpliceError(f"{option} {src}: no such text file (give a file, lm-eval:TASK or zoo)")
    if Path(src).exists() and not Path(src).is_file():
        raise SpliceError(f"{option} {src}: not a file")
    return calibration_text(src, include_path=None if include_path is None else str(include_path))


def text_ids(tokenizer: Any, text: str, *, max_tokens: int | None = None) -> torch.Tensor:
    """``[N]`` token ids of ``text``: the tokenizer's BOS (if any), then the text's tokens,
    at most ``max_tokens`` in all: those of the whole text tokenized at once
    (:func:`splice.calib.text_tokens` reads only a long enough prefix)."""
    import torch

    from splice.calib import text_tokens

    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = [bos] if bos is not None else []
    ids += text_tokens(tokenizer, text, max_tokens)
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over ``n_tokens`` tokens: ``(begin, end, first)`` per window, scoring the
    tokens at positions ``first..end-1`` (each predicted from the window's tokens before it)."""
    check_window(seq_len, stride, n_tokens)
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def check_window(
    seq_len: int, stride: int, n_tokens: int | None = None, what: str = "the text"
) -> None:
    """``SpliceError`` unless ``seq_len >= 2``, ``1 <= stride <= seq_len`` and the text
    (``n_tokens``, when given) fills one window."""
    from splice.limits import check_number

    check_number("seq_len", seq_len, least=2, whole=True)
    check_number("stride", stride, least=1, whole=True)
    if stride > seq_len:
        raise SpliceError(f"stride {stride} is longer than the window ({seq_len} tokens)")
    if n_tokens is not None and n_tokens < seq_len:
        raise SpliceError(
            f"{what} is too short: {n_tokens} tokens, fewer than one window of {seq_len} "
            "(give a longer text or a smaller --seq-len)"
        )


def perplexity(
    model: PreTrainedModel,
    text: str | torch.Tensor,
    *,
    tokenizer: Any = None,
    seq_len: int = 128,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> Perplexity:
    """Perplexity of ``model`` (on its device) on ``text`` (a string, tokenized with
    ``tokenizer``, or ``[N]`` token ids). ``stride`` defaults to ``seq_len // 2``."""
    import torch

    if isinstance(text, str):
        if tokenizer is None:
            raise SpliceError("perplexity of a text needs its tokenizer")
        ids = text_ids(tokenizer, text, max_tokens=max_tokens)
    else:
        ids = text.reshape(-1)[:max_tokens] if max_tokens else text.reshape(-1)
    stride = stride if stride is not None else max(1, seq_len // 2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpliceError(f"batch_size must be a whole number of 1 or more, got {batch_size!r}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise SpliceError(f"seq_len {seq_len} exceeds the model's {max_pos} positions")
    rows = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= rows:
        raise SpliceError(
            f"the tokenizer gives token id {int(ids.max())} but the model has {rows} embeddings"
        )
    spans = windows(int(ids.numel()), seq_len, stride)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    # windows of one length go together: all but perhaps the last are seq_len long
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    with torch.inference_mode():
        for width, group in groups.items():
            for k in range(0, len(group), batch_size):
                part = group[k : k + batch_size]
                batch = torch.stack([ids[b:e] for b, e, _ in part]).to(device)
                logits = model(input_ids=batch, use_cache=False).logits  # [B, T, V]
                scored = torch.zeros(len(part), width, dtype=torch.bool, device=device)
                for row, (b, _e, first) in enumerate(part):
                    scored[row, first - b :] = True
                # position p is predicted by the logits at p - 1
                pred = logits[:, :-1][scored[:, 1:]].float()
                target = batch[:, 1:][scored[:, 1:]]
                nll = torch.nn.functional.cross_entropy(pred, target, reduction="none")
                total += float(nll.double().sum())
                count += int(target.numel())
    mean = total / max(count, 1)
    if not math.isfinite(mean):
        raise SpliceError("the model's log-likelihood is NaN or inf on this text")
    return Perplexity(math.exp(mean), mean, count, len(spans), seq_len, stride)


# ---- several models ---------------------------------------------------------------------------
def evaluate(
    models: Mapping[str, Model] | Sequence[str | os.PathLike[str]],
    *,
    text: str | None = None,
    tasks: str | Sequence[str] | None = None,
    seq_len: int = 128,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    tokenizer: str | os.PathLike[str] | Any = None,
    zoo: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    include_path: str | os.PathLike[str] | None = None,
    num_fewshot: int | None = None,
    show_progress: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    text_name: str = "the text",
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """Scores of every model: ``{name: {"ppl": perplexity on text, task: metric, ...}}``.

    ``models``: folders (named by their path) or a mapping name -> folder or live model.
    ``text`` is scored with :func:`perplexity` (each folder's own tokenizer; a live model needs
    ``tokenizer``). ``tasks`` (``"zoo_math,hellaswag"``, a list; ``"all"``: the zoo's) are
    lm-eval tasks, groups, tags or YAML files (:func:`resolve_tasks`: the zoo's from ``zoo``,
    others from ``include_path`` or lm-eval's installed tasks), run with ``num_fewshot``
    examples in context (None: each task's own) on the first ``limit`` items; their columns are
    named by :func:`task_columns`. Every input is checked before any model is loaded
    (:func:`check_scoring`; ``text_name`` names the text in its messages) and the tasks are
    loaded once; each model is then loaded once (a per-layer sliced model too), in ``dtype`` on
    ``device``, scored on ``threads`` CPU threads (None: one for a small model, as
    :func:`splice.threads.threads_for` decides), and dropped.
    """
    from splice.devices import resolve_device
    from splice.layer_metrics import float_dtype

    if text is None and tasks is None:
        raise SpliceError("nothing to score: give a text (--ppl FILE) and/or tasks (--tasks)")
    device = resolve_device(device)
    dtype = float_dtype(dtype, "--compute-dtype")
    if not isinstance(models, Mapping):
        models = {str(m): m for m in models}
    inputs = check_scoring(
        models,
        text=text,
        tasks=tasks,
        seq_len=seq_len,
        stride=stride,
        batch_size=batch_size,
        max_tokens=max_tokens,
        tokenizer=tokenizer,
        zoo=zoo,
        limit=limit,
        include_path=include_path,
        num_fewshot=num_fewshot,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        text_name=text_name,
        show_progress=show_progress,
    )
    checked = {name: ckpt.path for name, ckpt in inputs.folders.items()}
    from splice.progress import progress

    with contextlib.ExitStack() as stack:
        scorer = None
        if inputs.tasks is not None:
            from splice.lmeval import LmEvalScorer

            scorer = stack.enter_context(
                LmEvalScorer(
                    inputs.tasks.names,
                    tokenizer=None,
                    task_dirs=inputs.tasks.dirs,
                    zoo_tasks=inputs.zoo / "tasks" if inputs.zoo is not None else None,
                    batch_size=TASK_BATCH,
                    num_fewshot=num_fewshot,
                )
            )
        out: dict[str, dict[str, float]] = {}
        for name in progress(list(models), "eval", enabled=show_progress and len(models) > 1):
            out[name] = {}
            if name in checked:
                from splice.modeling import load_causal_lm

                model = load_causal_lm(
                    checked[name],
                    dtype=dtype,
                    device=device,
                    trust_remote_code=trust_remote_code,
                    allow_pickle=allow_pickle,
                    why="a model with NaN or inf weights cannot be scored",
                    sliced=True,
                )
            else:
                model = models[name]
            with threads_for(_largest(inputs.folders.get(name), model), threads):
                if text is not None:
                    ppl = perplexity(
                        model,
                        inputs.ids[name],
                        seq_len=seq_len,
                        stride=stride,
                        batch_size=batch_size,
                        max_tokens=max_tokens,
                    )
                    out[name]["ppl"] = ppl.ppl
                if scorer is not None:
                    tok = _tokenizer(inputs.tokenizers[name])
                    rows = scorer.score(model, limit=limit, tokenizer=tok)
                    out[name].update(task_columns(rows, scorer.tasks, scorer.members))
            del model
    return out


def task_columns(
    rows: Mapping[str, Mapping[str, float]],
    names: Sequence[str],
    members: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """The score columns of lm-eval's results ``rows`` (``{task: {"metric,filter": value}}``)
    for the requested ``names``: each name's own metrics where lm-eval reports them (a task, a
    group with an aggregate), else those of its ``members`` (a tag's tasks). A task's metric is
    the column ``task`` if it is ``acc,none`` or the task's only metric (the zoo's ``zoo_math``
    is its accuracy, ``zoo_math_gen`` its exact match), else ``task:metric,filter``
    (``hellaswag:acc_norm,none``), as evolve names its columns."""
    out: dict[str, float] = {}
    for name in names:
        tasks = [name] if rows.get(name) else list((members or {}).get(name, ()))
        for task in tasks:
            metrics = rows.get(task, {})
            for key, value in metrics.items():
                one = key == "acc,none" or len(metrics) == 1
                out[task if one else f"{task}:{key}"] = value
    return out


def _largest(ckpt: Checkpoint | None, model: Any) -> int:
    """Elements of the largest per-layer tensor (what :func:`threads_for` sizes the threads by)."""
    if ckpt is not None:
        from splice.layer_metrics import largest_layer_tensor

        return largest_layer_tensor(ckpt)
    return max((p.numel() for p in model.parameters()), default=0)


@dataclass(frozen=True)
class TaskSet:
    """The lm-eval tasks ``--tasks`` names, resolved (:func:`resolve_tasks`): ``names`` (each a
    task, group or tag; a YAML file's own task), ``dirs`` (folders of YAML tasks: the include
    path, then each YAML file's folder) and ``zoo`` (those of ``names`` the zoo provides: zoo
    task names no folder of ``dirs`` defines)."""

    names: tuple[str, ...]
    dirs: tuple[str, ...] = ()
    zoo: tuple[str, ...] = ()


def resolve_tasks(
    tasks: str | Sequence[str], include_path: str | os.PathLike[str] | None = None
) -> TaskSet:
    """``"zoo_math,hellaswag"`` (or a list) as a :class:`TaskSet`: ``all`` is every zoo task
    (:data:`splice.zoo.tasks.ALL_TASKS`); a ``.yaml`` / ``.yml`` file is the task it declares,
    its folder searched like ``include_path`` (a folder of YAML tasks, searched first); a zoo
    task name no folder defines is the zoo's; any other name must be a task, group or tag of
    those folders or of lm-eval's installed tasks (:func:`splice.lmeval.unknown_tasks`, which
    indexes lm-eval's tasks once per process). One :class:`SpliceError` line otherwise."""
    from splice.zoo.tasks import ALL_TASKS

    raw = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    specs = list(dict.fromkeys(t.strip() for t in raw if t.strip()))
    if not specs:
        raise SpliceError("--tasks names no task (give zoo_math, a lm-eval task or a YAML file)")
    dirs: list[str] = []
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise SpliceError(f"--include-path {include_path}: no such folder")
        dirs.append(str(include_path))
    names: list[str] = []
    for spec in specs:
        if spec == "all":
            names += ALL_TASKS
        elif spec.endswith((".yaml", ".yml")):
            from splice.lmeval import yaml_task

            if not Path(spec).is_file():
                raise SpliceError(f"--tasks {spec}: no such task file")
            names.append(yaml_task(spec))
            dirs.append(str(Path(spec).parent))
        else:
            names.append(spec)
    names = list(dict.fromkeys(names))
    dirs = list(dict.fromkeys(dirs))
    local: set[str] = set()
    if dirs and any(n in ALL_TASKS for n in names):
        from splice.lmeval import local_tasks

        local = set(local_tasks(dirs).all_tasks)
    zoo = [n for n in names if n in ALL_TASKS and n not in local]
    other = [n for n in names if n not in zoo]
    if other:
        from splice.lmeval import unknown_tasks

        unknown = unknown_tasks(other, dirs)
        guessed = [n for n in unknown if n.startswith("zoo_")]
        if guessed:
            raise SpliceError(
                f"unknown zoo task {', '.join(guessed)}; choose from: {', '.join(ALL_TASKS)}, "
                "all (or give --include-path for local YAML tasks)"
            )
        if unknown:
            where = f" in {', '.join(dirs)} or" if dirs else ""
            raise SpliceError(
                f"unknown task {', '.join(unknown)}: not found{where} among lm-eval's tasks "
                "(give --include-path for local YAML tasks)"
            )
    return TaskSet(tuple(names), tuple(dirs), tuple(zoo))


@dataclass
class ScoringInputs:
    """What :func:`check_scoring` checked: the model folders (opened checkpoints), the tasks
    (None: none asked for), the built zoo their zoo tasks come from, the tokenizer each model's
    tasks are read with (a folder or a loaded tokenizer), and every model's token ids of the
    text."""

    folders: dict[str, Checkpoint]
    tasks: TaskSet | None
    ids: dict[str, torch.Tensor]
    zoo: Path | None = None
    tokenizers: dict[str, Any] = field(default_factory=dict)


def check_scoring(
    models: Mapping[str, Model],
    *,
    text: str | None = None,
    tasks: str | Sequence[str] | None = None,
    seq_len: int = 128,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    tokenizer: str | os.PathLike[str] | Any = None,
    zoo: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    include_path: str | os.PathLike[str] | None = None,
    num_fewshot: int | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    text_name: str = "the text",
    show_progress: bool = False,
) -> ScoringInputs:
    """Every input of :func:`evaluate`, checked before any model is loaded (one
    :class:`SpliceError` line otherwise): the numbers, the tasks (:func:`resolve_tasks`), every
    model folder (config, weights, shapes, code; a per-layer sliced model is accepted), the
    text (``text_name`` in messages) tokenized by each model's tokenizer filling one window of
    ``seq_len`` within the model's positions, the tokenizer each model's tasks need, and the
    zoo the zoo tasks need (:func:`splice.zoo.evaluate.check_zoo`). The surgery verbs call it
    with the source model before they write the output they score at the end."""
    from splice.limits import check_number
    from splice.modeling import check_runnable

    if text is None and tasks is None:
        raise SpliceError("nothing to score: give a text (--ppl FILE) and/or tasks (--tasks)")
    if not models:
        raise SpliceError("no model to score")
    check_number("batch_size", batch_size, least=1, whole=True)
    for name, value in (("max_tokens", max_tokens), ("limit", limit)):
        if value is not None:
            check_number(name, value, least=1, whole=True)
    if num_fewshot is not None:
        check_number("num_fewshot", num_fewshot, least=0, whole=True)
    if text is not None:
        check_window(seq_len, stride if stride is not None else max(1, seq_len // 2))
    task_set = resolve_tasks(tasks, include_path) if tasks is not None else None
    folders = {
        name: check_runnable(
            m, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, sliced=True
        )
        for name, m in models.items()
        if isinstance(m, str | os.PathLike)
    }
    if text is not None and tokenizer is None and len(folders) < len(models):
        raise SpliceError("perplexity of a live model needs its tokenizer (tokenizer=...)")
    ids: dict[str, torch.Tensor] = {}
    if text is not None:
        by_source: dict[Any, torch.Tensor] = {}
        for name in models:
            ckpt = folders.get(name)
            max_pos = ckpt.config.get("max_position_embeddings") if ckpt is not None else None
            if max_pos and seq_len > max_pos:
                raise SpliceError(
                    f"{name}: seq_len {seq_len} exceeds the model's {max_pos} positions"
                )
            source = tokenizer if tokenizer is not None else ckpt.path  # type: ignore[union-attr]
            key = str(source) if isinstance(source, str | os.PathLike) else id(source)
            if key not in by_source:
                by_source[key] = text_ids(_tokenizer(source), text, max_tokens=max_tokens)
            ids[name] = by_source[key]
            check_window(seq_len, seq_len, int(ids[name].numel()), what=text_name)
    zoo_dir: Path | None = None
    tokenizers: dict[str, Any] = {}
    if task_set is not None:
        if task_set.zoo:
            from splice.zoo.evaluate import check_zoo

            for name, m in models.items():
                folder = folders[name].path if name in folders else None
                zoo_dir, _ = check_zoo(
                    zoo,
                    {name: folders.get(name, m)},
                    tokenizer=_zoo_tokenizer(tokenizer, folder),
                    show_progress=show_progress,
                )
        for name in models:
            folder = folders[name].path if name in folders else None
            tokenizers[name] = _task_tokenizer(name, tokenizer, folder, zoo_dir)
    return ScoringInputs(folders, task_set, ids, zoo_dir, tokenizers)


def _task_tokenizer(name: str, tokenizer: Any, folder: Path | None, zoo: Path | None) -> Any:
    """The tokenizer a model's tasks are read with: ``tokenizer`` if given, else the model
    folder's own, else (zoo tasks only) the zoo's base model's."""
    if tokenizer is not None:
        return tokenizer
    if folder is not None and _has_tokenizer(folder):
        return folder
    if zoo is not None:
        return zoo / "base"
    raise SpliceError(f"{name}: has no tokenizer, which lm-eval tasks need (tokenizer=...)")


def _zoo_tokenizer(tokenizer: Any, folder: Path | None) -> str | os.PathLike[str] | None:
    """The tokenizer the zoo's tasks read for a model: ``tokenizer`` if it is a path, else the
    model folder's own if it has one (None: the zoo's)."""
    if isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    return folder if folder is not None and _has_tokenizer(folder) else None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _tokenizer(source: Any) -> Any:
    if isinstance(source, str | os.PathLike):
        from splice.modeling import load_tokenizer

        return load_tokenizer(source)
    return source


def format_table(scores: Mapping[str, Mapping[str, float]], *, markdown: bool = False) -> str:
    """One row per model, one column per score (``ppl`` first)."""
    cols = list(dict.fromkeys(c for row in scores.values() for c in row))
    cols.sort(key=lambda c: c != "ppl")
    width = max([5, *(len(m) for m in scores)])

    def cell(v: float | None, c: str) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.3f}" if c != "ppl" else f"{v:.4g}"

    if markdown:
        lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for m, row in scores.items():
            lines.append(f"| {m} | " + " | ".join(cell(row.get(c), c) for c in cols) + " |")
        return "\n".join(lines)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>13}" for c in cols)]
    for m, row in scores.items():
        lines.append(f"{m:<{width}}  " + "  ".join(f"{cell(row.get(c), c):>13}" for c in cols))
    return "\n".join(lines)
