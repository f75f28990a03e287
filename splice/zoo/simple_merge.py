"""Two plain merges of zoo models, in memory: enough to show that the zoo's skills combine until
splice's merge subpackage lands (then use ``splice.merge``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _load(path: str | os.PathLike[str]) -> PreTrainedModel:
    from splice.zoo.evaluate import load_model

    return load_model(path)


def linear(models: Sequence[str | os.PathLike[str]], weights: Sequence[float]) -> PreTrainedModel:
    """``sum_i w_i * theta_i`` over every tensor (weights are used as given, not normalised)."""
    import torch

    loaded = [_load(m) for m in models]
    states = [m.state_dict() for m in loaded]
    out = loaded[0]
    with torch.no_grad():
        merged = {
            k: sum(w * sd[k] for w, sd in zip(weights, states, strict=True)) for k in states[0]
        }
        out.load_state_dict(merged)
    return out


def task_arithmetic(
    base: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
) -> PreTrainedModel:
    """``theta_base + sum_i w_i * (theta_i - theta_base)`` (Ilharco et al., 2023)."""
    import torch

    out = _load(base)
    theta = out.state_dict()
    states = [_load(m).state_dict() for m in models]
    with torch.no_grad():
        merged = {
            k: theta[k] + sum(w * (sd[k] - theta[k]) for w, sd in zip(weights, states, strict=True))
            for k in theta
        }
        out.load_state_dict(merged)
    return out
