"""The tensor math of slicing: pure float64 functions, no files, names or models.

``D`` is the source's hidden size and ``d`` the kept width (:func:`new_width`); a Gram matrix is
``Σ xᵀx`` ``[D, D]`` of calibration rows ``x`` ``[n, D]``. :func:`kept_basis` turns a Gram into
the kept basis ``Q_d`` ``[D, d]`` (:func:`pca`, and for LayerNorm's mean-zero stream the
:func:`householder` reflection that keeps ``1/√D``); :func:`fold_reader` and :func:`fold_writer`
rotate and slice a linear reading or writing the stream. The formulas are derived in
:mod:`splice.surgery.slicing`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch


def new_width(hidden: int, heads: int, sparsity: float) -> int:
    """``d``: ``(1 - sparsity)·hidden`` rounded down to a multiple of ``lcm(8, heads)``."""
    step = math.lcm(8, heads)
    d = int((1.0 - sparsity) * hidden + 1e-9) // step * step
    if d < step:
        raise SpliceError(
            f"--sparsity {sparsity:g}: keeps {(1 - sparsity) * hidden:.1f} of {hidden} dims, fewer "
            f"than one multiple of {step} (lcm of 8 and {heads} heads); slice less"
        )
    return d


def pca(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues [D] descending, eigenvectors [D, D] as columns)`` of a float64 Gram."""
    import torch

    vals, vecs = torch.linalg.eigh(gram.to(torch.float64))
    return vals.flip(0), vecs.flip(1)


def householder(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[n, n]``: the symmetric orthogonal reflection ``H`` with ``H·u = v`` (``u``, ``v``
    unit vectors ``[n]``; the identity where they are equal)."""
    import torch

    w = u - v
    norm = w.norm()
    eye = torch.eye(u.numel(), dtype=u.dtype, device=u.device)
    if float(norm) < 1e-12:
        return eye
    w = w / norm
    return eye - 2.0 * torch.outer(w, w)


def kept_basis(gram: torch.Tensor, d: int, centred: bool = False) -> tuple[torch.Tensor, float]:
    """``(Q_d [D, d] float64 orthonormal columns, the share of the Gram's trace they keep)``.

    Plain: the top ``d`` eigenvectors. ``centred`` (LayerNorm, a mean-zero stream): ``e =
    1/√D`` and the top ``d - 1`` eigenvectors of the Gram restricted to ``e⊥``, reflected by
    the Householder ``R`` ``[d, d]`` with ``R·1_d/√d = u_0``, so that ``Q_d·1_d = √(d/D)·1_D``
    (the kept coordinates of a mean-zero stream are mean-zero)."""
    import torch

    g = gram.to(torch.float64)
    if not centred:
        vals, vecs = pca(g)
        total = vals.clamp_min(0).sum()
        return vecs[:, :d].contiguous(), float(vals[:d].clamp_min(0).sum() / total)
    big = g.shape[0]
    e = torch.full((big,), big**-0.5, dtype=torch.float64, device=g.device)
    first = torch.zeros(big, dtype=torch.float64, device=g.device)
    first[0] = 1.0
    perp = householder(first, e)[:, 1:]  # [D, D-1]: an orthonormal basis of e⊥
    vals, vecs = pca(perp.T @ g @ perp)
    q = torch.cat([e[:, None], perp @ vecs[:, : d - 1]], dim=1)  # [D, d], e first
    ones = torch.full((d,), d**-0.5, dtype=torch.float64, device=g.device)
    q = q @ householder(ones, first[:d])
    total = vals.clamp_min(0).sum() + (e @ g @ e).clamp_min(0)
    return q.contiguous(), float(vals[: d - 1].clamp_min(0).sum() / total)


def fold_reader(
    w: torch.Tensor, gamma: torch.Tensor, q: torch.Tensor, beta: torch.Tensor | None = None
) -> torch.Tensor:
    """A linear reading a norm, rotated and sliced: ``W`` ``[out, D]``, the norm's scale ``γ``
    ``[D]`` (offset added), ``Q_d`` ``[D, d]`` -> ``W·diag(γ)·Q_d`` ``[out, d]``. With a
    LayerNorm bias ``β`` ``[D]`` kept in the norm (the output norm's bias ``1_d``):
    ``W·diag(γ)·Q_d·C_d + (W·β)·1_dᵀ/d``, which reads ``W·β`` off the norm's ``1_d`` and
    nothing else (``C_d = I - 11ᵀ/d``; a LayerNorm's output minus its bias is mean-zero)."""
    a = (w * gamma) @ q
    if beta is not None:
        a = a - a.mean(1, keepdim=True) + (w @ beta)[:, None] / q.shape[1]
    return a


def fold_writer(
    w: torch.Tensor, q: torch.Tensor, centred: bool = False, scale: float = 1.0
) -> torch.Tensor:
    """A linear writing the stream, rotated and sliced: weight ``[D, in]`` ->
    ``scale·Q_dᵀ·C·W`` ``[d, in]``, bias ``[D]`` -> ``scale·(C·b)·Q_d`` ``[d]`` (``C = I -
    11ᵀ/D`` where ``centred``, the identity otherwise; ``scale`` the output stream's
    ``√(d/D)``)."""
    if centred:
        w = w - w.mean(0, keepdim=True)
    return (q.T @ w if w.dim() == 2 else w @ q) * scale
