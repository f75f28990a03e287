"""Finite weights: :func:`check_finite` (analysis, the model loader and evolve refuse NaN/inf)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch


def check_finite(t: torch.Tensor, label: str, why: str = "analysis needs finite weights") -> None:
    """``SpliceError`` naming ``label`` (and ``why``) if the float tensor ``t`` holds NaN or inf.

    Checked block by block, so no tensor-sized mask is made.
    """
    import torch

    if not t.is_floating_point():
        return
    v = t.detach().reshape(-1)
    step = 1 << 22
    blocks = range(0, v.numel(), step)
    if all(bool(torch.isfinite(v[i : i + step]).all()) for i in blocks):
        return
    nan = sum(int(torch.isnan(v[i : i + step]).sum()) for i in blocks)
    inf = sum(int(torch.isinf(v[i : i + step]).sum()) for i in blocks)
    what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "inf")) if n)
    raise SpliceError(f"{label} has {what} values; {why}")
