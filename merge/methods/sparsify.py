"""Sparsifiers for task vectors: keep a ``density`` fraction of a delta, zero the rest.

Each takes a delta ``x`` (any shape) and returns a tensor of the same shape and dtype; with
``rescale`` the kept entries are scaled so the L1 norm matches the input's (mergekit's
``rescale``; for DARE this is 1/density on average). ``density >= 1`` returns ``x`` unchanged.

* ``magnitude``          (TIES)        keep the ``k = max(1, int(density·n))`` largest ``|x|``
* ``magnitude_outliers`` (breadcrumbs) drop the ``int(gamma·n)`` largest ``|x|``, then the
                                       smallest, keeping ``int(density·n)``
* ``random``             (DARE)        keep each entry with probability ``density``
* ``della``              (DELLA)       keep with a probability rising linearly with the entry's
                                       magnitude rank in its row, from ``density - epsilon``
                                       (smallest) to ``density + epsilon`` (largest)

Rankings order entries by ``|x|`` with ties broken by flat position (lower index ranks lower),
so a mask is the same on every device; mergekit leaves ties to an unstable sort. Random masks
are drawn from ``generator`` on the generator's device and moved to ``x``'s, so with a CPU
generator a seed gives the same mask whether the tensors are on CPU or GPU.
"""

from __future__ import annotations

import torch

RESCALE_EPS = 1e-7


def rescale_l1(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept · ‖x‖₁ / ‖kept‖₁`` in ``x``'s dtype; ``kept`` as is when either norm is ~0."""
    before, after = x.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _finish(x: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = x * keep.to(x.dtype)
    return rescale_l1(x, kept) if rescale else kept


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` flattened, in float32 (float64 kept): exact, and sortable on every device."""
    return x.detach().abs().reshape(-1).to(torch.promote_types(x.dtype, torch.float32))


def _smallest(w: torch.Tensor, r: int) -> torch.Tensor:
    """Bool mask of the ``r`` smallest entries of 1-D ``w``, ties going to the lower index."""
    keep = torch.zeros_like(w, dtype=torch.bool)
    if r <= 0:
        return keep
    if r >= w.numel():
        return keep.fill_(True)
    v = torch.kthvalue(w, r).values  # O(n) selection instead of a full sort
    keep = w < v
    need = r - int(keep.sum())
    keep[torch.nonzero(w == v).squeeze(1)[:need]] = True
    return keep


def rank_window(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Bool mask (shape of ``x``) of entries whose ascending ``|x|`` rank is in ``[lo, hi)``."""
    w = _magnitudes(x)
    return (_smallest(w, hi) & ~_smallest(w, lo)).reshape(x.shape)


def magnitude(x: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` entries of largest magnitude (TIES trimming)."""
    if density >= 1:
        return x
    n = x.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(x)
    k = max(1, int(density * n))
    return _finish(x, rank_window(x, n - k, n), rescale)


def magnitude_outliers(
    x: torch.Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """Breadcrumbs: drop the top ``int(gamma·n)`` magnitudes, keep the next ``int(density·n)``.

    When ``density + gamma > 1`` fewer outliers are dropped so that ``int(density·n)`` remain.
    """
    if density >= 1:
        return x
    n = x.numel()
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    return _finish(x, rank_window(x, bottom_n, bottom_n + keep_n), rescale)


def _uniform(shape: torch.Size, device: torch.device, generator: torch.Generator | None):
    """float32 uniforms in [0, 1) drawn on the generator's device, moved to ``device``.

    ``u < p`` is a Bernoulli(p) draw; on CPU it is the same stream as ``torch.bernoulli``.
    """
    where = device if generator is None else generator.device
    u = torch.rand(shape, dtype=torch.float32, device=where, generator=generator)
    return u.to(device)


def random(
    x: torch.Tensor,
    density: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return x
    return _finish(x, _uniform(x.shape, x.device, generator) < density, rescale)


def della(
    x: torch.Tensor,
    density: float,
    *,
    epsilon: float = 0.15,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability ``density - ε + 2ε·(r - 1)/(m - 1)`` for rank ``r``.

    Ranks ``r = 1..m`` order ``|x|`` within each slice along dim 1 (a 1-D ``x`` is one row), as
    mergekit does. A row of one entry gets probability ``density`` (mergekit fails on 0/0).
    """
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(
            f"della: density ± epsilon must lie in (0, 1); got density={density}, epsilon={epsilon}"
        )
    rows = x.unsqueeze(0) if x.dim() < 2 else x
    mag = rows.detach().abs().to(torch.promote_types(x.dtype, torch.float32))
    order = torch.argsort(mag, dim=1, stable=True)
    m = rows.shape[1]
    ramp = torch.arange(m, dtype=mag.dtype, device=x.device) / max(m - 1, 1)
    if m == 1:
        ramp.fill_(0.5)
    ramp = ramp.view(1, m, *([1] * (rows.dim() - 2))).expand_as(order)
    rank_norm = torch.empty_like(mag).scatter_(1, order, ramp)
    p = (density - epsilon) + rank_norm * 2 * epsilon
    keep = _uniform(p.shape, x.device, generator) < p
    return _finish(rows, keep, rescale).reshape(x.shape)
