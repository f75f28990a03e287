"""Task arithmetic and its sparsified / sign-elected presets (TIES, DARE, breadcrumbs, DELLA).

One function, :func:`generalized_task_arithmetic`, does the work; every registered method is a
preset of (sparsifier × sign election) with mergekit's defaults:

=================  ===================  =========  =========  =======
method             sparsifier           consensus  normalize  rescale
=================  ===================  =========  =========  =======
task_arithmetic    —                    —          False      False
ties               magnitude            sum        True       False
dare_ties          random               sum        False      True
dare_linear        random               —          False      True
breadcrumbs        magnitude_outliers   —          False      False
breadcrumbs_ties   magnitude_outliers   sum        False      False
della              della                sum        True       True
della_linear       della                —          False      True
=================  ===================  =========  =========  =======

Precision follows mergekit: everything runs in the input dtype (the recipe dtype), weights
included; only rankings (float32) and random-mask probabilities (float32) are upcast.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch

from splice.merge.methods import sparsify
from splice.merge.methods.base import merge_method

Sparsifier = Literal["magnitude", "magnitude_outliers", "random", "della"]
Consensus = Literal["sum", "count"]


def sign_agreement(
    deltas: torch.Tensor, method: Consensus = "sum", *, int8_mask: bool = False
) -> torch.Tensor:
    """TIES sign election: bool mask ``[n, ...]`` of the entries that agree with the elected sign.

    The elected sign per entry is that of ``Σ_i deltas[i]`` (``sum``, TIES' mass vote) or of
    ``Σ_i sign(deltas[i])`` (``count``); a zero total elects ``+``. Zero deltas never agree.
    ``int8_mask`` holds the sign tensors in int8 instead of the deltas' dtype (memory only).
    """
    positive = elected_positive(list(deltas), method, int8_mask=int8_mask)
    return torch.stack([agrees(d, positive) for d in deltas])


def elected_positive(
    deltas: list[torch.Tensor], method: Consensus = "sum", *, int8_mask: bool = False
) -> torch.Tensor:
    """Bool ``[...]``: where the elected sign is ``+`` (the vote's total is >= 0).

    The total is accumulated in float32 (as a stacked sum would be) one delta at a time, so no
    ``[n, ...]`` stack is ever held.
    """
    dtype = deltas[0].dtype
    if method == "sum" and len(deltas) <= 2:  # one rounding in the input dtype
        total = deltas[0] + deltas[1] if len(deltas) == 2 else deltas[0]
        return total >= 0
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d in deltas:
        if method == "sum":
            total += d
        else:
            total += d.sign().to(torch.int8 if int8_mask else dtype)
    if method == "sum" and dtype != torch.float32:
        total = total.to(dtype)  # the stacked sum's single rounding
    return total >= 0


def agrees(delta: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Bool: ``delta``'s sign is the elected one (zeros never agree)."""
    return torch.where(positive, delta > 0, delta < 0)


def _sparsify(
    d: torch.Tensor,
    i: int,
    sparsifier: Sparsifier | None,
    density: list[float],
    rescale: bool,
    gamma: list[float] | None,
    epsilon: list[float] | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if sparsifier == "magnitude":
        return sparsify.magnitude_(d, density[i], rescale=rescale)
    if sparsifier == "magnitude_outliers":
        assert gamma is not None
        return sparsify.magnitude_outliers_(d, density[i], gamma=gamma[i], rescale=rescale)
    if sparsifier == "random":
        return sparsify.random(d, density[i], rescale=rescale, generator=generator)
    if sparsifier == "della":
        assert epsilon is not None
        return sparsify.della(
            d, density[i], epsilon=epsilon[i], rescale=rescale, generator=generator
        )
    return d


def generalized_task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    sparsifier: Sparsifier | None,
    consensus: Consensus | None,
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``base + λ · Σ_i m_i w_i s(x_i - base) / D``, all tensors of one shape ``[...]``.

    ``s`` sparsifies each task vector (``density`` etc. per model, L1 ``rescale``); ``m_i`` is
    the sign-agreement mask when ``consensus`` is set (else 1); ``D = Σ_i m_i w_i`` entrywise
    (1 where it is 0, or ~0 without consensus) when ``normalize``, else 1. Random sparsifiers
    draw from ``generator`` model by model, in order.

    Memory: one task vector per model and a few ``[...]`` temporaries, never an ``[n, ...]``
    stack; arithmetic stays in the input dtype (weights rounded to it, as mergekit does), sums
    accumulate in float32 and round once.
    """
    if not tensors:
        return base.clone()
    dtype = base.dtype
    w = [torch.tensor(x, dtype=dtype, device=base.device) for x in weight]
    deltas = []
    for i, x in enumerate(tensors):  # d is fresh (x - base): sparsify and weight it in place
        d = _sparsify(x - base, i, sparsifier, density, rescale, gamma, epsilon, generator)
        deltas.append(d.mul_(w[i]))
    if consensus is None:
        divisor = sum(w[1:], w[0].float()).to(dtype)
        if divisor.abs() < 1e-8:
            divisor = torch.ones((), dtype=dtype, device=base.device)
    result = torch.empty_like(base)
    flat = [d.view(-1) for d in deltas]
    out, base_flat = result.view(-1), base.reshape(-1)
    # sums of two terms round once in the input dtype itself; longer sums accumulate in float32
    acc = dtype if len(deltas) <= 2 else torch.float32
    for start in range(0, out.numel(), sparsify.CHUNK):  # chunked: temporaries stay small
        part = slice(start, start + sparsify.CHUNK)
        ds = [d[part] for d in flat]
        if consensus is not None:
            positive = elected_positive(ds, consensus, int8_mask=int8_mask)
            mixed = torch.zeros(ds[0].shape, dtype=acc, device=base.device)
            divisor = torch.zeros_like(mixed)
            for i, d in enumerate(ds):
                agree = agrees(d, positive)
                mixed += torch.where(agree, d, 0)
                divisor += torch.where(agree, w[i], 0)
            divisor = divisor.to(dtype)
            divisor[divisor == 0] = 1
        else:
            mixed = ds[0].to(acc, copy=True)
            for d in ds[1:]:
                mixed += d
        chunk = mixed.to(dtype)
        if normalize:
            chunk /= divisor
        if lambda_ != 1:
            chunk *= lambda_
        torch.add(base_flat[part], chunk, out=out[part])
    return result


def _check(params: dict[str, Any]) -> Iterator[tuple[int | None, str]]:
    """Fractions in [0, 1]; DELLA's keep probabilities ``density ± epsilon`` inside (0, 1)."""
    density = params["density"]
    for i, d in enumerate(density):
        if not 0 <= d <= 1:
            yield i, f"density {d:g} is not in [0, 1]"
    for i, g in enumerate(params.get("gamma") or []):
        if not 0 <= g <= 1:
            yield i, f"gamma {g:g} is not in [0, 1]"
    for i, (d, e) in enumerate(zip(density, params.get("epsilon") or [], strict=False)):
        if 0 < d < 1 and not (d - abs(e) > 0 and d + abs(e) < 1):
            yield i, f"density {d:g} ± epsilon {e:g} must lie in (0, 1)"


@merge_method(
    "task_arithmetic", base="required", per_model={"weight": None, "density": 1.0}, check=_check
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al.): ``base + λ Σ_i w_i (x_i - base)`` [/ Σ w_i].

    ``density``, ``rescale`` and ``int8_mask`` are accepted and have no effect, as in mergekit.
    """
    return generalized_task_arithmetic(
        tensors, base, weight=weight, density=density, sparsifier=None, consensus=None,
        normalize=normalize, rescale=rescale, lambda_=lambda_, int8_mask=int8_mask,
    )  # fmt: skip


@merge_method("ties", base="required", per_model={"weight": None, "density": 1.0}, check=_check)
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    consensus_method: Consensus = "sum",
) -> torch.Tensor:
    """TIES (Yadav et al.): trim each task vector by magnitude, elect signs, disjoint mean."""
    return generalized_task_arithmetic(
        tensors, base, weight=weight, density=density, sparsifier="magnitude",
        consensus=consensus_method, normalize=normalize, rescale=rescale, lambda_=lambda_,
        int8_mask=int8_mask,
    )  # fmt: skip


@merge_method(
    "dare_ties",
    base="required",
    per_model={"weight": None, "density": 1.0},
    stochastic=True,
    check=_check,
)
def dare_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    consensus_method: Consensus = "sum",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE (Yu et al.) + TIES sign election: random drop with rescale, then elect signs."""
    return generalized_task_arithmetic(
        tensors, base, weight=weight, density=density, sparsifier="random",
        consensus=consensus_method, normalize=normalize, rescale=rescale, lambda_=lambda_,
        int8_mask=int8_mask, generator=generator,
    )  # fmt: skip


@merge_method(
    "dare_linear",
    base="required",
    per_model={"weight": None, "density": 1.0},
    stochastic=True,
    check=_check,
)
def dare_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE (Yu et al.): random drop with rescale, then task arithmetic."""
    return generalized_task_arithmetic(
        tensors, base, weight=weight, density=density, sparsifier="random", consensus=None,
        normalize=normalize, rescale=rescale, lambda_=lambda_, int8_mask=int8_mask,
        generator=generator,
    )  # fmt: skip


_BREADCRUMBS = {"weight": None, "density": 1.0, "gamma": 0.01}


@merge_method("breadcrumbs", base="required", per_model=_BREADCRUMBS, check=_check)
def breadcrumbs(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """Model breadcrumbs (Davari & Belilovsky): drop outliers and small values, then add."""
    return generalized_task_arithmetic(
        tensors, base, weight=weight, density=density, gamma=gamma,
        sparsifier="magnitude_outliers", consensus=None, normalize=normalize,
        rescale=rescale, lambda_=lambda_, int8_mask=int8_mask,
    )  # fmt: skip


@merge_method("breadcrumbs_ties", base="required", per_model=_BREADCRUMBS, check=_check)
def breadcrumbs_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    consensus_method: Consensus = "sum",
) -> torch.Tensor:
    """Breadcrumbs sparsification with TIES sign election."""
    return generalized_task_arithmetic(
        tensors, base, weight=weight, density=density, gamma=gamma,
        sparsifier="magnitude_outliers", consensus=consensus_method, normalize=normalize,
        rescale=rescale, lambda_=lambda_, int8_mask=int8_mask,
    )  # fmt: skip


_DELLA = {"weight": None, "density": 1.0, "epsilon": 0.15}


@merge_method("della", base="required", per_model=_DELLA, stochastic=True, check=_check)
def della(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    consensus_method: Consensus = "sum",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA (Deep et al.): magnitude-ranked random drop with rescale, then elect signs."""
    return generalized_task_arithmetic(
        tensors, base, weight=weight, density=density, epsilon=epsilon, sparsifier="della",
        consensus=consensus_method, normalize=normalize, rescale=rescale, lambda_=lambda_,
        int8_mask=int8_mask, generator=generator,
    )  # fmt: skip


@merge_method("della_linear", base="required", per_model=_DELLA, stochastic=True, check=_check)
def della_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA sparsification, then task arithmetic (no sign election)."""
    return generalized_task_arithmetic(
        tensors, base, weight=weight, density=density, epsilon=epsilon, sparsifier="della",
        consensus=None, normalize=normalize, rescale=rescale, lambda_=lambda_,
        int8_mask=int8_mask, generator=generator,
    )  # fmt: skip
