"""Arcee Fusion: keep the other model's change only where it matters most, by an outlier cut on
an importance score (its size times how much it moves the row's softmax)."""

from __future__ import annotations

import torch

from splice.merge.methods.base import merge_method

SAMPLE = 1_000_000  # quartiles of larger tensors are estimated from this many draws
KL_EPS = 1e-8  # added to both softmaxes before the log


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|other - base| · KL(softmax(other) ‖ softmax(base))`` with the KL divergence taken per
    row (over the last dim, ``[..., 1]``) and broadcast over it; shape ``[...]``, inputs' dtype."""
    p = torch.softmax(other, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True)
    return (other - base).abs() * kl


def outlier_threshold(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``median + 1.5 · (q3 - q1)`` of ``scores`` (0-dim, scores' dtype).

    A quartile ``q`` is the sorted value at index ``floor(q · (n - 1))``. Over ``SAMPLE``
    entries the quartiles are those of ``SAMPLE`` entries drawn with replacement from
    ``generator`` (on its device), as mergekit estimates them.
    """
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE:
        device = generator.device if generator is not None else flat.device
        picks = torch.randint(flat.numel(), (SAMPLE,), generator=generator, device=device)
        flat = flat[picks.to(flat.device)]
    ordered = flat.sort().values
    last = ordered.numel() - 1
    q1, median, q3 = (ordered[(k * last) // 4] for k in (1, 2, 3))
    return median + 1.5 * (q3 - q1)


@merge_method("arcee_fusion", base="required", inputs=(1, 1), stochastic=True)
def arcee_fusion(
    tensors: list[torch.Tensor], base: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``out = base + (x - base) · [s >= median(s) + 1.5 · IQR(s)]`` with ``s`` the
    :func:`importance` of the one other model ``x`` against the base: only the outliers of the
    importance distribution take ``x``'s value, the rest keep the base's. Shapes ``[...]``
    (a 1-D tensor is one row), computed in the inputs' dtype. ``generator``: for the quartile
    estimate on tensors over a million entries only; smaller tensors use no randomness.
    """
    if len(tensors) != 1:
        raise ValueError(
            f"arcee_fusion merges a base and exactly one other model; got {len(tensors)}"
        )
    (other,) = tensors
    scores = importance(other, base)
    keep = scores >= outlier_threshold(scores, generator)
    return torch.where(keep, base + (other - base), base)
