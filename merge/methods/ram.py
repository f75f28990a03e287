"""Reinforced Agent Merging (RAM, arXiv 2601.13572): task vectors are averaged entry by entry over
only the models that changed that entry; RAM+ (tensor-local) also boosts each model's entries
that no other model changed, by how much that model overlaps with the others."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from splice.merge.methods.base import merge_method

CHUNK = 1 << 20  # elements per pass chunk (bounds temporaries on any tensor size)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _contributors(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> torch.Tensor:
    """int32 ``[...]``: how many models change each entry by more than ``epsilon``."""
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for x in tensors:
        count += (x - base).abs() > epsilon
    return count


def _chunks(*xs: torch.Tensor) -> zip:
    return zip(*(x.reshape(-1).split(CHUNK) for x in xs), strict=True)


def _check_epsilon(params: dict[str, Any]) -> Iterator[tuple[int | None, str]]:
    if params.get("epsilon", 1e-5) < 0:
        yield None, f"epsilon must be >= 0 (got {params['epsilon']:g})"


@merge_method("ram", base="required", check=_check_epsilon)
def ram(tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5) -> torch.Tensor:
    """``out = base + Σ_i d_i [|d_i| > ε] / max(c, 1)`` with ``d_i = x_i - base`` and ``c`` the
    number of models with ``|d_i| > ε`` at the entry: an entry one model changed takes its
    change whole, one several changed their mean, the others keep the base.

    Shapes ``[...]``; each term ``d_i / c`` in the inputs' dtype, summed in float32 (float64
    kept) and rounded once, as mergekit's stacked sum is.
    """
    count = _contributors(tensors, base, epsilon)
    out = torch.empty_like(base)
    for o, b, c, *xs in _chunks(out, base, count, *tensors):
        divisor = c.clamp(min=1)
        total = torch.zeros(o.shape, dtype=_acc(base.dtype), device=o.device)
        for x in xs:
            d = x - b
            total += torch.where(d.abs() > epsilon, d, 0) / divisor
        torch.add(b, total.to(base.dtype), out=o)
    return out


def _check_plus(params: dict[str, Any]) -> Iterator[tuple[int | None, str]]:
    if params.get("epsilon", 1e-5) <= 0:
        problem = "it also floors the count of a model's unique entries, which must not be 0"
        yield None, f"epsilon must be > 0 (got {params['epsilon']:g}): {problem}"
    if params.get("alpha", 0.2) < 0:
        yield None, f"alpha must be >= 0 (got {params['alpha']:g})"


@merge_method("ramplus_tl", base="required", check=_check_plus)
def ramplus_tl(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM+ within one tensor: as :func:`ram`, but model ``i``'s unique entries (``c = 1``) are
    scaled by ``λ_i = 1 + r · clamp(ρ_i, 0, α)``, ``ρ_i = S_i / max(U_i, ε)`` with ``S_i`` /
    ``U_i`` the numbers of its changed entries that are shared (``c > 1``) / unique.

    Shapes ``[...]``. ``λ`` is float32 as in mergekit, so the boosted unique terms and the sum
    are float32 (float64 kept) and the result is rounded once to the inputs' dtype; the shared
    terms ``d_i / c`` are in the inputs' dtype.
    """
    count = _contributors(tensors, base, epsilon)
    alone = count == 1
    shared, unique = [], []
    for x in tensors:
        changed = (x - base).abs() > epsilon
        unique.append(int((changed & alone).sum()))
        shared.append(int(changed.sum()) - unique[-1])
    del alone
    rho = torch.tensor(shared, dtype=torch.float32) / torch.tensor(unique).clamp(min=epsilon)
    lam = (1 + r * rho.clamp(min=0, max=alpha)).to(base.device)
    acc = _acc(base.dtype)
    out = torch.empty_like(base)
    for o, b, c, *xs in _chunks(out, base, count, *tensors):
        divisor = c.clamp(min=1)
        total = torch.zeros(o.shape, dtype=acc, device=o.device)
        for i, x in enumerate(xs):
            d = x - b
            d = torch.where(d.abs() > epsilon, d, 0)
            total += torch.where(c == 1, d.to(acc) * lam[i].to(acc), d / divisor)
        o.copy_(b.to(acc) + total)
    return out
