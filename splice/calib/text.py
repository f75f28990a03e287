"""Calibration text and its token windows.

:func:`calibration_text` reads a source: a text file, ``lm-eval:TASK`` (a task's documents) or
a name in :data:`SOURCES` (the zoo registers ``zoo``, ``zoo:en``, ``zoo:both``, ``zoo:zeta``).
A package adds sources by registering them in :data:`SOURCES` when its module is imported; the
module is named in :data:`PROVIDERS` under the sources' prefix (``zoo`` for ``zoo:both``) and
imported on first use, so the core has no import of it (the zoo imports this module, never the
reverse).
:func:`token_windows` cuts a text into windows of ``seq_len`` tokens.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError, SpliceWarning, first_line
from splice.registry import Registry

if TYPE_CHECKING:
    import torch

#: named calibration text sources: name -> function returning the text
SOURCES: Registry[Callable[[], str]] = Registry("calibration text source")

#: source prefix -> the module that registers its sources in :data:`SOURCES` when imported
PROVIDERS: dict[str, str] = {"zoo": "splice.zoo.corpus"}


def text_source(name: str) -> Callable[[], str] | None:
    """The registered source ``name`` (its provider imported first, :data:`PROVIDERS`), or None."""
    provider = PROVIDERS.get(name.split(":")[0])
    if name not in SOURCES and provider is not None:
        try:
            importlib.import_module(provider)  # registers its sources
        except ImportError:
            raise SpliceError(
                f"--calibration {name}: this build has no {provider}; give a text file instead"
            ) from None
    return SOURCES.get(name) if name in SOURCES else None


def is_text_source(source: str | os.PathLike[str]) -> bool:
    """True if ``source`` names an ``lm-eval:TASK`` or a registered source (not a file)."""
    src = str(source)
    return src.startswith("lm-eval:") or text_source(src) is not None


def calibration_text(source: str | os.PathLike[str], *, include_path: str | None = None) -> str:
    """Text of a calibration source: a text file, ``lm-eval:TASK``, or a registered source such
    as the zoo's corpus: ``zoo`` (English), ``zoo:both`` (English and Zeta alternately),
    ``zoo:zeta``. A source's name is the source even where a file or folder of that name is in
    the current folder (``./zoo`` reads the file)."""
    src = str(source)
    if src.startswith("lm-eval:"):
        text = _lm_eval_text(src.removeprefix("lm-eval:"), include_path)
    elif isinstance(source, str) and (named := text_source(src)) is not None:
        if Path(src).exists():
            warnings.warn(
                f"{src}: read as the calibration source {src!r}, not the file or folder of that "
                f"name here (give ./{src} for that)",
                SpliceWarning,
                stacklevel=2,
            )
        text = named()
    else:
        path = Path(src)
        if path.is_dir():
            raise SpliceError(f"{src}: a folder, not a calibration text file")
        if not path.is_file():
            raise SpliceError(
                f"{src}: no such calibration file (give a text file, lm-eval:TASK or zoo)"
            )
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise SpliceError(f"{src}: calibration file is not UTF-8 text") from None
    if not text.strip():
        raise SpliceError(f"{src}: calibration text is empty")
    return text


def _lm_eval_text(task: str, include_path: str | None) -> str:
    """Documents of an lm-eval task (its evaluation split), each prompt plus its target."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SpliceError("lm-eval:TASK needs lm-eval (pip install 'splice[eval]')") from None
    try:
        manager = TaskManager(include_path=include_path)
        tasks = manager.load([task])["tasks"]
    except Exception as e:  # lm-eval raises many types for unknown tasks / missing datasets
        raise SpliceError(f"lm-eval task {task!r} cannot be loaded ({first_line(e)})") from None
    texts = []
    for t in tasks.values():
        for doc in t.eval_docs:
            prompt = t.doc_to_text(doc)
            target = t.doc_to_target(doc)
            if isinstance(target, int) and hasattr(t, "doc_to_choice"):
                choices = t.doc_to_choice(doc)
                target = choices[target] if isinstance(choices, list) else ""
            texts.append(f"{prompt}{t.config.target_delimiter}{target}".strip())
    return "\n\n".join(texts)


def text_tokens(tokenizer: Any, text: str, need: int | None = None) -> list[int]:
    """Token ids of ``text`` (no special tokens), as tokenizing the whole text at once gives.

    With ``need``, only a prefix is tokenized when the text is long: one ending at a blank line
    (a document boundary; else at a line end) at least ``PREFIX_CHARS_PER_TOKEN * need``
    characters in, doubled until it gives ``need`` tokens and ``PREFIX_SLACK`` more, so the
    tokens near the cut (which may differ from the whole text's) are never among the first
    ``need``. Tokenizing pieces one after the other instead (e.g. every 256 lines) adds tokens
    at each piece's start and shifts every window after it.
    """

    def tok(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]

    chars = PREFIX_CHARS_PER_TOKEN * need if need is not None else len(text)
    while chars < len(text):
        cut = text.find("\n\n", chars)
        cut = cut if cut >= 0 else text.find("\n", chars)
        if cut < 0:
            break
        ids = tok(text[:cut])
        if len(ids) >= need + PREFIX_SLACK:  # type: ignore[operator]
            return ids
        chars = 2 * cut
    return tok(text)


#: a prefix of this many characters per token needed is tokenized first (:func:`text_tokens`)
PREFIX_CHARS_PER_TOKEN = 16
#: tokens past the ones needed that a prefix must give before its cut is trusted
PREFIX_SLACK = 64


def token_windows(tokenizer: Any, text: str, seq_len: int, max_samples: int) -> torch.Tensor:
    """``[N, T]`` token ids: consecutive windows of the tokenized text, N ≤ ``max_samples``.

    Each window starts with the tokenizer's BOS (if it has one) followed by ``seq_len - 1``
    text tokens (``seq_len`` when there is no BOS): the windows of the whole text tokenized at
    once (:func:`text_tokens` reads only a long enough prefix, cut at a document boundary). A
    text shorter than one window gives one shorter window.
    """
    import torch

    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    ids = text_tokens(tokenizer, text, body * max_samples)
    if not ids:
        raise SpliceError("calibration text has no tokens for this tokenizer")
    count = min(max_samples, max(1, len(ids) // body))
    width = min(body, len(ids))
    rows = [ids[i * body : i * body + width] for i in range(count)]
    t = torch.tensor(rows, dtype=torch.long)
    if bos is not None:
        t = torch.cat([torch.full((count, 1), bos, dtype=torch.long), t], dim=1)
    if t.shape[1] < 2:
        raise SpliceError("calibration text is too short: fewer than 2 tokens in a window")
    return t
