"""Karcher (Riemannian) mean of the models' directions on the unit sphere, times their mean norm."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from splice.merge.methods.base import merge_method


def karcher_mean(
    tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher mean of ``n`` tensors of one shape ``[...]``.

    Directions ``u_i = x_i/|x_i|`` of tensors with ``|x_i| > tol`` are averaged on the sphere
    by gradient steps from their normalized linear mean: ``v = Σ α_i θ_i/sin θ_i (u_i - cos θ_i
    m)``, ``m ← m cos|v| + v sin|v|/|v|``, until ``|v| < tol`` or ``max_iter`` steps (``α``
    renormalized over those tensors). The result is ``m · Σ_i α_i |x_i|`` over all tensors.
    Norms in float32 (float64 kept), the rest in the inputs' dtype, as mergekit does.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(acc)) for x in tensors]

    def unit(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return (x / norm).to(x.dtype)

    valid = [i for i, r in enumerate(norms) if r.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [unit(tensors[i], norms[i]) for i in valid]

    m = sum(ai * ui for ai, ui in zip(a, u, strict=True))
    m_norm = torch.linalg.vector_norm(m.to(acc))
    m = u[0].clone() if m_norm.item() < tol else unit(m, m_norm)
    for _ in range(max_iter):
        v = torch.zeros_like(m)
        for ai, ui in zip(a, u, strict=True):
            cos = torch.dot(m.reshape(-1), ui.reshape(-1)).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() >= tol:
                v += ai * (theta / torch.sin(theta)) * (ui - cos * m)
        v_norm = torch.linalg.vector_norm(v.to(acc))
        if v_norm.item() < tol:
            break
        m = (torch.cos(v_norm) * m + torch.sin(v_norm) * (v / v_norm)).to(m.dtype)
        m_norm = torch.linalg.vector_norm(m.to(acc))
        if m_norm.item() > tol:
            m = unit(m, m_norm)
    return sum(ai * r for ai, r in zip(alphas, norms, strict=True)) * m


def _check(params: dict[str, Any]) -> Iterator[tuple[int | None, str]]:
    if params.get("max_iter", 10) < 0:
        yield None, f"max_iter must be 0 or more (got {params['max_iter']})"
    if params.get("tol", 1e-5) < 0:
        yield None, f"tol must be 0 or more (got {params['tol']:g})"


@merge_method("karcher", base="none", check=_check)
def karcher(
    tensors: list[torch.Tensor], base: None, *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Equal-weight Karcher mean of all the recipe's models (see :func:`karcher_mean`)."""
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter=max_iter, tol=tol)
