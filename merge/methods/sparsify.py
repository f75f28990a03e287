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


CHUNK = 1 << 22  # elements per pass chunk: temporaries stay small on any tensor size


def rescale_l1(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept · ‖x‖₁ / ‖kept‖₁`` in ``x``'s dtype; ``kept`` as is when either norm is ~0."""
    before, after = x.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _finish(x: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = x * keep.to(x.dtype)
    return rescale_l1(x, kept) if rescale else kept


# ---- exact rank selection on |x|, in passes over chunks ---------------------------------------
# For IEEE floats the bit pattern with the sign bit cleared, read as an integer, orders |x|
# exactly; selecting the k-th key with a radix pass of 16-bit digits (bincount) is linear and
# needs no sorted copy. Ranks are ascending |x| with ties broken by flat position.

_KEY_TYPES = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def _chunks(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[i : i + CHUNK] for i in range(0, flat.numel(), CHUNK)]


def _keys(chunk: torch.Tensor) -> torch.Tensor:
    """Order keys of ``|chunk|`` (int16 or int32)."""
    itype, mask = _KEY_TYPES[chunk.dtype]
    return chunk.view(itype) & mask


def _select(flat: torch.Tensor, rank: int) -> tuple[int, int]:
    """Key of the entry with 0-based ascending rank ``rank`` and how many keys are smaller."""
    wide = _KEY_TYPES[flat.dtype][0] == torch.int32
    below, prefix = 0, 0
    for shift in (16, 0) if wide else (0,):
        counts = torch.zeros(1 << 16, dtype=torch.int64, device=flat.device)
        for chunk in _chunks(flat):
            key = _keys(chunk)
            if wide and shift == 0:  # only keys under the chosen top digit
                key = key[(key >> 16) == (prefix >> 16)] & 0xFFFF
            elif wide:
                key = key >> 16
            counts += torch.bincount(key.reshape(-1), minlength=1 << 16)
        cum = counts.cumsum(0)
        digit = int(torch.searchsorted(cum, rank - below, right=True))
        if digit > 0:
            below += int(cum[digit - 1])
        prefix |= digit << shift
    return prefix, below


class _Ranks:
    """Chunk by chunk, in order: which entries have ascending rank below ``rank``."""

    def __init__(self, flat: torch.Tensor, rank: int) -> None:
        self.kth, smaller = _select(flat, rank)  # 0 < rank < numel
        self.ties_left = rank - smaller  # entries equal to the cut key that still rank below

    def below(self, key: torch.Tensor) -> torch.Tensor:
        """Bool mask for the next chunk's keys (chunks must come in flat order)."""
        mask = key < self.kth
        if self.ties_left > 0:
            ties = torch.nonzero(key == self.kth).squeeze(1)[: self.ties_left]
            mask[ties] = True
            self.ties_left -= ties.numel()
        return mask


def zero_outside_ranks_(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """In place: zero the entries of ``x`` whose ascending ``|x|`` rank is not in ``[lo, hi)``."""
    flat = x.view(-1)
    if x.dtype not in _KEY_TYPES:  # float64 and others: one sorted pass
        order = torch.argsort(flat.abs(), stable=True)
        flat[order[:lo]] = 0
        flat[order[hi:]] = 0
        return x
    low = _Ranks(flat, lo) if lo > 0 else None
    high = _Ranks(flat, hi) if hi < flat.numel() else None
    for chunk in _chunks(flat):
        key = _keys(chunk)
        if low is not None:
            chunk.masked_fill_(low.below(key), 0)
        if high is not None:
            chunk.masked_fill_(~high.below(key), 0)
    return x


def magnitude_(x: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """In place :func:`magnitude` (``x`` is overwritten and returned)."""
    n = x.numel()
    if density >= 1:
        return x
    if density <= 0 or n == 0:
        return x.zero_()
    k = max(1, int(density * n))
    return _sparsified_(x, n - k, n, rescale)


def magnitude_outliers_(
    x: torch.Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """In place :func:`magnitude_outliers` (``x`` is overwritten and returned)."""
    if density >= 1:
        return x
    n = x.numel()
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    return _sparsified_(x, bottom_n, bottom_n + keep_n, rescale)


def _sparsified_(x: torch.Tensor, lo: int, hi: int, rescale: bool) -> torch.Tensor:
    before = x.abs().sum() if rescale else None
    zero_outside_ranks_(x, lo, hi)
    if before is not None:
        after = x.abs().sum()
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            x.mul_(before / after)
    return x


def magnitude(x: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` entries of largest magnitude (TIES trimming)."""
    if density >= 1:
        return x
    return magnitude_(x.clone(), density, rescale=rescale)


def magnitude_outliers(
    x: torch.Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """Breadcrumbs: drop the top ``int(gamma·n)`` magnitudes, keep the next ``int(density·n)``.

    When ``density + gamma > 1`` fewer outliers are dropped so that ``int(density·n)`` remain.
    """
    if density >= 1:
        return x
    return magnitude_outliers_(x.clone(), density, gamma=gamma, rescale=rescale)


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
