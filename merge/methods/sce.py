"""SCE (FuseChat 2, Wan et al. 2024): Select the entries where the task vectors vary most across
models, Calculate each model's weight from its task vector's energy, Erase the entries that
disagree with the elected sign, then average."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from splice.merge.methods import sparsify
from splice.merge.methods.base import merge_method
from splice.merge.methods.task_arithmetic import agrees, elected_positive

CHUNK = 1 << 20  # elements per pass chunk (bounds temporaries on any tensor size)
WEIGHT_FLOOR = 1e-6  # below this total energy the weights are uniform (as mergekit)
DIVISOR_FLOOR = 1e-6  # the agreeing weights' sum is floored at this before dividing


def _flat_chunks(xs: list[torch.Tensor]) -> zip:
    return zip(*(x.reshape(-1).split(CHUNK) for x in xs), strict=True)


def variance_mask(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Bool ``[...]``: the ``k = int(fraction · m)`` entries with the largest variance across
    models (population variance, in the deltas' dtype), ``m`` counting the entries whose
    variance is not 0; ties at the cut go by flat position (a later entry ranks higher)."""
    var = torch.empty_like(deltas[0])
    for v, *ds in _flat_chunks([var, *deltas]):
        torch.var(torch.stack(ds), dim=0, correction=0, out=v)
    # as mergekit: the count times the fraction in float32 (a tensor times a float), truncated
    k = int(torch.count_nonzero(var) * fraction)
    if k == 0:
        return torch.zeros(var.shape, dtype=torch.bool, device=var.device)
    n = var.numel()
    return sparsify.zero_outside_ranks_(var, n - k, n) != 0


def _check(params: dict[str, Any]) -> Iterator[tuple[int | None, str]]:
    topk = params.get("select_topk", 1.0)
    if not 0 <= topk <= 1:
        yield None, f"select_topk {topk:g} is not in [0, 1]"


@merge_method("sce", base="required", check=_check)
def sce(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """``out = base + Σ_i m_i w_i d_i / max(Σ_i m_i w_i, 1e-6)`` over task vectors
    ``d_i = x_i - base`` of shape ``[...]``:

    * select: with ``select_topk < 1``, every ``d_i`` keeps only the ``select_topk`` fraction
      of entries of largest variance across the models (:func:`variance_mask`);
    * calculate: ``w_i = mean(d_i²) / Σ_j mean(d_j²)`` over the selected task vectors, uniform
      ``1/n`` when that total is below 1e-6 (as mergekit: tiny task vectors get equal weights);
    * erase: ``m_i`` keeps the entries whose sign agrees with that of ``Σ_i d_i`` (zeros never
      agree), TIES' election.

    In the inputs' dtype (weights rounded to it), sums accumulated in float32 and rounded
    once, as mergekit's stacked sums are. ``int8_mask`` is accepted for mergekit recipes and
    changes nothing (no mask tensor is held in the inputs' dtype).
    """
    dtype = base.dtype
    deltas = [x - base for x in tensors]
    if select_topk < 1:
        keep = variance_mask(deltas, select_topk)
        for d in deltas:
            d.mul_(keep)
        del keep
    energy = torch.stack([d.square().mean() for d in deltas])  # [n], in dtype
    total = energy.sum().item()
    uniform = abs(total) < WEIGHT_FLOOR
    weights = torch.ones_like(energy) / len(deltas) if uniform else energy / total
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty_like(base)
    for o, b, *ds in _flat_chunks([out, base, *deltas]):
        positive = elected_positive(ds, "sum")
        mixed = torch.zeros(o.shape, dtype=acc, device=o.device)
        divisor = torch.zeros_like(mixed)
        for d, w in zip(ds, weights, strict=True):
            part = torch.where(agrees(d, positive), w, 0)  # [chunk], in dtype
            mixed += d * part
            divisor += part
        torch.add(b, mixed.to(dtype) / divisor.to(dtype).clamp(min=DIVISOR_FLOOR), out=o)
    return out
