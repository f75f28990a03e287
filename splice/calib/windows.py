"""From a :class:`~splice.calib.settings.Calibration` to token windows: :func:`windows_for`,
the one path every calibration run (layer metrics, activation comparison, slice, collapse)
takes from a source to the ``[N, T]`` token ids it runs on."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from splice.calib.settings import Calibration
from splice.calib.text import calibration_text, token_windows
from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch


def windows_for(
    target: Any,
    source: str | os.PathLike[str] | torch.Tensor,
    calibration: Calibration,
    *,
    text: str | None = None,
    trust_remote_code: bool = False,
) -> torch.Tensor:
    """``[N, T]`` token ids of ``source`` for ``target`` (a tokenizer, or a checkpoint or model
    folder whose tokenizer is loaded): the text (``text`` if already read, else
    :func:`~splice.calib.text.calibration_text` of ``source`` with the calibration's
    ``include_path``) cut into at most ``max_samples`` windows of ``seq_len`` tokens
    (:func:`~splice.calib.text.token_windows`). ``source`` may also be token windows
    ``[N, T]`` already made: their first ``max_samples`` rows and ``seq_len`` columns are kept.
    Either way, windows shorter than ``seq_len`` are refused (:func:`check_windows`)."""
    import torch

    if isinstance(source, torch.Tensor):  # token windows given
        if source.dim() != 2 or source.is_floating_point():
            raise SpliceError("calibration windows must be an [N, T] tensor of token ids")
        windows = source[: calibration.max_samples, : calibration.seq_len]
        check_windows(windows, calibration.seq_len, f"{windows.shape[0]} given windows")
        return windows
    if text is None:
        text = calibration_text(source, include_path=calibration.include_path)
    tokenizer = _tokenizer(target, trust_remote_code)
    windows = token_windows(tokenizer, text, calibration.seq_len, calibration.max_samples)
    check_windows(windows, calibration.seq_len, source)
    return windows


def _tokenizer(target: Any, trust_remote_code: bool) -> Any:
    """``target`` if it tokenizes, else the tokenizer of its folder (``.path`` or a path)."""
    if callable(target) and not isinstance(target, (str, os.PathLike)):
        return target
    from splice.modeling import load_tokenizer

    path = getattr(target, "path", target)
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def check_windows(ids: Any, seq_len: int, calibration: Any) -> None:
    """One error line unless the calibration windows ``ids`` ``[N, T]`` are ``seq_len`` tokens
    long: every verb refuses a text shorter than one window (instead of running a partial one)."""
    if ids.shape[1] < seq_len:
        raise SpliceError(
            f"--calibration {calibration}: the text is too short: {ids.shape[1]} tokens, fewer "
            f"than one window of {seq_len} (give a longer text or a smaller --seq-len)"
        )
