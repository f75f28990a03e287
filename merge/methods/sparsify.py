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

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

RESCALE_EPS = 1e-7


CHUNK = 1 << 22  # elements per block of a fused pass on an accelerator


def rescale_l1(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept · ‖x‖₁ / ‖kept‖₁`` in ``x``'s dtype; ``kept`` as is when either norm is ~0."""
    before, after = x.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def _finish(x: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = x * keep.to(x.dtype)
    return rescale_l1(x, kept) if rescale else kept


# ---- exact rank selection on |x|, streamed ------------------------------------------------------
# For IEEE floats the bit pattern with the sign bit cleared, read as an integer, orders |x|
# exactly (the entry's key); selecting the k-th key with radix passes of 16-bit digits (bincount)
# is linear and needs no sorted copy. Ranks are ascending |x| with ties broken by flat position,
# so the cut at a rank is a key ``kth`` and a flat position ``pos``: an entry ranks below it iff
# its key is below ``kth``, or equal to it and before ``pos``. Masks are integer ops on the bit
# patterns (``(key - t) >> shift`` is all ones iff key < t), on CPU a fraction of the cost of a
# float comparison, ``torch.where`` or ``masked_fill``.


@dataclass(frozen=True)
class Bits:
    """Integer view of a float dtype: the sign bit's shift, the key of +inf, the bits of 1.0."""

    itype: torch.dtype
    shift: int
    inf: int
    one: int

    @property
    def magnitude(self) -> int:
        """The bits below the sign bit: ``x.view(itype) & magnitude`` is ``|x|``'s key."""
        return (1 << self.shift) - 1


BITS = {
    torch.bfloat16: Bits(torch.int16, 15, 0x7F80, 0x3F80),
    torch.float16: Bits(torch.int16, 15, 0x7C00, 0x3C00),
    torch.float32: Bits(torch.int32, 31, 0x7F800000, 0x3F800000),
    torch.float64: Bits(torch.int64, 63, 0x7FF0000000000000, 0x3FF0000000000000),
}
RANKED = (torch.bfloat16, torch.float16, torch.float32)  # dtypes ranked by radix selection
BITS_OF_KEY = {torch.int16: BITS[torch.bfloat16], torch.int32: BITS[torch.float32]}
ROW = 1 << 20  # elements per row of a rank histogram: where ties at a cut are counted again
BLOCK = 1 << 19  # elements per block and CPU thread of a fused pass: temporaries stay in cache

Keys = Callable[[], Iterable[torch.Tensor]]  # a pass: a flat tensor's keys, piece by piece


def block_size(x: torch.Tensor) -> int:
    """Elements per block of a fused pass over ``x``: on CPU ``BLOCK`` per intra-op thread (each
    operation is split among them; fewer, larger ones spend less on waking threads), ``CHUNK``
    on accelerators (where each operation is a kernel launch)."""
    return BLOCK * torch.get_num_threads() if x.device.type == "cpu" else CHUNK


def keys_(x: torch.Tensor) -> torch.Tensor:
    """In place: ``x``'s bits become the order keys of ``|x|`` (int16 or int32, >= 0)."""
    bits = BITS[x.dtype]
    return x.view(bits.itype).bitwise_and_(bits.magnitude)


def _keys(chunk: torch.Tensor) -> torch.Tensor:
    """Order keys of ``|chunk|`` (a new int16 or int32 tensor)."""
    bits = BITS[chunk.dtype]
    return chunk.view(bits.itype) & bits.magnitude


def _histograms(
    pieces: Iterable[torch.Tensor], digit: Callable[[torch.Tensor], torch.Tensor], bins: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Counts of ``digit(piece)`` over pieces gathered into rows of about ``ROW`` elements: the
    total ``[bins]``, each row's ``[bins]`` and each row's element count (``digit`` may select,
    flattened). Counts stay int64 as ``bincount`` makes them, and only the total is summed over
    rows (a row's counts are read later at one digit only)."""
    rows: list[torch.Tensor] = []
    sizes: list[int] = []
    total: torch.Tensor | None = None
    for piece in pieces:
        counts = torch.bincount(digit(piece), minlength=bins)
        if total is None:
            total = counts.clone()
        else:
            total += counts
        if sizes and sizes[-1] < ROW:
            rows[-1] += counts
            sizes[-1] += piece.numel()
        else:
            rows.append(counts)
            sizes.append(piece.numel())
    if total is None:
        total = torch.zeros(bins, dtype=torch.int64)
    return total, rows, sizes


class _Cut:
    """The cut at ``rank`` as ``(kth, pos)``; ``pos`` is found as the blocks stream by.

    ``total`` ``[bins]`` and ``rows`` (``[bins]`` each, ``sizes`` consecutive elements each) count
    the keys that share the top bits ``prefix`` by their last 16 bits; ``smaller`` keys have a
    lower prefix. The ties (keys equal to ``kth``) that rank below are all those before flat position
    ``start``, then the next ``pending``.
    """

    def __init__(
        self,
        rank: int,
        total: torch.Tensor,
        rows: list[torch.Tensor],
        sizes: list[int],
        prefix: int = 0,
        smaller: int = 0,
        shift: int = 15,
    ) -> None:
        self.shift = shift  # the keys' sign bit: 15 or 31
        cum = total.cumsum(0)
        digit = int(torch.searchsorted(cum, rank - smaller, right=True))
        ties = rank - smaller - (int(cum[digit - 1]) if digit > 0 else 0)
        self.kth = prefix | digit
        through = torch.stack([r[digit] for r in rows]).cumsum(0)  # ties up to each row's end
        crossing = int(torch.searchsorted(through, ties))  # the row of the last tie below
        self.start = sum(sizes[:crossing])
        self.pending = ties - (int(through[crossing - 1]) if crossing > 0 else 0)
        self.pos: int | None = 0 if ties == 0 else None

    def below(self, start: int, key: torch.Tensor) -> list[tuple[int, int]]:
        """Pieces ``(end, t)`` of the block of keys at flat ``start`` (local ends, in order): in
        a piece an entry ranks below the cut iff its key is ``< t``. Blocks come in flat order."""
        n = key.numel()
        if self.pos is None and start + n > self.start:
            skip = max(0, self.start - start)
            part = key[skip:]
            tie = torch.bitwise_xor(part, self.kth).sub_(1).bitwise_right_shift_(self.shift)
            count = -int(tie.sum(dtype=torch.int32))  # tie: all ones where key == kth
            if count < self.pending:
                self.pending -= count
            else:  # the last tie below is in this block
                self.pos = start + skip + _nth_set(tie, self.pending) + 1
        if self.pos is None or start + n <= self.pos:
            return [(n, self.kth + 1)]  # every tie here ranks below
        if start >= self.pos:
            return [(n, self.kth)]
        return [(self.pos - start, self.kth + 1), (n, self.kth)]


def _nth_set(mask: torch.Tensor, k: int, width: int = 1024) -> int:
    """Index of the ``k``-th (from 1) entry that is set in the integer mask ``[b]`` (all ones
    where set), found by rows of ``width`` so that only one row is searched entry by entry."""
    full = mask.numel() // width * width
    if full:
        cum = mask[:full].view(-1, width).sum(1, dtype=torch.int32).neg_().cumsum(0)
        row = int(torch.searchsorted(cum, k))  # the first row holding k set entries so far
        if row < cum.numel():
            k -= int(cum[row - 1]) if row else 0
            return row * width + int(torch.nonzero(mask[row * width : (row + 1) * width])[k - 1])
        k -= int(cum[-1])
    return full + int(torch.nonzero(mask[full:])[k - 1])


def _cuts(keys: Keys, ranks: list[int]) -> tuple[list[_Cut], int]:
    """A :class:`_Cut` per rank (each in ``(0, numel)``) of the flat tensor whose keys ``keys()``
    yields in consecutive pieces (called once per pass: once, or twice for 32-bit keys), and a
    bound on its keys (the largest one for 16-bit keys)."""
    wide = False

    def top(key: torch.Tensor) -> torch.Tensor:  # 16-bit keys: the whole key
        nonlocal wide
        wide = key.dtype == torch.int32
        return (key >> 16 if wide else key).view(-1)

    counts, rows, sizes = _histograms(keys(), top, 1 << 15)
    largest = int(torch.nonzero(counts)[-1])
    if not wide:
        return [_Cut(rank, counts, rows, sizes) for rank in ranks], largest
    cum = counts.cumsum(0)
    tops = [int(torch.searchsorted(cum, rank, right=True)) for rank in ranks]
    lows = {  # one more pass per top digit: the last 16 bits of the keys under it
        t: _histograms(keys(), lambda k, t=t: k[(k >> 16) == t] & 0xFFFF, 1 << 16)
        for t in dict.fromkeys(tops)
    }
    cuts = [
        _Cut(rank, *lows[t], t << 16, int(cum[t - 1]) if t else 0, shift=31)
        for rank, t in zip(ranks, tops, strict=True)
    ]
    return cuts, (largest << 16) | 0xFFFF


class RankWindow:
    """Zero the entries whose ascending ``|x|`` rank is outside ``[lo, hi)``, block by block.

    Made from one or two passes over ``keys()`` (the flat tensor's keys in consecutive pieces),
    then ``keep_`` applies it to each block of the tensor in flat order, once (bf16, fp16 or
    float32). ``bound``: the largest key of the tensor (an upper bound for 32-bit keys), None
    where no pass was made, 0 for an empty window (``keep_`` zeroes everything).
    """

    def __init__(self, keys: Keys, n: int, lo: int, hi: int) -> None:
        self.empty = lo >= hi
        ranks = [r for r in (lo, hi) if 0 < r < n] if not self.empty else []
        cuts, self.bound = _cuts(keys, ranks) if ranks else ([], None)
        if self.empty:
            self.bound = 0
        self.low = cuts.pop(0) if 0 < lo < n and not self.empty else None
        self.high = cuts.pop(0) if 0 < hi < n and not self.empty else None

    def pieces(self, start: int, key: torch.Tensor) -> list[tuple[int, int, int]]:
        """For the block of keys ``key`` ``[b]`` at flat ``start``: ``(end, lo, hi)`` pieces in
        order (local ends) where exactly the keys ``lo <= key < hi`` are kept; ``hi`` is the
        keys' width (``magnitude + 1``) where nothing is dropped from the top. Blocks come in
        flat order, once each."""
        n, top = key.numel(), BITS_OF_KEY[key.dtype].magnitude + 1
        if self.empty:
            return [(n, top, top)]
        lows = self.low.below(start, key) if self.low else [(n, 0)]  # below lo: dropped
        highs = self.high.below(start, key) if self.high else [(n, top)]  # below hi: kept
        out = []
        while lows and highs:
            end = min(lows[0][0], highs[0][0])
            out.append((end, lows[0][1], highs[0][1]))
            for cuts in (lows, highs):
                if cuts[0][0] == end:
                    cuts.pop(0)
        return out

    def keep_(
        self, start: int, x: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """In place on the contiguous block ``x`` ``[b]`` of flat positions ``start..start+b``;
        ``scratch``: two integer buffers of at least ``b`` for the keys and masks."""
        if self.low is None and self.high is None and not self.empty:
            return x
        bits = BITS[x.dtype]
        v = x.view(bits.itype)
        n = v.numel()
        if scratch is None:
            scratch = (torch.empty_like(v), torch.empty_like(v))
        key, mask = scratch[0][:n], scratch[1][:n]
        torch.bitwise_and(v, bits.magnitude, out=key)
        a = 0
        for end, lo, hi in self.pieces(start, key):
            keep_keys_(v[a:end], key[a:end], lo, hi, mask[a:end])
            a = end
        return x


def keep_keys_(
    v: torch.Tensor, key: torch.Tensor, lo: int | torch.Tensor, hi: int, mask: torch.Tensor
) -> None:
    """In place: zero the bits ``v`` ``[..., b]`` whose keys are outside ``lo <= key < hi``
    (``lo``: a number, or one per row ``[..., 1]`` in ``[0, magnitude]``; ``hi`` up to the keys'
    width, ``magnitude + 1``); ``mask``: a scratch buffer shaped as ``v``."""
    bits = BITS_OF_KEY[key.dtype]
    top = bits.magnitude + 1
    if isinstance(lo, int) and (lo >= top or hi <= 0):
        v.zero_()
        return
    if not isinstance(lo, int) or lo > 0:  # keep key >= lo
        torch.sub(key, lo, out=mask).bitwise_right_shift_(bits.shift).bitwise_not_()
        v.bitwise_and_(mask)
    if hi < top:  # keep key < hi
        v.bitwise_and_(torch.sub(key, hi, out=mask).bitwise_right_shift_(bits.shift))


def magnitude_window(n: int, density: float) -> tuple[int, int] | None:
    """Ranks TIES keeps of ``n`` entries: the top ``max(1, int(density·n))`` (None: all)."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return n, n
    return n - max(1, int(density * n)), n


def outliers_window(n: int, density: float, gamma: float) -> tuple[int, int] | None:
    """Ranks breadcrumbs keeps: ``int(density·n)`` below the top ``int(gamma·n)`` (None: all)."""
    if density >= 1:
        return None
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    return bottom_n, bottom_n + keep_n


def zero_outside_ranks_(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """In place: zero the entries of ``x`` whose ascending ``|x|`` rank is not in ``[lo, hi)``."""
    flat = x.view(-1)
    if x.dtype not in RANKED:  # float64 and others: one sorted pass
        order = torch.argsort(flat.abs(), stable=True)
        flat[order[:lo]] = 0
        flat[order[hi:]] = 0
        return x
    step = block_size(x)
    blocks = [flat[a : a + step] for a in range(0, flat.numel(), step)]
    window = RankWindow(lambda: map(_keys, blocks), flat.numel(), lo, hi)
    for i, block in enumerate(blocks):
        window.keep_(i * step, block)
    return x


def magnitude_(x: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """In place :func:`magnitude` (``x`` is overwritten and returned)."""
    window = magnitude_window(x.numel(), density)
    return x if window is None else _sparsified_(x, *window, rescale)


def magnitude_outliers_(
    x: torch.Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """In place :func:`magnitude_outliers` (``x`` is overwritten and returned)."""
    window = outliers_window(x.numel(), density, gamma)
    return x if window is None else _sparsified_(x, *window, rescale)


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
