"""Task arithmetic and its sparsified / sign-elected presets (TIES, DARE, breadcrumbs, DELLA).

One function, :func:`generalized_task_arithmetic`, does the work; every registered method is a
:class:`Preset` in :data:`PRESETS` (sparsifier × sign election, with mergekit's defaults), as in
mergekit's ``merge_methods/registry.py``:

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

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
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


def vote(
    deltas: list[torch.Tensor], method: Consensus = "sum", *, int8_mask: bool = False
) -> torch.Tensor:
    """The election's total ``[...]``: ``+`` is elected where it is >= 0 (NaN elects ``-``).

    The total is accumulated in float32 (as a stacked sum would be) one delta at a time, so no
    ``[n, ...]`` stack is ever held; ``sum`` rounds it once to the deltas' dtype.
    """
    dtype = deltas[0].dtype
    if method == "sum" and len(deltas) <= 2:  # one rounding in the input dtype
        return deltas[0] + deltas[1] if len(deltas) == 2 else deltas[0]
    total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d in deltas:
        if method == "sum":
            total += d
        else:
            total += d.sign().to(torch.int8 if int8_mask else dtype)
    if method == "sum" and dtype != torch.float32:
        total = total.to(dtype)  # the stacked sum's single rounding
    return total


def elected_positive(
    deltas: list[torch.Tensor], method: Consensus = "sum", *, int8_mask: bool = False
) -> torch.Tensor:
    """Bool ``[...]``: where the elected sign is ``+`` (the :func:`vote`'s total is >= 0)."""
    return vote(deltas, method, int8_mask=int8_mask) >= 0


def agrees(delta: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Bool: ``delta``'s sign is the elected one (zeros never agree)."""
    return torch.where(positive, delta > 0, delta < 0)


# ---- the merge, block by block -------------------------------------------------------------
# Every step after the sparsifier is elementwise, so the merge runs on blocks of the flattened
# tensors that stay in cache, the models' blocks stacked ``[m, b]`` so that one operation serves
# them all. Magnitude ranks are per tensor: they are selected first, exactly, from a pass over
# the deltas (sparsify.RankWindow), then applied block by block; deltas are recomputed per block
# (x - base) rather than held. Sign election works on the bit patterns (integer masks, see
# sparsify.Bits), which on CPU costs a fraction of float compares and torch.where; each float
# operation (sub, mul, add, div) is the one the whole-tensor formula does, in the same dtype and
# order, so the result is the same bit for bit.


class _Delta:
    """One model's sparsified task vector ``s(x_i - base)`` (``base`` flat, ``[n]``), by block.

    Streamed (``held`` is None): recomputed per block from ``x`` and ``base``, magnitude ranks
    (``window``, as :func:`sparsify.magnitude_window` gives them) selected by one pass first.
    Held: computed whole up front, for what needs the whole tensor (random masks drawn over
    its shape, L1 rescaling, float64 ranking).
    """

    def __init__(
        self,
        x: torch.Tensor,
        base: torch.Tensor,
        held: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
    ) -> None:
        self.x, self.base = x.reshape(-1), base
        self.held = None if held is None else held.view(-1)
        self.window: sparsify.RankWindow | None = None
        if held is None and window is not None:
            n, step = self.x.numel(), sparsify.block_size(x)
            scratch = torch.empty(min(step, n), dtype=x.dtype, device=x.device)

            def keys() -> Iterator[torch.Tensor]:
                for a in range(0, n, step):
                    b = min(a + step, n)
                    d = torch.sub(self.x[a:b], self.base[a:b], out=scratch[: b - a])
                    yield sparsify.keys_(d)

            self.window = sparsify.RankWindow(keys, n, *window)

    def block_(self, a: int, out: torch.Tensor) -> None:
        """Flat entries ``a..a+b`` into ``out`` ``[b]``, ``window`` not applied yet."""
        b = a + out.numel()
        if self.held is not None:
            out.copy_(self.held[a:b])
        else:
            torch.sub(self.x[a:b], self.base[a:b], out=out)


def _delta(
    x: torch.Tensor,
    base: torch.Tensor,
    i: int,
    sparsifier: Sparsifier | None,
    density: list[float],
    rescale: bool,
    gamma: list[float] | None,
    epsilon: list[float] | None,
    generator: torch.Generator | None,
) -> _Delta:
    """Model ``i``'s task vector (``base`` flat): streamed where its sparsifier allows, else
    held."""
    n = x.numel()
    if sparsifier is None or density[i] >= 1:  # nothing dropped (rescale then does nothing)
        return _Delta(x, base)
    streams = not rescale and x.dtype in sparsify.RANKED
    if sparsifier == "magnitude" and streams:
        return _Delta(x, base, window=sparsify.magnitude_window(n, density[i]))
    if sparsifier == "magnitude_outliers" and streams:
        assert gamma is not None
        return _Delta(x, base, window=sparsify.outliers_window(n, density[i], gamma[i]))
    d = (x.reshape(-1) - base).view(x.shape)  # fresh: sparsified in place
    if sparsifier == "magnitude":
        d = sparsify.magnitude_(d, density[i], rescale=rescale)
    elif sparsifier == "magnitude_outliers":
        assert gamma is not None
        d = sparsify.magnitude_outliers_(d, density[i], gamma=gamma[i], rescale=rescale)
    elif sparsifier == "random":
        d = sparsify.random(d, density[i], rescale=rescale, generator=generator)
    else:
        assert epsilon is not None
        d = sparsify.della(d, density[i], epsilon=epsilon[i], rescale=rescale, generator=generator)
    return _Delta(x, base, held=d)


def _finite(deltas: list[_Delta], w: list[torch.Tensor]) -> bool:
    """Whether every weighted delta is known to be finite: the rank selection saw no inf or NaN
    in ``x - base``, and its largest magnitude times ``|w|`` cannot overflow."""
    for d, wi in zip(deltas, w, strict=True):
        bound = d.window.bound if d.window is not None else None
        bits = sparsify.BITS[wi.dtype]
        if bound is None or bound >= bits.inf:
            return False
        largest = torch.tensor(bound, dtype=bits.itype).view(wi.dtype).item()
        if not largest * abs(float(wi)) < torch.finfo(wi.dtype).max / 2:
            return False
    return True


class _Mix:
    """``Σ_i m_i w_i d_i`` of a block ``[b]`` of the deltas (stacked ``[m, b]``), ``/ D`` with
    ``normalize``, in scratch buffers reused from block to block.

    Without ``consensus`` ``m_i = 1`` and ``D`` is the scalar ``divisor``. With it, ``m_i`` marks
    the weighted deltas that agree with the elected sign and ``D = Σ_i m_i w_i`` (1 where it is
    0): the masks are integer ops on the bit patterns (all ones where true), ``d`` or ``w`` where
    agreeing is ``bits & mask`` (``+0`` elsewhere, as ``torch.where(m, d, 0)``). ``ranked``:
    some delta has a rank window to apply; ``finite`` (every delta known finite) skips the tests
    for NaN.
    """

    def __init__(
        self,
        w: list[torch.Tensor],
        consensus: Consensus | None,
        normalize: bool,
        int8_mask: bool,
        divisor: torch.Tensor | None,
        size: int,
        like: torch.Tensor,
        ranked: bool = True,
        finite: bool = False,
    ) -> None:
        self.dtype = like.dtype
        self.finite = finite  # no delta has an inf or NaN: no total is NaN, no NaN to refuse
        self.bits = sparsify.BITS[self.dtype]
        self.consensus, self.normalize, self.int8_mask = consensus, normalize, int8_mask
        self.divisor = divisor
        m, device = len(w), like.device
        self.w = torch.stack(w).view(m, 1)  # the weights, one per row
        self.shares = self.w.view(self.bits.itype)  # ... and their bit patterns
        # sums of two terms round once in the input dtype itself; longer sums accumulate in float32
        self.acc = self.dtype if m <= 2 else torch.float32

        def new(*shape: int, dtype: torch.dtype = self.bits.itype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        self.deltas, self.mixed = new(m, size, dtype=self.dtype), new(size, dtype=self.acc)
        self.rounded = new(size, dtype=self.dtype) if self.acc != self.dtype else None
        if ranked or consensus is not None:
            self.key, self.masks = new(m, size), new(m, size)
            self.mask = self.masks[0]
        # per-row lower bounds of kept keys (less one, ``[m, 1]``), and whether every kept entry
        # stays nonzero once weighted: then the keep masks are also the election's nonzero masks
        self.lows: dict[tuple[int, ...], tuple[torch.Tensor, bool]] = {}
        self.table: tuple[int, torch.Tensor, int] | None = None
        if consensus is not None:
            self.agree, self.positive = new(m, size), new(size)
            self.total, self.denominator = new(size, dtype=self.dtype), new(size, dtype=self.acc)
            self.rounded_d = new(size, dtype=self.dtype) if self.acc != self.dtype else None
            if normalize and m == 2 and self.acc == self.dtype:
                self.table = self._denominators()

    def __call__(self, sources: list[_Delta], a: int, b: int) -> torch.Tensor:
        """The block of flat entries ``a..b`` ``[b - a]`` (in a scratch buffer, valid until the
        next call; blocks come in order)."""
        n = b - a
        ds = self.deltas[:, :n]
        for d, row in zip(sources, ds, strict=True):
            d.block_(a, row)
        keep = self._rank(sources, a, ds)
        ds *= self.w  # as w_i * d_i, row by row
        mixed = self.mixed[:n]
        if self.consensus is not None:
            denominator = self._elect(ds, keep)
        else:
            mixed.copy_(ds[0])
            for d in ds[1:]:
                mixed += d
            denominator = self.divisor
        chunk = mixed if self.rounded is None else self.rounded[:n].copy_(mixed)
        if self.normalize:
            chunk /= denominator
        return chunk

    def _rank(self, sources: list[_Delta], a: int, ds: torch.Tensor) -> torch.Tensor | None:
        """Zero, in the block of deltas ``ds`` ``[m, b]`` at flat ``a``, what the sources' rank
        windows drop: in one pass over all rows where each keeps the keys above one bound.

        Returns the keep masks ``[m, b]`` (all ones where kept) when they are also the masks of
        the entries that are nonzero once weighted (every row has a bound >= 1 here and no kept
        entry can round to 0 when multiplied by its weight), else None."""
        windows = [d.window for d in sources]
        if all(w is None for w in windows):
            return None
        n, bits = ds.shape[1], self.bits
        v, key, mask = ds.view(bits.itype), self.key[:, :n], self.masks[:, :n]
        torch.bitwise_and(v, bits.magnitude, out=key)
        top = bits.magnitude + 1
        pieces = [
            w.pieces(a, key[i]) if w is not None else [(n, 0, top)] for i, w in enumerate(windows)
        ]
        if all(len(p) == 1 and p[0][1] < top == p[0][2] for p in pieces):
            lows = tuple(p[0][1] for p in pieces)
            if lows not in self.lows:
                self.lows[lows] = self._bounds(lows)
            floor, nonzero = self.lows[lows]
            # keep key >= lo: (lo - 1) - key is negative (lo - 1 >= -1, no overflow)
            torch.sub(floor, key, out=mask).bitwise_right_shift_(bits.shift)
            v.bitwise_and_(mask)
            return mask if nonzero else None
        for i, p in enumerate(pieces):
            start = 0
            for end, lo, hi in p:
                part = slice(start, end)
                sparsify.keep_keys_(v[i, part], key[i, part], lo, hi, mask[i, part])
                start = end
        return None

    def _bounds(self, lows: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
        """``lows - 1`` as ``[m, 1]`` keys, and whether ``|w_i| * x`` rounds to nonzero for the
        smallest kept magnitude ``x`` of every row (rounding is monotone, so then for every kept
        entry; never where some row keeps zeros, ``lo = 0``)."""
        b, device = self.bits, self.w.device
        floor = torch.tensor([lo - 1 for lo in lows], dtype=b.itype, device=device).view(-1, 1)
        if min(lows) < 1:
            return floor, False
        smallest = torch.tensor(lows, dtype=b.itype, device=device).view(self.dtype)
        weighted = smallest * self.w.view(-1).abs()  # the dtype's own multiply, as ds *= w
        return floor, bool((weighted != 0).all())

    def _denominators(self) -> tuple[int, torch.Tensor, int]:
        """Two models: ``D = Σ_i m_i w_i`` (1 where it is 0) takes one of four values, made here
        by the very operations of the general path on the four agreement patterns, so that a
        block's ``D`` is bit operations on the masks: ``D00 ^ (m_0 & X_0) ^ (m_1 & X_1) ^
        (m_0 & m_1 & X_01)``. Returns ``D00``, ``X`` ``[2, 1]`` and ``X_01`` as bit patterns."""
        b = self.bits
        pattern = torch.tensor(
            [[0, -1, 0, -1], [0, 0, -1, -1]], dtype=b.itype, device=self.w.device
        )
        picked = (pattern & self.shares).view(self.dtype)  # w_i or +0
        dv = torch.add(picked[0], picked[1]).view(b.itype)  # as _sum of two rows
        zero = (dv & b.magnitude).sub_(1).bitwise_right_shift_(b.shift)
        dv ^= (dv ^ b.one) & zero  # ±0 -> 1
        d00, d10, d01, d11 = (int(x) for x in dv.tolist())
        x = torch.tensor([d10 ^ d00, d01 ^ d00], dtype=b.itype, device=self.w.device).view(2, 1)
        return d00, x, d11 ^ d10 ^ d01 ^ d00

    def _elect(self, ds: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sums the agreeing deltas ``[m, b]`` into ``mixed``; returns ``D`` (``normalize``).
        ``keep``: the nonzero masks of the weighted deltas, where :meth:`_rank` knows them."""
        m, n = ds.shape
        b, dtype = self.bits, self.dtype
        key, agree = self.key[:, :n], self.agree[:, :n]
        mask, positive = self.mask[:n], self.positive[:n]
        mixed, denominator = self.mixed[:n], self.denominator[:n]
        rows = list(ds)
        if self.consensus == "sum" and m <= 2:
            total = torch.add(rows[0], rows[1], out=self.total[:n]) if m == 2 else rows[0]
        else:
            total = vote(rows, self.consensus or "sum", int8_mask=self.int8_mask)
        v = ds.view(b.itype)
        if total.dtype == dtype and self.finite and keep is not None:
            # agree: nonzero (kept) and of the total's sign: the sign bit of d ^ ~total is set
            # (a total of -0 elects - here; it is a sum of ±0 only, which none agrees with)
            nt = torch.bitwise_not(total.view(b.itype), out=positive)
            torch.bitwise_xor(v, nt, out=agree).bitwise_right_shift_(b.shift)
            agree &= keep
            return self._mixed(v, agree, key, mask, mixed, denominator)
        if total.dtype == dtype and self.finite:
            # + elected: the sign bit is clear. A total of -0 (+ elected by >= 0) is a sum of
            # ±0 only (sums of nonzero values round to nonzero or +0), so none agrees anyway.
            torch.bitwise_right_shift(total.view(b.itype), b.shift, out=positive).bitwise_not_()
        elif total.dtype == dtype:  # + elected: not (negative and nonzero), and not NaN
            tv = total.view(b.itype)
            k = torch.bitwise_and(tv, b.magnitude, out=key[0])
            torch.neg(k, out=mask).bitwise_right_shift_(b.shift)  # nonzero
            torch.bitwise_right_shift(tv, b.shift, out=positive).bitwise_and_(mask).bitwise_not_()
            positive &= k.sub_(b.inf + 1).bitwise_right_shift_(b.shift)  # a NaN total elects -
        else:
            positive.copy_(total >= 0).neg_()
        torch.bitwise_and(v, b.magnitude, out=key)
        torch.neg(key, out=agree).bitwise_right_shift_(b.shift)  # nonzero
        if not self.finite:  # and not NaN
            agree &= key.sub_(b.inf + 1).bitwise_right_shift_(b.shift)
        agree &= torch.bitwise_xor(v, positive, out=key).bitwise_right_shift_(b.shift)  # sign
        return self._mixed(v, agree, key, mask, mixed, denominator)

    def _mixed(
        self,
        v: torch.Tensor,
        agree: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor,
        mixed: torch.Tensor,
        denominator: torch.Tensor,
    ) -> torch.Tensor | None:
        """``mixed = Σ_i m_i d_i`` from the deltas' bits ``v`` and the agreement masks ``agree``
        ``[m, b]`` (``key``, ``mask``: scratch); returns ``D`` (``normalize``)."""
        b, dtype, n = self.bits, self.dtype, v.shape[1]
        picked = torch.bitwise_and(v, agree, out=key).view(dtype)  # d or +0
        self._sum(picked, mixed)
        if not self.normalize:
            return None
        if self.table is not None:  # two models: D from the masks by bit operations
            d00, x, x01 = self.table
            parts = torch.bitwise_and(agree, x, out=key)
            dv = torch.bitwise_xor(parts[0], parts[1], out=denominator.view(b.itype))
            both = torch.bitwise_and(agree[0], agree[1], out=key[0])
            dv ^= both.bitwise_and_(x01)
            dv ^= d00
            return denominator
        self._sum(agree.bitwise_and_(self.shares).view(dtype), denominator)  # w_i or +0
        if self.rounded_d is not None:
            denominator = self.rounded_d[:n].copy_(denominator)
        dv = denominator.view(b.itype)  # ±0 -> 1
        zero = torch.bitwise_and(dv, b.magnitude, out=mask).sub_(1).bitwise_right_shift_(b.shift)
        dv ^= torch.bitwise_xor(dv, b.one, out=key[0]).bitwise_and_(zero)
        return denominator

    @staticmethod
    def _sum(rows: torch.Tensor, out: torch.Tensor) -> None:
        """``out = rows[0] + rows[1] + ...`` in ``out``'s dtype, in order (as ``0 + r_0 + ...``:
        no row holds -0 where the sum could see it)."""
        if rows.shape[0] == 2 and out.dtype == rows.dtype:
            torch.add(rows[0], rows[1], out=out)
            return
        out.copy_(rows[0])
        for r in rows[1:]:
            out += r


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

    Memory: the inputs, the result and a few blocks; a task vector is held whole only where
    its sparsifier needs the whole tensor (random masks, L1 rescale, float64 ranking).
    Arithmetic stays in the input dtype (weights rounded to it, as mergekit does), sums of
    more than two terms accumulate in float32 and round once.
    """
    if not tensors:
        return base.clone()
    dtype = base.dtype
    w = [torch.tensor(x, dtype=dtype, device=base.device) for x in weight]
    base_flat = base.reshape(-1)
    deltas = [
        _delta(x, base_flat, i, sparsifier, density, rescale, gamma, epsilon, generator)
        for i, x in enumerate(tensors)
    ]
    divisor = None
    if consensus is None:
        divisor = sum(w[1:], w[0].float()).to(dtype)
        if divisor.abs() < 1e-8:
            divisor = torch.ones((), dtype=dtype, device=base.device)
    result = torch.empty(base.shape, dtype=dtype, device=base.device)
    out = result.view(-1)
    step = max(1, min(sparsify.block_size(base), out.numel()))
    ranked = any(d.window is not None for d in deltas)
    finite = _finite(deltas, w) if consensus is not None else False
    mix = _Mix(w, consensus, normalize, int8_mask, divisor, step, base, ranked, finite)
    for a in range(0, out.numel(), step):
        b = min(a + step, out.numel())
        chunk = mix(deltas, a, b)
        if lambda_ != 1:
            chunk *= lambda_
        torch.add(base_flat[a:b], chunk, out=out[a:b])
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


# ---- the presets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A registered method: a sparsifier, whether signs are elected, mergekit's defaults."""

    name: str
    sparsifier: Sparsifier | None
    elect: bool  # TIES sign election (takes ``consensus_method``, default ``sum``)
    normalize: bool
    rescale: bool
    doc: str

    @property
    def stochastic(self) -> bool:
        """Random masks: the method takes the executor's per-tensor ``generator``."""
        return self.sparsifier in ("random", "della")

    @property
    def per_model(self) -> dict[str, float | None]:
        """Per-model parameters and their defaults (``None``: the recipe must give it)."""
        extra = {"magnitude_outliers": {"gamma": 0.01}, "della": {"epsilon": 0.15}}
        return {"weight": None, "density": 1.0, **extra.get(self.sparsifier or "", {})}


PRESETS = (
    Preset(
        "task_arithmetic", None, False, False, False,
        "Task arithmetic (Ilharco et al.): ``base + λ Σ_i w_i (x_i - base)`` [/ Σ w_i].\n\n"
        "``density``, ``rescale`` and ``int8_mask`` are accepted and have no effect, as in "
        "mergekit.",
    ),
    Preset(
        "ties", "magnitude", True, True, False,
        "TIES (Yadav et al.): trim each task vector by magnitude, elect signs, disjoint mean.",
    ),
    Preset(
        "dare_ties", "random", True, False, True,
        "DARE (Yu et al.) + TIES sign election: random drop with rescale, then elect signs.",
    ),
    Preset(
        "dare_linear", "random", False, False, True,
        "DARE (Yu et al.): random drop with rescale, then task arithmetic.",
    ),
    Preset(
        "breadcrumbs", "magnitude_outliers", False, False, False,
        "Model breadcrumbs (Davari & Belilovsky): drop outliers and small values, then add.",
    ),
    Preset(
        "breadcrumbs_ties", "magnitude_outliers", True, False, False,
        "Breadcrumbs sparsification with TIES sign election.",
    ),
    Preset(
        "della", "della", True, True, True,
        "DELLA (Deep et al.): magnitude-ranked random drop with rescale, then elect signs.",
    ),
    Preset(
        "della_linear", "della", False, False, True,
        "DELLA sparsification, then task arithmetic (no sign election).",
    ),
)  # fmt: skip


def _signature(p: Preset) -> inspect.Signature:
    """``(tensors, base, *, <per-model lists>, normalize, rescale, lambda_, int8_mask,
    [consensus_method], [generator])`` with the preset's defaults."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("tensors", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=list[torch.Tensor]),
        inspect.Parameter("base", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=torch.Tensor),
        *(inspect.Parameter(k, kw, annotation=list[float]) for k in p.per_model),
        inspect.Parameter("normalize", kw, default=p.normalize, annotation=bool),
        inspect.Parameter("rescale", kw, default=p.rescale, annotation=bool),
        inspect.Parameter("lambda_", kw, default=1.0, annotation=float),
        inspect.Parameter("int8_mask", kw, default=False, annotation=bool),
    ]  # fmt: skip
    if p.elect:
        params.append(
            inspect.Parameter("consensus_method", kw, default="sum", annotation=Consensus)
        )
    if p.stochastic:
        params.append(
            inspect.Parameter("generator", kw, default=None, annotation=torch.Generator | None)
        )
    return inspect.Signature(params, return_annotation=torch.Tensor)


def _method(p: Preset) -> Any:
    """The preset as a method function: its signature's arguments, to
    :func:`generalized_task_arithmetic` with the preset's sparsifier and election."""
    sig = _signature(p)

    def method(*args: Any, **kwargs: Any) -> torch.Tensor:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return generalized_task_arithmetic(
            a["tensors"], a["base"], weight=a["weight"], density=a["density"],
            sparsifier=p.sparsifier, consensus=a["consensus_method"] if p.elect else None,
            normalize=a["normalize"], rescale=a["rescale"], lambda_=a["lambda_"],
            int8_mask=a["int8_mask"], gamma=a.get("gamma"), epsilon=a.get("epsilon"),
            generator=a.get("generator"),
        )  # fmt: skip

    method.__name__ = method.__qualname__ = p.name
    method.__doc__ = p.doc
    method.__signature__ = sig  # type: ignore[attr-defined]
    method.__annotations__ = {k: v.annotation for k, v in sig.parameters.items()}
    method.__annotations__["return"] = torch.Tensor
    return method


METHOD_FNS = {}
for _p in PRESETS:
    METHOD_FNS[_p.name] = merge_method(
        _p.name, base="required", per_model=_p.per_model, stochastic=_p.stochastic, check=_check
    )(_method(_p))
