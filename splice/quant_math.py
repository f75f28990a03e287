"""The tensor math of three quantized checkpoint formats, with no file I/O.

* **FP8 block-scaled** (DeepSeek-V3/R1/V3.1, Qwen3-FP8, transformers' ``FineGrainedFP8``):
  :func:`dequantize_fp8_block`, :func:`quantize_fp8_block`.
* **compressed-tensors FP8** (llm-compressor's ``float-quantized`` format):
  :func:`dequantize_fp8_scaled`, :func:`quantize_fp8_scaled`.
* **MXFP4** (gpt-oss experts): :func:`dequantize_mxfp4`, :func:`quantize_mxfp4`.
* :func:`relative_error` for the writer's report.

Every function walks its tensor in tiles (along leading dims, then rows, then columns), so the
tile-sized temporaries (float32 unless said otherwise) stay under ``budget`` bytes however large
the tensor is; the result is allocated once, in its final dtype. Tiles never need to hold a whole
quantization block: a block larger than the budget is reduced across tiles. Stored scale grids
are read tile by tile too; the quantizers also hold a float32 per-block amax grid (one value per
block, like the scales they return). Inputs with leading dims are reshaped to ``[N, R, C]``,
which copies only a non-contiguous one. Any device works: every step is a torch op.

Each function is elementwise-identical to its reference (named in its docstring) on the same
device: tiling changes which elements are computed together, never the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from splice.errors import SpliceError

#: the largest float8_e4m3fn value
FP8_MAX = 448.0
#: default bytes of tile-sized temporaries a call may hold at once
DEFAULT_BUDGET = 64 << 20
#: values in one MXFP4 group (one shared e8m0 exponent)
MX_GROUP = 32

_FP8 = torch.float8_e4m3fn
_E8M0: torch.dtype | None = getattr(torch, "float8_e8m0fnu", None)

# e2m1 code -> value (bit 3 sign, bits 2-1 exponent, bit 0 mantissa)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_VALUES = _E2M1 + tuple(-v for v in _E2M1)


# --------------------------------------------------------------------------------------------
# tiling


def _spans(length: int, block: int, step: int) -> Iterator[tuple[int, int]]:
    """``[a, b)`` spans covering ``range(length)``: ``step`` rounded down to whole ``block``\\ s
    when it holds one, else pieces of at most ``step`` that never cross a block boundary."""
    if step >= block:
        step -= step % block
        for a in range(0, length, step):
            yield a, min(a + step, length)
        return
    for b0 in range(0, length, block):
        end = min(b0 + block, length)
        for a in range(b0, end, step):
            yield a, min(a + step, end)


def _tiles(
    shape: tuple[int, int, int], block: tuple[int, int], elems: int
) -> Iterator[tuple[slice, slice, slice]]:
    """Tiles ``(n, rows, cols)`` of a ``[N, R, C]`` tensor of at most ``max(elems, 1)`` elements
    each, aligned to ``block`` wherever a tile spans more than one block."""
    n, r, c = shape
    elems = max(1, elems)
    if r * c <= elems:
        k = max(1, elems // max(1, r * c))
        for a in range(0, n, k):
            yield slice(a, min(a + k, n)), slice(0, r), slice(0, c)
        return
    if c <= elems:
        rows = list(_spans(r, block[0], elems // c))
        cols = [(0, c)]
    else:
        rows = list(_spans(r, block[0], 1))
        cols = list(_spans(c, block[1], elems))
    for i in range(n):
        for r0, r1 in rows:
            for c0, c1 in cols:
                yield slice(i, i + 1), slice(r0, r1), slice(c0, c1)


def _runs(start: int, stop: int, block: int) -> list[tuple[int, int, int, int]]:
    """``[start, stop)`` cut at multiples of ``block`` into runs of equal pieces:
    ``(offset from start, pieces, piece length, index of the first block)``."""
    runs = []
    pos = start
    if start % block:
        end = min(stop, (start // block + 1) * block)
        runs.append((0, 1, end - start, start // block))
        pos = end
    full = (stop - pos) // block
    if full:
        runs.append((pos - start, full, block, pos // block))
        pos += full * block
    if pos < stop:
        runs.append((pos - start, 1, stop - pos, pos // block))
    return runs


def _regions(
    x: torch.Tensor, r0: int, c0: int, block: tuple[int, int]
) -> Iterator[tuple[torch.Tensor, slice, slice]]:
    """Views of a tile ``x`` ``[n, tr, tc]`` (its corner at row ``r0``, column ``c0``) as
    ``[n, rn, rl, cn, cl]`` (``rn`` x ``cn`` pieces of ``rl`` x ``cl`` elements, each piece
    inside one block), with the block-row and block-column slices of the scale grid they use.

    At most 3 x 3 regions: a partial head, whole blocks, a partial tail (edge blocks)."""
    br, bc = block
    tr, tc = x.shape[-2:]
    for ra, rn, rl, rb in _runs(r0, r0 + tr, br):
        for ca, cn, cl, cb in _runs(c0, c0 + tc, bc):
            v = x[:, ra : ra + rn * rl, ca : ca + cn * cl]
            v = v.unflatten(2, (cn, cl)).unflatten(1, (rn, rl))
            yield v, slice(rb, rb + rn), slice(cb, cb + cn)


def _grid_rows(grid: torch.Tensor, ns: slice) -> torch.Tensor:
    """The part of a ``[Ns, ...]`` scale grid for the tile's leading slice (``Ns == 1``: all)."""
    return grid if grid.shape[0] == 1 else grid[ns]


def _as3d(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` ``[..., R, C]`` as ``[N, R, C]`` (a view when ``t`` is contiguous)."""
    if t.ndim < 2:
        raise ValueError(f"{what} needs at least 2 dims, got shape {tuple(t.shape)}")
    return t.reshape(-1, *t.shape[-2:])


def _grid_shape(r: int, c: int, block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(r / block[0]), math.ceil(c / block[1])


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    br, bc = (int(b) for b in block)
    if br <= 0 or bc <= 0:
        raise ValueError(f"block sizes must be positive, got {tuple(block)}")
    return br, bc


# --------------------------------------------------------------------------------------------
# shared pieces


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**k`` for int ``k`` in [-149, 127] (same shape; 128 gives inf)."""
    k = k.to(torch.int32)
    normal = (k + 127).clamp(0, 255) << 23
    subnormal = torch.ones_like(k) << (k + 149).clamp(0, 22)
    return torch.where(k >= -126, normal, subnormal).view(torch.float32)


def _e8m0_to_float(b: torch.Tensor, what: str) -> torch.Tensor:
    """e8m0 exponent bytes (uint8 or float8_e8m0fnu) as float32 ``2**(b-127)`` (byte 0 is
    2**-127); byte 255 (the format's NaN) raises ``SpliceError``."""
    b = b.view(torch.uint8) if b.dtype != torch.uint8 else b
    if bool((b == 255).any()):
        raise SpliceError(f"{what} holds e8m0 byte 255 (NaN): the checkpoint is corrupt")
    return _pow2(b.to(torch.int32) - 127)


def _scale_kind(s: torch.Tensor, what: str) -> None:
    """Refuse a scale tensor that is neither float, float8_e8m0fnu nor uint8 e8m0 bytes."""
    if not (s.is_floating_point() or s.dtype == torch.uint8):
        raise ValueError(f"{what} must be a float or e8m0 tensor, got {s.dtype}")


def _float_scale(s: torch.Tensor, what: str) -> torch.Tensor:
    """A scale tensor (float, float8_e8m0fnu or uint8 e8m0 bytes) as float32, checked finite."""
    if s.dtype == torch.uint8 or (_E8M0 is not None and s.dtype == _E8M0):
        return _e8m0_to_float(s, what)
    _scale_kind(s, what)
    out = s.to(torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise SpliceError(f"{what} holds NaN or inf scales: the checkpoint is corrupt")
    return out


def _block_amax(
    w3: torch.Tensor, block: tuple[int, int], grid: tuple[int, int, int], budget: int
) -> torch.Tensor:
    """Per-block max |w| as ``grid`` ``[Ns, nbr, nbc]`` (``Ns == 1``: shared by every leading
    index), float32 (float64 for a float64 ``w``: exact either way). NaN propagates; no
    tile-sized temporary is made."""
    acc = torch.float64 if w3.dtype == torch.float64 else torch.float32
    amax = torch.zeros(grid, dtype=acc, device=w3.device)
    for ns, rs, cs in _tiles(tuple(w3.shape), block, budget // 4):
        x = w3[ns, rs, cs]
        at = _grid_rows(amax, ns)
        for v, rsl, csl in _regions(x, rs.start, cs.start, block):
            m = torch.maximum(v.amax(dim=(2, 4)), v.amin(dim=(2, 4)).neg()).to(acc)
            if at.shape[0] == 1 and m.shape[0] > 1:
                m = m.amax(dim=0, keepdim=True)
            sub = at[:, rsl, csl]
            sub.copy_(torch.maximum(sub, m))
    return amax


def _check_amax(amax: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(amax)).sum())
        raise SpliceError(
            f"{what} holds NaN or inf ({bad} of its {amax.numel()} blocks): "
            "a quantization scale cannot be computed"
        )


def _apply_scale(
    src: torch.Tensor,
    grid: torch.Tensor,
    block: tuple[int, int],
    out: torch.Tensor,
    *,
    op: Literal["mul", "div"],
    work_dtype: torch.dtype,
    clamp: float | None,
    budget: int,
    bytes_per_elem: int,
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """``out = clamp(src (op) grid-broadcast)``, tile by tile, computed in ``work_dtype`` and
    cast to ``out.dtype`` by ``copy_`` (the cast ``.to`` does). ``src``/``out`` ``[N, R, C]``.
    One tile buffer is allocated and reused; ``convert`` turns the tile's part of the grid into
    numbers (so a stored scale grid is never converted whole)."""
    elems = max(1, budget // bytes_per_elem)
    buf = torch.empty(min(elems, src.numel()), dtype=work_dtype, device=src.device)
    br, bc = block
    for ns, rs, cs in _tiles(tuple(src.shape), block, elems):
        tile = src[ns, rs, cs]
        x = buf[: tile.numel()].view(tile.shape)
        x.copy_(tile)
        rb0, cb0 = rs.start // br, cs.start // bc
        g = _grid_rows(grid, ns)[:, rb0 : -(-rs.stop // br), cb0 : -(-cs.stop // bc)]
        g = g if convert is None else convert(g)
        for v, rsl, csl in _regions(x, rs.start, cs.start, block):
            s = g[:, rsl.start - rb0 : rsl.stop - rb0, csl.start - cb0 : csl.stop - cb0]
            s = s[:, :, None, :, None]
            if op == "mul":
                v.mul_(s)
            else:
                v.div_(s)
        if clamp is not None:
            x.clamp_(-clamp, clamp)
        out[ns, rs, cs].copy_(x)


def _check_fp8(q: torch.Tensor) -> None:
    if q.dtype != _FP8:
        raise ValueError(f"expected a float8_e4m3fn tensor, got {q.dtype}")


def _check_float(w: torch.Tensor) -> None:
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"expected a float32/bfloat16/float16/float64 tensor, got {w.dtype}")


# --------------------------------------------------------------------------------------------
# FP8 block-scaled (FineGrainedFP8 / DeepSeek)


def dequantize_fp8_block(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
    *,
    budget: int = DEFAULT_BUDGET,
) -> torch.Tensor:
    """FP8 block-scaled weight ``q`` ``[..., R, C]`` (float8_e4m3fn) times its per-block
    ``scale_inv`` ``[..., ceil(R/br), ceil(C/bc)]`` -> ``[..., R, C]`` in ``dtype``.

    ``scale_inv`` is float32 (V3/R1 style; any float dtype is taken), float8_e8m0fnu, or uint8
    e8m0 exponent bytes (``2**(b-127)``, byte 0 = 2**-127). Each element is
    ``(q.float() * s).to(dtype)``: bit-identical to transformers' ``Fp8Dequantize._dequantize_one``
    where R and C divide by the block; where they do not, the last block row/column is partial
    (as in DeepSeek's own ``weight_dequant``; transformers refuses such shapes).

    ``block`` is the config's ``weight_block_size``; it is not inferred from the grid (that
    guess is wrong for partial edges). A per-tensor scalar scale is :func:`dequantize_fp8_scaled`.
    NaN in ``q`` (bytes 0x7F/0xFF) propagates, as in the references; a NaN/inf scale or e8m0
    byte 255 raises ``SpliceError``. Temporaries: 4 bytes per element of a tile.
    """
    _check_fp8(q)
    br, bc = _check_block(block)
    q3 = _as3d(q, "an FP8 weight")
    r, c = q3.shape[-2:]
    want = (*q.shape[:-2], *_grid_shape(r, c, (br, bc)))
    if tuple(scale_inv.shape) != want:
        raise SpliceError(
            f"FP8 scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(q.shape)} weight in "
            f"{br}x{bc} blocks needs {want}"
        )
    _scale_kind(scale_inv, "FP8 scale_inv")
    grid = scale_inv.reshape(q3.shape[0], *want[-2:])
    out = torch.empty(q3.shape, dtype=dtype, device=q.device)
    _apply_scale(
        q3, grid, (br, bc), out, op="mul", work_dtype=torch.float32, clamp=None,
        budget=budget, bytes_per_elem=4, convert=lambda p: _float_scale(p, "FP8 scale_inv"),
    )  # fmt: skip
    return out.reshape(q.shape)


def quantize_fp8_block(
    w: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    scale_fmt: Literal["float", "ue8m0"] = "float",
    *,
    scale_dtype: torch.dtype | None = None,
    budget: int = DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[..., R, C]`` -> ``(q, scale_inv)``: ``q`` ``[..., R, C]`` float8_e4m3fn and
    ``scale_inv`` ``[..., ceil(R/br), ceil(C/bc)]``.

    Matches transformers' ``Fp8Quantize._quantize_one`` bit for bit where R and C divide by the
    block: per block ``amax = max|w|`` in float32, ``scale = 448/amax`` (1 where amax is 0),
    ``scale_inv = 1/scale``, ``q = clamp(w*scale, -448, 448)`` cast to e4m3 (round to nearest
    even). Partial edge blocks take the amax of the elements they hold.

    ``scale_fmt="ue8m0"``: ``scale_inv`` is rounded up to a power of two with transformers' own
    ops (``2**ceil(log2(inv))``; float32 ``log2`` can round an ``inv`` a hair above a power of
    two down onto it, and then the block's largest element clips at 448 as in transformers), and
    the forward scale is its exact reciprocal. It is stored as ``scale_dtype``: by default
    float8_e8m0fnu (what transformers stores; uint8 exponent bytes on a torch without that
    dtype); ``torch.uint8`` for raw bytes (MXFP8-style files); ``torch.float32`` for power-of-two
    floats. ``scale_fmt="float"`` stores float32 (or ``scale_dtype``, cast).

    NaN/inf in ``w`` raises ``SpliceError``. Temporaries: 4 bytes per element of a tile.
    """
    _check_float(w)
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"scale_fmt must be 'float' or 'ue8m0', got {scale_fmt!r}")
    br, bc = _check_block(block)
    w3 = _as3d(w, "a weight to quantize")
    r, c = w3.shape[-2:]
    grid = (w3.shape[0], *_grid_shape(r, c, (br, bc)))
    amax = _block_amax(w3, (br, bc), grid, budget).to(torch.float32)
    _check_amax(amax, "the weight to quantize")
    ones = torch.ones_like(amax)
    scale = FP8_MAX / torch.where(amax > 0, amax, ones)
    scale = torch.where(amax > 0, scale, ones)
    inv = (1.0 / scale).to(torch.float32)
    if scale_fmt == "ue8m0":
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        inv = inv.to(torch.float32)
        scale = 1.0 / inv
    q = torch.empty(w3.shape, dtype=_FP8, device=w.device)
    _apply_scale(
        w3, scale, (br, bc), q, op="mul", work_dtype=torch.float32, clamp=FP8_MAX,
        budget=budget, bytes_per_elem=4,
    )  # fmt: skip
    inv = inv.reshape(*w.shape[:-2], *grid[1:])
    if scale_fmt == "ue8m0":
        target = scale_dtype or _E8M0 or torch.uint8
        if target == torch.uint8:
            inv = (inv.view(torch.int32) >> 23).to(torch.uint8)
        else:
            inv = inv.to(target)
    elif scale_dtype is not None:
        inv = inv.to(scale_dtype)
    return q.reshape(w.shape), inv


# --------------------------------------------------------------------------------------------
# compressed-tensors FP8 (llm-compressor float-quantized)

Strategy = Literal["tensor", "channel", "group", "block"]


def _ct_layout(
    shape: tuple[int, ...],
    strategy: str,
    group_size: int | None,
    block: tuple[int, int] | None,
) -> tuple[tuple[int, int], tuple[int, ...], bool]:
    """(block, scale shape, shared) of a compressed-tensors strategy for a ``[..., R, C]``
    tensor; ``shared``: one scale for every leading index (per-tensor)."""
    r, c = shape[-2:]
    lead = tuple(shape[:-2])
    if strategy == "tensor":
        return (max(1, r), max(1, c)), (1,), True
    if strategy == "channel":
        return (1, max(1, c)), (*lead, r, 1), False
    if strategy == "group":
        if not group_size or group_size <= 0:
            raise ValueError("strategy 'group' needs a positive group_size")
        if c % group_size:
            raise ValueError(f"{c} columns do not divide into groups of {group_size}")
        return (1, group_size), (*lead, r, c // group_size), False
    if strategy == "block":
        if block is None:
            raise ValueError("strategy 'block' needs block=(rows, cols)")
        b = _check_block(block)
        return b, (*lead, *_grid_shape(r, c, b)), False
    raise ValueError(f"strategy must be tensor, channel, group or block; got {strategy!r}")


def dequantize_fp8_scaled(
    q: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    strategy: Strategy | None = None,
    group_size: int | None = None,
    block: tuple[int, int] | None = None,
    budget: int = DEFAULT_BUDGET,
) -> torch.Tensor:
    """compressed-tensors FP8 weight ``q`` ``[..., R, C]`` (float8_e4m3fn) times ``weight_scale``
    -> ``[..., R, C]`` in ``dtype``.

    ``strategy`` (the config's ``weights.strategy``; with ``group_size`` or ``block`` =
    ``block_structure`` where it needs one) is checked against ``scale``'s shape: ``[1]``/``[]``
    tensor, ``[..., R, 1]`` channel, ``[..., R, C/group_size]`` group, ``[..., ceil(R/br),
    ceil(C/bc)]`` block (partial edge blocks as in its zero-padded reference). Left out, it is
    inferred from the shape as older compressed-tensors' ``dequantize`` did (``block`` given:
    block; one element: tensor; ``[..., R, 1]``: channel; ``[..., R, G]``: groups of ``C/G``).

    Each element is ``(q.float() * s.float()).to(dtype)``: bit-identical to compressed-tensors'
    ``dequantize`` (``q.to(scale.dtype) * scale``) when ``dtype == scale.dtype`` (the product of
    an e4m3 value and a bf16/fp16 scale is exact in float32, so both round once), and to
    transformers' FP8-expert path in every case; for a dtype wider than the scale's it keeps the
    exact product where compressed-tensors rounds to the scale's dtype first. NaN in ``q``
    propagates; a NaN/inf scale raises ``SpliceError``. Temporaries: 4 bytes per tile element.
    """
    _check_fp8(q)
    q3 = _as3d(q, "an FP8 weight")
    r, c = q3.shape[-2:]
    lead = tuple(q.shape[:-2])
    sshape = tuple(scale.shape)
    rows_match = scale.ndim >= 2 and sshape[:-1] == (*lead, r)
    if strategy is None:
        if block is not None:
            strategy = "block"
        elif scale.numel() == 1 and scale.ndim <= 1:
            strategy = "tensor"
        elif rows_match:
            strategy = "channel" if sshape[-1] == 1 and group_size in (None, c) else "group"
        else:
            raise SpliceError(
                f"FP8 weight_scale has shape {sshape}, which fits no per-tensor, per-channel "
                f"or per-group layout of a {tuple(q.shape)} weight (pass block= for block scales)"
            )
    if strategy == "group" and group_size is None and rows_match:
        g = sshape[-1]
        if g == 0 or c % g:
            raise SpliceError(f"FP8 weight_scale {sshape} does not split {c} columns into groups")
        group_size = c // g
    blk, want, shared = _ct_layout(tuple(q.shape), strategy, group_size, block)
    if shared and scale.numel() != 1:
        raise SpliceError(f"FP8 weight_scale has shape {sshape}; per-tensor needs one value")
    if not shared and sshape != want:
        raise SpliceError(
            f"FP8 weight_scale has shape {sshape}; a {tuple(q.shape)} weight with {strategy} "
            f"scales needs {want}"
        )
    _scale_kind(scale, "FP8 weight_scale")
    grid = scale.reshape(1, 1, 1) if shared else scale.reshape(q3.shape[0], *want[-2:])
    out = torch.empty(q3.shape, dtype=dtype, device=q.device)
    _apply_scale(
        q3, grid, blk, out, op="mul", work_dtype=torch.float32, clamp=None,
        budget=budget, bytes_per_elem=4, convert=lambda p: _float_scale(p, "FP8 weight_scale"),
    )  # fmt: skip
    return out.reshape(q.shape)


def quantize_fp8_scaled(
    w: torch.Tensor,
    strategy: Strategy = "channel",
    group_size: int | None = None,
    *,
    block: tuple[int, int] | None = None,
    budget: int = DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[..., R, C]`` -> ``(q, weight_scale)`` as llm-compressor writes the
    ``float-quantized`` format with its default (memoryless min-max, symmetric) observer.

    Matched to compressed-tensors' ``calculate_qparams`` and ``quantize`` (2025-11 onwards) and
    llm-compressor's observers, all computed in ``w``'s dtype as they do: ``amax = max(|min|,
    |max|)`` per tensor/channel/group/block; ``scale = amax / 448.0`` in ``w.dtype``, a zero
    scale replaced by ``finfo(w.dtype).eps``; ``q = clamp(w / scale, -448, 448)`` (division in
    ``w.dtype``) cast to float8_e4m3fn (round to nearest even). Older compressed-tensors (before
    2025-11) clamped every scale to at least float32 eps instead: that differs only for blocks
    whose amax is below ~5.3e-5.

    ``weight_scale`` has ``w``'s dtype and shape ``[1]`` (tensor), ``[..., R, 1]`` (channel),
    ``[..., R, C/group_size]`` (group; C must divide) or ``[..., ceil(R/br), ceil(C/bc)]``
    (block, partial edge blocks as its zero padding gives). NaN/inf in ``w`` raises
    ``SpliceError``. Temporaries: 4 bytes per element of a tile.
    """
    _check_float(w)
    blk, want, shared = _ct_layout(tuple(w.shape), strategy, group_size, block)
    w3 = _as3d(w, "a weight to quantize")
    r, c = w3.shape[-2:]
    grid = (1, 1, 1) if shared else (w3.shape[0], *_grid_shape(r, c, blk))
    amax = _block_amax(w3, blk, grid, budget)
    _check_amax(amax, "the weight to quantize")
    scale = amax.to(w.dtype) / FP8_MAX
    eps = torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype, device=w.device)
    scale = torch.where(scale == 0, eps, scale)
    q = torch.empty(w3.shape, dtype=_FP8, device=w.device)
    _apply_scale(
        w3, scale, blk, q, op="div", work_dtype=w.dtype, clamp=FP8_MAX,
        budget=budget, bytes_per_elem=4,
    )  # fmt: skip
    return q.reshape(w.shape), scale.reshape(want)


# --------------------------------------------------------------------------------------------
# MXFP4 (gpt-oss)


def _e2m1_pair_table(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` float32: a byte's low-nibble value then its high-nibble value."""
    v = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=device)
    b = torch.arange(256, device=device)
    return torch.stack([v[b & 15], v[b >> 4]], dim=-1)


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    budget: int = DEFAULT_BUDGET,
) -> torch.Tensor:
    """MXFP4 ``blocks`` uint8 ``[..., R, G, 16]`` and ``scales`` uint8 ``[..., R, G]`` ->
    ``[..., R, G*32]`` in ``dtype``.

    Each byte holds two e2m1 values, low nibble first; group ``g`` of row ``r`` is columns
    ``32g .. 32g+31`` and is scaled by ``2**(scales[r, g] - 127)``. Bit-identical to transformers'
    ``convert_moe_packed_tensors`` *before its transpose*: for gpt-oss's ``*_blocks`` ``[E, N,
    G, 16]`` this returns ``[E, N, K]`` and the caller transposes to the model's ``[E, K, N]``
    (``.transpose(1, 2)``). Values are computed as float32 ``e2m1 * 2**e`` (exact unless it
    overflows float32) and rounded once to ``dtype``, which is what transformers' ``ldexp`` does.
    Scale byte 255 (e8m0 NaN; transformers would give inf/NaN) raises ``SpliceError``.
    Temporaries: about 8 bytes per output element of a tile.
    """
    if blocks.dtype == torch.int8:
        blocks = blocks.view(torch.uint8)
    if blocks.dtype != torch.uint8 or scales.dtype not in (torch.uint8, _E8M0):
        raise ValueError(f"MXFP4 wants uint8 blocks and scales, got {blocks.dtype}/{scales.dtype}")
    if blocks.ndim < 3 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise SpliceError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            "want blocks [..., R, G, 16] with scales [..., R, G]"
        )
    g = scales.shape[-1]
    m = scales.numel() // max(1, g)
    b2 = blocks.reshape(m, g * 16)
    s2 = scales.reshape(m, g)
    out = torch.empty((m, g * MX_GROUP), dtype=dtype, device=blocks.device)
    table = _e2m1_pair_table(blocks.device)
    for _, rs, cs in _tiles((1, m, g * MX_GROUP), (1, MX_GROUP), max(MX_GROUP, budget // 8)):
        g0, g1 = cs.start // MX_GROUP, cs.stop // MX_GROUP
        byt = b2[rs, g0 * 16 : g1 * 16].reshape(-1).to(torch.int32)
        x = table.index_select(0, byt).view(rs.stop - rs.start, g1 - g0, MX_GROUP)
        x.mul_(_e8m0_to_float(s2[rs, g0:g1], "MXFP4 scales").unsqueeze(-1))
        out[rs, cs].copy_(x.view(rs.stop - rs.start, -1))
        del byt, x  # before the next tile's are made
    return out.reshape(*scales.shape[:-1], g * MX_GROUP)


def _mx_exponents(amax: torch.Tensor, method: str) -> torch.Tensor:
    """int32 shared exponent ``k`` (scale ``2**k``, byte ``k + 127``) of MXFP4 groups."""
    if method == "ocp":
        _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2 amax) = e - 1
        k = torch.where(amax > 0, e - 3, torch.full_like(e, -127))
    else:
        ds = amax / 6.0
        m, e = torch.frexp(ds)  # ceil(log2 ds) = e - 1 for m == 0.5, else e
        k = torch.where(m == 0.5, e - 1, e).clamp(min=-126)
        k = torch.where(ds > 0, k, torch.full_like(k, -127))
    return k.clamp(-127, 127)


# |y| at or past each threshold moves one e2m1 code up (0, .5, 1, 1.5, 2, 3, 4, 6): midpoints,
# ties away from zero
_TIES_AWAY = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _ties_even() -> tuple[float, ...]:
    """Midpoints for round-to-nearest-even: a tie goes down onto an even code (0, 1, 2, 4),
    so those thresholds move one float32 ulp up."""
    up = (0.25, 1.25, 2.5, 5.0)
    out = []
    for t in _TIES_AWAY:
        x = torch.tensor(t, dtype=torch.float32)
        out.append(float(torch.nextafter(x, torch.tensor(math.inf))) if t in up else t)
    return tuple(out)


_TIES_EVEN = _ties_even()


def quantize_mxfp4(
    w: torch.Tensor,
    *,
    method: Literal["ocp", "transformers"] = "ocp",
    budget: int = DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[..., R, C]`` (C a multiple of 32) -> ``(blocks, scales)``: uint8 ``[..., R,
    C/32, 16]`` (low nibble first) and uint8 e8m0 exponents ``[..., R, C/32]``; the inverse of
    :func:`dequantize_mxfp4` (same axis convention: groups run along the last dim, so gpt-oss's
    ``[E, K, N]`` expert weights are transposed to ``[E, N, K]`` first).

    ``method="ocp"`` (default) is the OCP Microscaling spec v1.0 conversion: shared exponent
    ``floor(log2(amax)) - 2`` (2 = e2m1's emax), elements ``w / 2**k`` rounded to nearest,
    ties to even, saturating at +-6. An all-zero group gets byte 0; exponents clamp to
    [-127, 127].

    ``method="transformers"`` is bit-identical to what transformers quantizes gpt-oss experts
    with (``quantize_to_mxfp4`` -> triton_kernels' ``downcast_to_mxfp_torch``, default
    ``ROUND_UP``): scale ``2**ceil(log2(float32(amax / 6)))`` (at least 2**-126; byte 0 for an
    all-zero group) and elements rounded to nearest with ties away from zero, saturating at +-6.
    It never clips the group's largest value; "ocp" clips values past 6x the scale but keeps a
    finer grid for the rest.

    Either way the sign is kept (a negative value that rounds to 0 is code 8, -0), and
    re-quantizing a dequantized MXFP4 tensor gives back its values exactly, and its bytes
    exactly for every group whose largest code is 4 or 6 (always so after "ocp"). NaN/inf in
    ``w`` raises ``SpliceError``. Temporaries: about 16 bytes per element of a tile.
    """
    _check_float(w)
    if method not in ("ocp", "transformers"):
        raise ValueError(f"method must be 'ocp' or 'transformers', got {method!r}")
    if w.ndim < 2 or w.shape[-1] % MX_GROUP:
        raise ValueError(f"MXFP4 needs [..., R, C] with C a multiple of 32, got {tuple(w.shape)}")
    c = w.shape[-1]
    g = c // MX_GROUP
    m = w.numel() // max(1, c)
    w2 = w.reshape(m, c)
    blocks = torch.empty((m, g, 16), dtype=torch.uint8, device=w.device)
    scales = torch.empty((m, g), dtype=torch.uint8, device=w.device)
    edges = torch.tensor(
        _TIES_EVEN if method == "ocp" else _TIES_AWAY, dtype=torch.float32, device=w.device
    )
    for _, rs, cs in _tiles((1, m, c), (1, MX_GROUP), max(MX_GROUP, budget // 16)):
        g0, g1 = cs.start // MX_GROUP, cs.stop // MX_GROUP
        x = torch.empty((rs.stop - rs.start, g1 - g0, MX_GROUP), device=w.device)
        x.view(rs.stop - rs.start, -1).copy_(w2[rs, cs])
        amax = torch.maximum(x.amax(dim=-1), x.amin(dim=-1).neg())
        _check_amax(amax, "the weight to quantize")
        k = _mx_exponents(amax, method)
        x.mul_(_pow2(-k).unsqueeze(-1))
        neg = torch.signbit(x)
        code = torch.bucketize(x.abs_(), edges, right=True, out_int32=True).to(torch.uint8)
        code |= neg.to(torch.uint8) << 3
        blocks[rs, g0:g1] = code[..., 0::2] | (code[..., 1::2] << 4)
        scales[rs, g0:g1] = (k + 127).to(torch.uint8)
        del x, neg, code  # before the next tile's are made
    lead = tuple(w.shape[:-1])
    return blocks.reshape(*lead, g, 16), scales.reshape(*lead, g)


# --------------------------------------------------------------------------------------------


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, *, budget: int = DEFAULT_BUDGET) -> float:
    """``||w - w_hat|| / ||w||`` (Frobenius, accumulated in float64) of two same-shape tensors;
    0.0 when both are zero, inf when only ``w`` is. Temporaries: 16 bytes per tile element."""
    if tuple(w.shape) != tuple(w_hat.shape):
        raise ValueError(f"shapes differ: {tuple(w.shape)} vs {tuple(w_hat.shape)}")
    a = w.reshape(1, 1, -1) if w.ndim < 2 else _as3d(w, "w")
    b = w_hat.reshape(1, 1, -1) if w_hat.ndim < 2 else _as3d(w_hat, "w_hat")
    num = 0.0
    den = 0.0
    for t in _tiles(tuple(a.shape), (1, 1), budget // 16):
        x = a[t].to(torch.float64)
        d = b[t].to(torch.float64, copy=True).sub_(x)
        num += float(torch.linalg.vector_norm(d)) ** 2
        den += float(torch.linalg.vector_norm(x)) ** 2
        del x, d  # before the next tile's are made
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
