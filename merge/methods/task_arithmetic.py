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

from typing import Literal

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
    dtype = torch.int8 if int8_mask else deltas.dtype
    signs = deltas.sign().to(dtype)
    total = deltas.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    elected = torch.where(total >= 0, 1, -1).to(dtype)
    return signs == elected


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
    """
    if not tensors:
        return base.clone()
    deltas = torch.stack([x - base for x in tensors])  # [n, ...], in base's dtype
    for i, d in enumerate(deltas):
        if sparsifier == "magnitude":
            deltas[i] = sparsify.magnitude(d, density[i], rescale=rescale)
        elif sparsifier == "magnitude_outliers":
            assert gamma is not None
            deltas[i] = sparsify.magnitude_outliers(d, density[i], gamma=gamma[i], rescale=rescale)
        elif sparsifier == "random":
            deltas[i] = sparsify.random(d, density[i], rescale=rescale, generator=generator)
        elif sparsifier == "della":
            assert epsilon is not None
            deltas[i] = sparsify.della(
                d, density[i], epsilon=epsilon[i], rescale=rescale, generator=generator
            )
    w = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device)
    w = w.view(-1, *([1] * base.dim()))  # [n, 1, ...]
    deltas *= w
    if consensus is not None:
        agree = sign_agreement(deltas, consensus, int8_mask=int8_mask)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


@merge_method("task_arithmetic", base="required", per_model={"weight": None, "density": 1.0})
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


@merge_method("ties", base="required", per_model={"weight": None, "density": 1.0})
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
    "dare_ties", base="required", per_model={"weight": None, "density": 1.0}, stochastic=True
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
    "dare_linear", base="required", per_model={"weight": None, "density": 1.0}, stochastic=True
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


@merge_method("breadcrumbs", base="required", per_model=_BREADCRUMBS)
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


@merge_method("breadcrumbs_ties", base="required", per_model=_BREADCRUMBS)
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


@merge_method("della", base="required", per_model=_DELLA, stochastic=True)
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


@merge_method("della_linear", base="required", per_model=_DELLA, stochastic=True)
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
