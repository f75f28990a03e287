"""Model Stock (Jang et al., 2024): move from the base toward the fine-tunes' average by a ratio
set by the angle between their task vectors."""

from __future__ import annotations

import torch

from splice.merge.methods.base import merge_method


@merge_method("model_stock", base="required", inputs=(2, None))
def model_stock(
    tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False
) -> torch.Tensor:
    """``out = t · mean_i(x_i) + (1 - t) · base`` with ``t = N cos θ / (1 + (N - 1) cos θ)``.

    ``cos θ`` is the mean pairwise cosine between the ``N >= 2`` task vectors ``x_i - base``,
    over whole tensors, or with ``filter_wise`` per row (per vector along the last dim; a
    1-D tensor is one row), then ``t`` is per row. Where ``1 + (N - 1) cos θ`` is ~0 the base
    is kept (``t = 0``). Shapes ``[...]`` in and out, computed in the inputs' dtype.
    """
    if len(tensors) < 2:
        raise ValueError(
            f"model_stock needs at least two models besides the base; got {len(tensors)}"
        )

    def rows(x: torch.Tensor) -> torch.Tensor:
        if not filter_wise:
            return x.reshape(-1)
        return x.unsqueeze(0) if x.dim() == 1 else x

    w0 = rows(base)
    deltas = [rows(x) - w0 for x in tensors]
    norms = [d.norm(dim=-1) for d in deltas]
    cos = [
        ((deltas[i] * deltas[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(deltas))
        for j in range(i + 1, len(deltas))
    ]
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)  # [rows, 1] or [1]
    n = len(tensors)
    denom = 1 + (n - 1) * cos_theta
    singular = denom.abs() < 1e-6
    t = torch.where(singular, 0, n * cos_theta / torch.where(singular, 1, denom))
    average = sum(rows(x) for x in tensors) / n
    return (t * average + (1 - t) * w0).reshape(base.shape)
