"""Linear merge (model soups, Wortsman et al. 2022): a weighted average of the models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from splice.merge.methods.base import cancels, merge_method, shown

CHUNK = 1 << 20  # elements accumulated in float32 at a time (bounds scratch for bf16 inputs)


def _check(params: dict[str, Any]) -> Iterator[tuple[int | None, str]]:
    if params.get("normalize", True) and cancels(params["weight"]):
        w = shown(params["weight"])
        yield (
            None,
            f"weights {w} sum to 0 and cannot be normalized; change them or set normalize: false",
        )


@merge_method("linear", base="none", per_model={"weight": None}, check=_check)
def linear(
    tensors: list[torch.Tensor], base: None, *, weight: list[float], normalize: bool = True
) -> torch.Tensor:
    """``out = Σ_i w_i x_i`` (``/ Σ_i w_i`` when ``normalize``) over tensors of one shape ``[...]``.

    Accumulated in float32 (float64 kept), chunk by chunk, returned in the inputs' dtype.
    Normalizing weights that sum to 0 is an error (mergekit writes inf/NaN).
    """
    first = tensors[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    total = sum(weight)
    if normalize and total == 0:
        raise ValueError(f"linear: weights {weight} sum to 0 and cannot be normalized")
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    flats = [x.reshape(-1).split(CHUNK) for x in tensors]
    for o, *xs in zip(out.view(-1).split(CHUNK), *flats, strict=True):
        s = torch.zeros(o.shape, dtype=acc, device=o.device)
        for x, w in zip(xs, weight, strict=True):
            s.add_(x, alpha=w)
        o.copy_(s / total if normalize else s)
    return out
