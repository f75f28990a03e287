"""NearSwap: take the other model's value only where it is already close to the base's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from splice.merge.methods.base import merge_method

MIN_DIFF = 1e-6  # |base - other| is floored at this before dividing


def _check(params: dict[str, Any]) -> Iterator[tuple[int | None, str]]:
    if params["t"] < 0:
        yield None, f"t must be >= 0 (got {params['t']:g}; t <= 0 returns the base model)"


@merge_method("nearswap", base="required", inputs=(1, 1), check=_check)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Entrywise ``out = w · b + (1 - w) · a`` with ``a`` the base, ``b`` the other model and
    ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``: entries closer than ``t`` are swapped to ``b``
    outright, farther ones move toward it by ``t / |a - b|``. Shapes ``[...]``, in the inputs'
    dtype (as mergekit computes it).
    """
    if len(tensors) != 1:
        raise ValueError(f"nearswap merges a base and exactly one other model; got {len(tensors)}")
    (other,) = tensors
    w = (t / (base - other).abs().clamp(min=MIN_DIFF)).clamp(0, 1)
    return w * other + (1 - w) * base
