"""Spherical interpolation: SLERP of two models, NuSLERP (weighted, row-wise or task vectors),
and Multi-SLERP (barycentric on the sphere, any number of models).

Vectors are interpolated along the great circle between their directions while the raw (not
normalized) tensors are combined, as mergekit does, so norms interpolate roughly linearly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from splice.merge.methods.base import cancels, merge_method, shown

DOT_THRESHOLD = 0.9995  # |cos θ| above this: (anti)parallel, interpolate linearly
EPS = 1e-8  # norms at or below this are not divided by
CHUNK = 1 << 20  # elements upcast to float32 at a time (bounds scratch for bf16 inputs)


def _chunks(*xs: torch.Tensor) -> zip:
    return zip(*(x.reshape(-1).split(CHUNK) for x in xs), strict=True)


@merge_method("slerp", base="required", inputs=(1, 1))
def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """SLERP from ``base`` (``t = 0``) to the one other model (``t = 1``), any shape ``[...]``.

    With ``a, b`` the flattened tensors and ``θ`` the angle between them,
    ``out = sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b``; when ``|cos θ| > 0.9995`` (parallel or
    antiparallel) ``out = (1-t) a + t b``. A (near-)zero tensor counts as orthogonal to the
    other. Computed in float32 (float64 kept) chunk by chunk, returned in ``base``'s dtype.
    """
    if len(tensors) != 1:
        raise ValueError(f"slerp merges a base and exactly one other model; got {len(tensors)}")
    (other,) = tensors
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    aa, bb, ab = (torch.zeros((), dtype=dtype, device=base.device) for _ in range(3))
    for x, y in _chunks(base, other):
        x, y = x.to(dtype), y.to(dtype)
        aa += x @ x
        bb += y @ y
        ab += x @ y
    na, nb = math.sqrt(aa.item()), math.sqrt(bb.item())
    cos = max(-1.0, min(1.0, ab.item() / ((na if na > EPS else 1.0) * (nb if nb > EPS else 1.0))))
    if abs(cos) > DOT_THRESHOLD:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(cos)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    for o, x, y in _chunks(out, base, other):
        o.copy_(ca * x.to(dtype) + cb * y.to(dtype))
    return out


def nuslerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor, dim: int | None) -> torch.Tensor:
    """SLERP of the vectors of ``a`` and ``b`` along ``dim`` (``None``: the whole tensor).

    Same formula as :func:`slerp` per vector, in the inputs' dtype; linear where
    ``1 - cos² θ <= EPS²`` (exactly parallel or antiparallel in float32).
    """
    shape = a.shape
    if dim is None:
        a, b = a.reshape(-1), b.reshape(-1)
    else:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    linear = 1 - cos.square() <= EPS**2
    theta = torch.acos(torch.where(linear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(linear, (1 - t) * a + t * b, out)
    if dim is not None:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@merge_method("nuslerp", base="optional", per_model={"weight": None}, inputs=(2, 2))
def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """NuSLERP of two models with ``t = w₁ / (w₀ + w₁)`` (0.5 when the weights sum to ~0).

    With a base, the task vectors ``x_i - base`` are interpolated and added back to it.
    ``nuslerp_flatten`` (default) treats each tensor as one vector; otherwise each row
    ``x[..., :]`` (reduced over the last dim) is its own vector, or with ``nuslerp_row_wise``
    each slice reduced over dim 0. Shapes ``[...]`` in, same out, in the inputs' dtype.
    """
    if len(tensors) != 2:
        raise ValueError(f"nuslerp merges exactly two models (besides a base); got {len(tensors)}")
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = None if nuslerp_flatten else (0 if nuslerp_row_wise else -1)
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], dim)
    return base + nuslerp_tensors(t, tensors[0] - base, tensors[1] - base, dim)


def _check_multislerp(params: dict[str, Any]) -> Iterator[tuple[int | None, str]]:
    if params.get("normalize_weights", True) and cancels(params["weight"]):
        w = shown(params["weight"])
        problem = f"weights {w} sum to 0 and cannot be normalized"
        yield None, f"{problem}; change them or set normalize_weights: false"
    if params.get("eps", 1e-8) <= 0:
        yield None, f"eps must be > 0 (got {params['eps']:g})"


@merge_method("multislerp", base="optional", per_model={"weight": None}, check=_check_multislerp)
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere of ``n`` tensors ``[...]`` (task vectors
    ``x_i - base`` when a base is given).

    With unit directions ``u_i`` and norms ``r_i``: ``m`` = normalized ``Σ w_i u_i``;
    tangent ``v = Σ w_i (u_i - (u_i·m) m)``; ``out = (m cos|v| + v sin|v|/|v|) · Σ w_i r_i``.
    Weights are normalized to sum 1 unless ``normalize_weights`` is false. If ``Σ w_i u_i`` is
    ~0, two models are averaged linearly and more are an error. Computed in the inputs' dtype.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    x = torch.stack(tensors)  # [n, ...]
    if base is not None:
        x -= base
    flat = x.reshape(len(tensors), -1)
    w = torch.tensor(weight, dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)  # [n, 1]
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(dim=0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError(
                "multislerp: the weighted directions sum to zero (antipodal models with "
                "balancing weights); change the weights"
            )
        out = x[0] * w[0] + x[1] * w[1]
        return out if base is None else out + base
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(dim=-1, keepdim=True) * mean
    v = (tangent * w[:, None]).sum(dim=0)
    v_norm = v.norm() + eps
    out = mean * torch.cos(v_norm) + v * (torch.sin(v_norm) / v_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base
