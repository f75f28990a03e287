"""Scores of a causal LM: perplexity on a text, and the zoo's lm-eval tasks.

:func:`perplexity` is token-level perplexity with sliding windows (Hugging Face's recipe): the
text is tokenized once (BOS first, if the tokenizer has one), windows of ``seq_len`` tokens start
every ``stride`` tokens, and each window scores only the tokens the previous one did not, so
with ``stride < seq_len`` every token after the first is scored exactly once with at least
``seq_len - stride`` tokens of context. Windows run in batches; log-probabilities are taken in
float32 and summed in float64.

:func:`evaluate` scores several models: perplexity on a text and/or the zoo's tasks, the latter
through :func:`splice.zoo.evaluate` (the path ``splice zoo eval`` takes). It returns plain numbers
``{model: {"ppl": ..., "zoo_math": ...}}``; ``splice eval`` prints them, and every surgery verb
reports with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from splice.errors import SpliceError
from splice.threads import threads_for

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from splice.checkpoint import Checkpoint

Model = Union[str, "os.PathLike[str]", "PreTrainedModel"]


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


def read_text(source: str | os.PathLike[str], *, option: str = "--ppl") -> str:
    """A text file, ``lm-eval:TASK`` (a task's documents) or ``zoo`` / ``zoo:both`` (the zoo's
    calibration text, English / both languages), as :func:`splice.calib.calibration_text` reads them."""
    from splice.calib import calibration_text, is_text_source

    src = str(source)
    if not (Path(src).exists() or is_text_source(src)):
        raise SpliceError(f"{option} {src}: no such text file (give a file, lm-eval:TASK or zoo)")
    if Path(src).exists() and not Path(src).is_file():
        raise SpliceError(f"{option} {src}: not a file")
    return calibration_text(src)


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
    show_progress: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    text_name: str = "the text",
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """Scores of every model: ``{name: {"ppl": perplexity on text, task: accuracy, ...}}``.

    ``models``: folders (named by their path) or a mapping name -> folder or live model.
    ``text`` is scored with :func:`perplexity` (each folder's own tokenizer; a live model needs
    ``tokenizer``); ``tasks`` (``"zoo_math,zoo_lang"``, a list, ``"all"``) are the zoo's lm-eval
    tasks, scored by :func:`splice.zoo.evaluate` (``zoo``: the built zoo whose tasks to use).
    Every input is checked before any model is loaded (:func:`check_scoring`; ``text_name``
    names the text in its messages); each model is then loaded once, in ``dtype`` on
    ``device``, scored on ``threads`` CPU threads (None: one for a small model, as
    :func:`splice.threads.threads_for` decides), and dropped.
    """
    from splice.devices import resolve_device
    from splice.layer_metrics import float_dtype

    if text is None and tasks is None:
        raise SpliceError("nothing to score: give a text (--ppl FILE) and/or zoo tasks (--tasks)")
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
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        text_name=text_name,
        show_progress=show_progress,
    )
    checked = {name: ckpt.path for name, ckpt in inputs.folders.items()}
    task_names = inputs.tasks
    from splice.progress import progress

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
            if task_names:
                from splice.zoo.evaluate import evaluate as zoo_evaluate

                scores = zoo_evaluate(
                    {name: model},
                    task_names,
                    zoo=zoo,
                    tokenizer=_zoo_tokenizer(tokenizer, checked.get(name)),
                    limit=limit,
                    show_progress=False,
                )
                out[name].update(scores[name])
        del model
    return out


def _largest(ckpt: Checkpoint | None, model: Any) -> int:
    """Elements of the largest per-layer tensor (what :func:`threads_for` sizes the threads by)."""
    if ckpt is not None:
        from splice.layer_metrics import largest_layer_tensor

        return largest_layer_tensor(ckpt)
    return max((p.numel() for p in model.parameters()), default=0)


@dataclass
class ScoringInputs:
    """What :func:`check_scoring` checked: the model folders (opened checkpoints), the zoo task
    names, and every model's token ids of the text."""

    folders: dict[str, Checkpoint]
    tasks: list[str]
    ids: dict[str, torch.Tensor]


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
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    text_name: str = "the text",
    show_progress: bool = False,
) -> ScoringInputs:
    """Every input of :func:`evaluate`, checked before any model is loaded (one
    :class:`SpliceError` line otherwise): the numbers, the task names, every model folder
    (config, weights, shapes, code), the text (``text_name`` in messages) tokenized by each
    model's tokenizer filling one window of ``seq_len`` within the model's positions, and the
    zoo the tasks need (:func:`splice.zoo.evaluate.check_zoo`). The surgery verbs call it with
    the source model before they write the output they score at the end."""
    from splice.limits import check_number
    from splice.modeling import check_runnable

    if text is None and tasks is None:
        raise SpliceError("nothing to score: give a text (--ppl FILE) and/or zoo tasks (--tasks)")
    task_names: list[str] = []
    if tasks is not None:
        from splice.zoo.evaluate import parse_tasks

        task_names = parse_tasks(tasks)
    if not models:
        raise SpliceError("no model to score")
    check_number("batch_size", batch_size, least=1, whole=True)
    for name, value in (("max_tokens", max_tokens), ("limit", limit)):
        if value is not None:
            check_number(name, value, least=1, whole=True)
    if text is not None:
        check_window(seq_len, stride if stride is not None else max(1, seq_len // 2))
    folders = {
        name: check_runnable(m, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
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
    if task_names:
        from splice.zoo.evaluate import check_zoo

        for name, m in models.items():
            folder = folders[name].path if name in folders else None
            check_zoo(
                zoo,
                {name: folders.get(name, m)},
                tokenizer=_zoo_tokenizer(tokenizer, folder),
                show_progress=show_progress,
            )
    return ScoringInputs(folders, task_names, ids)


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
