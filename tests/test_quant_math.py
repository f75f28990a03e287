"""splice.quant_math against the formats' reference code.

transformers' own ops (FineGrainedFP8 quantize/dequantize, gpt-oss MXFP4 dequantization) are
called directly; compressed-tensors is used when it is installed and a slow block-by-block
reference of its documented formula always; partial edge blocks (which transformers refuses)
and MXFP4 quantization (whose reference needs triton) are checked against slow loops written
here.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from splice import quant_math as qm
from splice.errors import SpliceError

FP8 = torch.float8_e4m3fn
E8M0 = getattr(torch, "float8_e8m0fnu", None)
TINY = 1  # budget (bytes) that makes every tile a single element or a sliver of a block

try:  # compressed-tensors is optional: without it its formula is checked by the slow reference
    from compressed_tensors.quantization import QuantizationArgs as CtArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams as ct_qparams
except ImportError:  # pragma: no cover - depends on the environment
    CtArgs = None


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaN == NaN and -0 != 0)."""
    return t.contiguous().view(torch.uint8)


def randw(shape, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.03).to(dtype)


def hf_quantizer(scale_fmt: str, block) -> Fp8Quantize:
    """transformers' Fp8Quantize with a stand-in for the quantizer object it reads."""
    cfg = types.SimpleNamespace(weight_block_size=tuple(block), scale_fmt=scale_fmt)
    return Fp8Quantize(types.SimpleNamespace(quantization_config=cfg))


def blocks_of(shape, block):
    """(row slice, col slice, block row, block col) of every block, partial edges included."""
    r, c = shape
    for i, r0 in enumerate(range(0, r, block[0])):
        for j, c0 in enumerate(range(0, c, block[1])):
            yield slice(r0, r0 + block[0]), slice(c0, c0 + block[1]), i, j


# ---------------------------------------------------------------------------------------------
# tiling


@pytest.mark.parametrize(
    ("shape", "block", "elems"),
    [
        ((3, 10, 7), (4, 3), 1),
        ((3, 10, 7), (4, 3), 5),
        ((3, 10, 7), (4, 3), 20),
        ((3, 10, 7), (4, 3), 1000),
        ((1, 9, 64), (1, 32), 32),
        ((2, 130, 129), (128, 128), 4096),
    ],
)
def test_tiles_cover_every_element_once_within_the_limit(shape, block, elems):
    seen = torch.zeros(shape, dtype=torch.int32)
    for ns, rs, cs in qm._tiles(shape, block, elems):
        tile = seen[ns, rs, cs]
        assert 0 < tile.numel() <= elems
        for (a, b), size in (((rs.start, rs.stop), block[0]), ((cs.start, cs.stop), block[1])):
            inside_one_block = a // size == (b - 1) // size
            assert inside_one_block or a % size == 0
        tile += 1
    assert bool((seen == 1).all())


# ---------------------------------------------------------------------------------------------
# FP8 block-scaled against transformers


@pytest.mark.parametrize("shape", [(256, 384), (3, 128, 256), (2, 2, 64, 128)])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_fp8_block_quantize_matches_transformers(shape, scale_fmt, wdtype):
    block = (64, 128) if shape[-2] == 64 else (128, 128)
    w = randw(shape, wdtype)
    w.reshape(-1, *shape[-2:])[0, :64, :128] = 0  # an all-zero block: scale 1
    ref = hf_quantizer(scale_fmt, block)._quantize_one("m.weight", w)
    q, inv = qm.quantize_fp8_block(w, block, scale_fmt)
    assert q.dtype == FP8 and torch.equal(bits(q), bits(ref["m.weight"]))
    want = ref["m.weight_scale_inv"]
    assert inv.dtype == want.dtype and inv.shape == want.shape
    assert torch.equal(bits(inv), bits(want))


@pytest.mark.parametrize("shape", [(256, 384), (3, 128, 256)])
@pytest.mark.parametrize("scale_kind", ["float32", "e8m0", "uint8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_block_dequantize_matches_transformers(shape, scale_kind, dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(FP8)
    grid = (*shape[:-2], shape[-2] // 128, shape[-1] // 128)
    exps = torch.randint(100, 140, grid, dtype=torch.uint8, generator=g)
    if scale_kind == "float32":
        s = torch.rand(grid, generator=g) * 1e-3
    elif scale_kind == "uint8":
        s = exps
    else:
        if E8M0 is None:
            pytest.skip("torch has no float8_e8m0fnu")
        s = exps.view(E8M0)
    want = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dtype)
    got = qm.dequantize_fp8_block(q, s, (128, 128), dtype)
    assert got.dtype == dtype and torch.equal(bits(got), bits(want))  # NaN bytes give NaN too


# ---------------------------------------------------------------------------------------------
# FP8 block-scaled: partial edge blocks against a slow block loop


def slow_fp8_block_quantize(w2d, block, scale_fmt):
    grid = (math.ceil(w2d.shape[0] / block[0]), math.ceil(w2d.shape[1] / block[1]))
    q = torch.empty(w2d.shape, dtype=FP8)
    inv = torch.empty(grid, dtype=torch.float32)
    for rs, cs, i, j in blocks_of(w2d.shape, block):
        x = w2d[rs, cs].float()
        amax = x.abs().max()
        scale = 448.0 / amax if amax > 0 else torch.tensor(1.0)
        s_inv = 1.0 / scale
        if scale_fmt == "ue8m0":
            s_inv = 2.0 ** torch.ceil(torch.log2(s_inv))
            scale = 1.0 / s_inv
        q[rs, cs] = (x * scale).clamp(-448, 448).to(FP8)
        inv[i, j] = s_inv
    return q, inv


def slow_block_dequantize(q2d, s2d, block, dtype):
    out = torch.empty(q2d.shape, dtype=dtype)
    for rs, cs, i, j in blocks_of(q2d.shape, block):
        out[rs, cs] = (q2d[rs, cs].float() * s2d[i, j].float()).to(dtype)
    return out


@pytest.mark.parametrize(
    ("shape", "block"),
    [((200, 300), (128, 128)), ((2, 130, 129), (128, 128)), ((45, 70), (16, 32))],
)
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("budget", [qm.DEFAULT_BUDGET, 2000])
def test_fp8_block_partial_edges_match_a_block_loop(shape, block, scale_fmt, budget):
    w = randw(shape, seed=2)
    q, inv = qm.quantize_fp8_block(w, block, scale_fmt, scale_dtype=torch.float32, budget=budget)
    assert inv.shape == (
        *shape[:-2],
        math.ceil(shape[-2] / block[0]),
        math.ceil(shape[-1] / block[1]),
    )
    w3, q3, inv3 = (
        w.reshape(-1, *shape[-2:]),
        q.reshape(-1, *shape[-2:]),
        inv.reshape(-1, *inv.shape[-2:]),
    )
    for n in range(w3.shape[0]):
        want_q, want_inv = slow_fp8_block_quantize(w3[n], block, scale_fmt)
        assert torch.equal(bits(q3[n]), bits(want_q))
        assert torch.equal(inv3[n], want_inv)
    got = qm.dequantize_fp8_block(q, inv, block, torch.bfloat16, budget=budget)
    for n in range(w3.shape[0]):
        want = slow_block_dequantize(q3[n], inv3[n], block, torch.bfloat16)
        assert torch.equal(got.reshape(-1, *shape[-2:])[n], want)


def test_fp8_block_results_do_not_depend_on_the_budget():
    w = randw((2, 21, 70), seed=3)
    for fmt in ("float", "ue8m0"):
        q_big, s_big = qm.quantize_fp8_block(w, (16, 32), fmt)
        q_tiny, s_tiny = qm.quantize_fp8_block(w, (16, 32), fmt, budget=TINY * 40)
        assert torch.equal(bits(q_big), bits(q_tiny)) and torch.equal(bits(s_big), bits(s_tiny))
        d_big = qm.dequantize_fp8_block(q_big, s_big, (16, 32))
        assert torch.equal(d_big, qm.dequantize_fp8_block(q_big, s_big, (16, 32), budget=TINY * 40))


def test_non_contiguous_inputs_give_the_same_results():
    w = randw((96, 160), torch.float32, seed=19)
    wt = w.t().contiguous().t()  # same values, column-major
    assert not wt.is_contiguous()
    for fn in (
        lambda x: qm.quantize_fp8_block(x, (32, 64)),
        lambda x: qm.quantize_fp8_scaled(x, "channel"),
        lambda x: qm.quantize_mxfp4(x),
    ):
        for a, b in zip(fn(w), fn(wt), strict=True):
            assert torch.equal(bits(a), bits(b))
    q, s = qm.quantize_fp8_block(w, (32, 64))
    qt = q.t().contiguous().t()
    assert torch.equal(
        qm.dequantize_fp8_block(qt, s, (32, 64)), qm.dequantize_fp8_block(q, s, (32, 64))
    )
    assert qm.relative_error(wt, w) == 0.0


def test_ue8m0_scales_can_be_stored_as_e8m0_bytes_or_floats():
    w = randw((130, 260), seed=4)
    q, as_u8 = qm.quantize_fp8_block(w, scale_fmt="ue8m0", scale_dtype=torch.uint8)
    _, as_f32 = qm.quantize_fp8_block(w, scale_fmt="ue8m0", scale_dtype=torch.float32)
    assert as_u8.dtype == torch.uint8 and as_f32.dtype == torch.float32
    assert torch.equal(as_f32, torch.exp2(as_u8.float() - 127))
    _, default = qm.quantize_fp8_block(w, scale_fmt="ue8m0")
    if E8M0 is not None:
        assert default.dtype == E8M0 and torch.equal(bits(default), as_u8)
    forms = [as_u8, as_f32] + ([as_u8.view(E8M0)] if E8M0 is not None else [])
    outs = [qm.dequantize_fp8_block(q, s) for s in forms]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# ---------------------------------------------------------------------------------------------
# FP8 block-scaled round trips


def fp8_with_block_max(shape, block, lo, seed):
    """Random e4m3 bytes, NaN-free, with each block's largest |q| drawn from [lo, 448]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    q[(q & 0x7F) == 0x7F] = 0x38  # NaN -> 1.0
    q = q.view(FP8).float().clamp(-lo / 2, lo / 2)
    for rs, cs, _, _ in blocks_of(shape, block):
        top = lo + (448 - lo) * torch.rand((), generator=g)
        q[rs, cs][0, 0] = top if torch.rand((), generator=g) < 0.5 else -top
    return q.to(FP8)


@pytest.mark.parametrize("shape", [(256, 256), (200, 330)])
def test_ue8m0_round_trip_gives_back_the_bytes(shape):
    """Power-of-two scales: dequantized values are exact in bf16, so re-quantizing returns q and
    its scale byte for byte whenever the block's largest |q| is above 224 (else the block comes
    back with the exponent one lower and q doubled: the same values, other bytes)."""
    block = (128, 128)
    q = fp8_with_block_max(shape, block, 240.0, seed=5)
    grid = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    exps = torch.randint(
        105, 125, grid, dtype=torch.uint8, generator=torch.Generator().manual_seed(6)
    )
    w = qm.dequantize_fp8_block(q, exps, block, torch.bfloat16)
    q2, exps2 = qm.quantize_fp8_block(w, block, "ue8m0", scale_dtype=torch.uint8)
    assert torch.equal(bits(q2), bits(q)) and torch.equal(exps2, exps)

    low = fp8_with_block_max(shape, block, 1.0, seed=7).float().clamp(-200, 200).to(FP8)
    w = qm.dequantize_fp8_block(low, exps, block, torch.bfloat16)
    q3, exps3 = qm.quantize_fp8_block(w, block, "ue8m0", scale_dtype=torch.uint8)
    assert torch.equal(qm.dequantize_fp8_block(q3, exps3, block, torch.bfloat16), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float_scale_round_trip_gives_back_q_and_scales_within_one_rounding(dtype):
    """Float scales cannot come back byte-exact from a bf16 copy: each dequantized value is
    q * scale_inv rounded to bf16's 8 significant bits, so the block's largest value comes back
    as bf16(448 * scale_inv) and the recomputed scale_inv = that / 448 differs from the original
    by up to half a bf16 ulp (2**-9 relative; a few float32 ulps for a float32 copy). q itself
    does come back byte-exact: that relative error is far inside e4m3's rounding interval
    (2**-4 relative), and every block's largest |q| is 448 after a float-scale quantization."""
    w0 = randw((3, 200, 330), seed=8)
    q, inv = qm.quantize_fp8_block(w0, (128, 128))
    w = qm.dequantize_fp8_block(q, inv, (128, 128), dtype)
    q2, inv2 = qm.quantize_fp8_block(w, (128, 128))
    assert torch.equal(bits(q2), bits(q))
    tol = 2.0**-9 + 2.0**-20 if dtype == torch.bfloat16 else 2.0**-20
    assert float(((inv2 - inv).abs() / inv).max()) <= tol


# ---------------------------------------------------------------------------------------------
# compressed-tensors FP8


def slow_ct_quantize(w2d, strategy, group_size=None, block=None):
    """compressed-tensors' documented formula, group by group, in w's dtype."""
    r, c = w2d.shape
    if strategy == "tensor":
        parts, grid = [(slice(None), slice(None), 0, 0)], (1, 1)
    else:
        blk = {"channel": (1, c), "group": (1, group_size), "block": block}[strategy]
        parts = list(blocks_of((r, c), blk))
        grid = (math.ceil(r / blk[0]), math.ceil(c / blk[1]))
    scale = torch.empty(grid, dtype=w2d.dtype)
    q = torch.empty(w2d.shape, dtype=FP8)
    for rs, cs, i, j in parts:
        x = w2d[rs, cs]
        s = torch.max(x.min().clamp(max=0).abs(), x.max().clamp(min=0)) / 448.0
        s = torch.where(s == 0, torch.tensor(torch.finfo(w2d.dtype).eps, dtype=w2d.dtype), s)
        scale[i, j] = s
        q[rs, cs] = (x / s).clamp(-448, 448).to(FP8)
    return q, (scale.reshape(1) if strategy == "tensor" else scale)


CT_CASES = [
    ("tensor", None, None, (64, 256)),
    ("channel", None, None, (64, 256)),
    ("group", 64, None, (64, 256)),
    ("block", None, (32, 64), (64, 256)),
    ("block", None, (32, 64), (70, 200)),
]


@pytest.mark.parametrize(("strategy", "group_size", "block", "shape"), CT_CASES)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compressed_tensors_fp8_matches_its_formula(strategy, group_size, block, shape, wdtype):
    w = randw(shape, wdtype, seed=9)
    w[5] = 0  # a zero channel/group: scale eps
    q, s = qm.quantize_fp8_scaled(w, strategy, group_size, block=block)
    want_q, want_s = slow_ct_quantize(w, strategy, group_size, block)
    assert s.dtype == wdtype and s.shape == want_s.shape and torch.equal(s, want_s)
    assert torch.equal(bits(q), bits(want_q))
    d = qm.dequantize_fp8_scaled(q, s, wdtype, group_size=group_size, block=block)
    if strategy == "tensor":
        want_d = (q.to(wdtype) * s).to(wdtype)
    elif strategy == "channel":
        want_d = q.to(wdtype) * s
    else:
        want_d = slow_block_dequantize(q, s, block or (1, group_size), wdtype)
    assert torch.equal(d, want_d)
    # tiny tiles give the same bytes
    q_t, s_t = qm.quantize_fp8_scaled(w, strategy, group_size, block=block, budget=TINY * 300)
    assert torch.equal(bits(q_t), bits(q)) and torch.equal(s_t, s)
    assert torch.equal(qm.dequantize_fp8_scaled(q, s, wdtype, block=block, budget=TINY * 300), d)


@pytest.mark.skipif(CtArgs is None, reason="compressed-tensors is not installed")
@pytest.mark.parametrize(("strategy", "group_size", "block", "shape"), CT_CASES)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_compressed_tensors_fp8_matches_the_package(strategy, group_size, block, shape, wdtype):
    w = randw(shape, wdtype, seed=10)
    w[5] = 0
    kw = {"group_size": group_size} if group_size else {}
    if block:
        kw["block_structure"] = list(block)
    args = CtArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, **kw)
    if strategy == "tensor":
        lo, hi = torch.aminmax(w)
    elif strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif strategy == "group":
        v = w.unflatten(-1, (-1, group_size))
        lo, hi = v.amin(-1), v.amax(-1)
    else:
        pr, pc = -shape[0] % block[0], -shape[1] % block[1]
        v = torch.nn.functional.pad(w, (0, pc, 0, pr))
        v = v.reshape(v.shape[0] // block[0], block[0], v.shape[1] // block[1], block[1])
        lo, hi = v.amin((1, 3)), v.amax((1, 3))
    s_ref, _ = ct_qparams(lo, hi, args)
    q_ref = ct_quantize(w, s_ref, None, args, dtype=FP8)
    q, s = qm.quantize_fp8_scaled(w, strategy, group_size, block=block)
    assert torch.equal(s, s_ref) and torch.equal(bits(q), bits(q_ref))
    d_ref = ct_dequantize(q_ref, s_ref, None, args)
    assert torch.equal(qm.dequantize_fp8_scaled(q, s, wdtype, block=block), d_ref)


def test_compressed_tensors_layouts_with_leading_dims_and_round_trip():
    w = randw((3, 40, 64), torch.bfloat16, seed=11)
    q, s = qm.quantize_fp8_scaled(w, "channel")
    assert s.shape == (3, 40, 1)
    for n in range(3):
        qn, sn = qm.quantize_fp8_scaled(w[n], "channel")
        assert torch.equal(bits(q[n]), bits(qn)) and torch.equal(s[n], sn)
    q, s = qm.quantize_fp8_scaled(w, "tensor")
    assert s.shape == (1,)
    d = qm.dequantize_fp8_scaled(q, s, torch.float32)  # exact products
    q2, s2 = qm.quantize_fp8_scaled(d, "tensor")
    assert torch.equal(bits(q2), bits(q)) and torch.equal(s2.to(torch.bfloat16), s)
    with pytest.raises(SpliceError, match="weight_scale"):
        qm.dequantize_fp8_scaled(q, torch.ones(3, 40, 7), torch.bfloat16)
    with pytest.raises(SpliceError, match="needs"):
        qm.dequantize_fp8_scaled(q, s, torch.bfloat16, strategy="channel")
    explicit = qm.dequantize_fp8_scaled(q, s, torch.float32, strategy="tensor")
    assert torch.equal(explicit, d)
    qg, sg = qm.quantize_fp8_scaled(w, "group", 16)
    for kw in ({}, {"strategy": "group"}, {"strategy": "group", "group_size": 16}):
        got = qm.dequantize_fp8_scaled(qg, sg, torch.bfloat16, **kw)
        assert torch.equal(got, qm.dequantize_fp8_scaled(qg, sg, torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# MXFP4


def test_mxfp4_dequantize_matches_transformers_for_every_byte_and_exponent():
    # row e holds every byte 0..255 with scale byte e (255, the e8m0 NaN, is refused)
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 255, 16, 16)
    scales = torch.arange(255, dtype=torch.uint8).reshape(1, 255, 1).expand(1, 255, 16)
    blocks, scales = blocks.contiguous(), scales.contiguous()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        got = qm.dequantize_mxfp4(blocks, scales, dtype)
        assert got.shape == (1, 255, 512)
        assert torch.equal(bits(got.transpose(1, 2)), bits(want))


@pytest.mark.parametrize("shape", [(4, 6, 3), (2, 5, 90)])
def test_mxfp4_dequantize_random_experts_and_tiny_tiles(shape):
    g = torch.Generator().manual_seed(12)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, shape, dtype=torch.uint8, generator=g)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    for budget in (qm.DEFAULT_BUDGET, TINY):
        got = qm.dequantize_mxfp4(blocks, scales, torch.bfloat16, budget=budget)
        assert torch.equal(got.transpose(1, 2), want)


def slow_mxfp4_quantize(w2d, method):
    """Group by group in Python floats: the OCP spec's conversion or triton_kernels' ROUND_UP."""
    grid = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    rows, cols = w2d.shape
    blocks = torch.empty(rows, cols // 32, 16, dtype=torch.uint8)
    scales = torch.empty(rows, cols // 32, dtype=torch.uint8)
    for r in range(rows):
        for gi in range(cols // 32):
            xs = [float(v) for v in w2d[r, 32 * gi : 32 * gi + 32].float()]
            amax = max(abs(v) for v in xs)
            if amax == 0:
                k = -127
            elif method == "ocp":
                k = max(-127, math.frexp(amax)[1] - 1 - 2)
            else:
                ds = float(torch.tensor(amax, dtype=torch.float32) / 6.0)
                m, e = math.frexp(ds)
                k = max(-126, e - 1 if m == 0.5 else e)
            codes = []
            for v in xs:
                y = abs(v) / 2.0**k
                code = 7  # saturate at 6
                if y < 6:
                    lo = max(i for i in range(8) if grid[i] <= y)
                    down, up = y - grid[lo], grid[lo + 1] - y
                    if down != up:
                        code = lo if down < up else lo + 1
                    elif method == "transformers":  # ties away from zero
                        code = lo + 1
                    else:  # ties to the even code
                        code = lo if lo % 2 == 0 else lo + 1
                codes.append(code | (8 if math.copysign(1.0, v) < 0 else 0))
            for j in range(16):
                blocks[r, gi, j] = codes[2 * j] | (codes[2 * j + 1] << 4)
            scales[r, gi] = k + 127
    return blocks, scales


def mx_test_weight():
    w = randw((6, 96), torch.float32, seed=13)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.25, -2.5, -5.0])
    w[0, :12] = ties * 2.0**-6  # group amax 7 * 2**-6: the OCP scale is 2**-6
    w[0, 12:32] = 0.0
    w[1, :32] = 0.0  # an all-zero group, with a -0
    w[1, 3] = -0.0
    w[2, 32:64] = torch.linspace(-1e-3, 6e-3, 32)  # amax / 6 = 1e-3 exactly rounded
    w[3, 64:96] *= 1e-38  # float32 subnormal scales
    return w


@pytest.mark.parametrize("method", ["ocp", "transformers"])
def test_mxfp4_quantize_matches_a_group_loop(method):
    w = mx_test_weight()
    blocks, scales = qm.quantize_mxfp4(w, method=method)
    want_b, want_s = slow_mxfp4_quantize(w, method)
    assert torch.equal(scales, want_s)
    assert torch.equal(blocks, want_b)
    b_t, s_t = qm.quantize_mxfp4(w.reshape(2, 3, 96), method=method, budget=TINY)
    assert torch.equal(b_t.reshape(blocks.shape), blocks) and torch.equal(
        s_t.reshape(scales.shape), scales
    )


def test_mxfp4_ties_round_as_documented():
    w = torch.zeros(1, 32)
    w[0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])  # amax 6
    back = {}
    for method in ("ocp", "transformers"):
        b, s = qm.quantize_mxfp4(w, method=method)
        assert int(s[0, 0]) == 127  # scale 1 both ways
        back[method] = qm.dequantize_mxfp4(b, s, torch.float32)[0, :8].tolist()
    assert back["ocp"] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    assert back["transformers"] == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0]


@pytest.mark.parametrize("method", ["ocp", "transformers"])
def test_mxfp4_round_trip(method):
    """Re-quantizing dequantized MXFP4 gives the same values always, and the same bytes for
    groups whose largest code is 4 or 6 (every group, after an "ocp" quantization)."""
    g = torch.Generator().manual_seed(14)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 135, (3, 8, 4), dtype=torch.uint8, generator=g)
    w = qm.dequantize_mxfp4(blocks, scales, torch.bfloat16)
    b2, s2 = qm.quantize_mxfp4(w, method=method)
    assert torch.equal(qm.dequantize_mxfp4(b2, s2, torch.bfloat16), w)
    top = torch.maximum(blocks & 7, (blocks >> 4) & 7).amax(-1)  # largest code magnitude per group
    kept = (top >= 6).unsqueeze(-1)  # codes 6 and 7 are the values 4 and 6
    assert torch.equal(torch.where(kept, b2, 0), torch.where(kept, blocks, 0))
    assert torch.equal(torch.where(kept[..., 0], s2, 0), torch.where(kept[..., 0], scales, 0))
    if method == "ocp":
        b1, s1 = qm.quantize_mxfp4(randw((4, 64), torch.float32, seed=15))
        b3, s3 = qm.quantize_mxfp4(qm.dequantize_mxfp4(b1, s1, torch.bfloat16))
        assert torch.equal(b3, b1) and torch.equal(s3, s1)


# ---------------------------------------------------------------------------------------------
# bad input


def test_nan_and_inf_are_refused_when_quantizing():
    for bad in (math.nan, math.inf):
        w = randw((64, 64), torch.float32, seed=16)
        w[3, 7] = bad
        with pytest.raises(SpliceError, match="NaN or inf"):
            qm.quantize_fp8_block(w, (32, 32))
        with pytest.raises(SpliceError, match="NaN or inf"):
            qm.quantize_fp8_scaled(w, "tensor")
        with pytest.raises(SpliceError, match="NaN or inf"):
            qm.quantize_mxfp4(w)


def test_corrupt_scales_are_refused_and_nan_weights_propagate():
    q = torch.zeros(128, 128, dtype=FP8)
    with pytest.raises(SpliceError, match="byte 255"):
        qm.dequantize_fp8_block(q, torch.full((1, 1), 255, dtype=torch.uint8))
    with pytest.raises(SpliceError, match="NaN or inf"):
        qm.dequantize_fp8_block(q, torch.full((1, 1), math.inf))
    with pytest.raises(SpliceError, match="needs"):
        qm.dequantize_fp8_block(q, torch.ones(2, 1))
    with pytest.raises(SpliceError, match="byte 255"):
        qm.dequantize_mxfp4(
            torch.zeros(2, 1, 16, dtype=torch.uint8), torch.full((2, 1), 255, dtype=torch.uint8)
        )
    q.view(torch.uint8)[0, 0] = 0x7F  # e4m3 NaN: documented to propagate, as in transformers
    out = qm.dequantize_fp8_block(q, torch.ones(1, 1))
    assert math.isnan(float(out[0, 0])) and int(torch.isnan(out).sum()) == 1


def test_relative_error():
    w = randw((3, 50, 40), torch.float32, seed=17)
    w_hat = w + 1e-3 * randw((3, 50, 40), torch.float32, seed=18)
    want = float(
        torch.linalg.vector_norm((w - w_hat).double()) / torch.linalg.vector_norm(w.double())
    )
    assert qm.relative_error(w, w_hat) == pytest.approx(want, rel=1e-12)
    assert qm.relative_error(w, w_hat, budget=TINY * 1600) == pytest.approx(want, rel=1e-12)
    assert qm.relative_error(torch.zeros(4), torch.zeros(4)) == 0.0
    assert qm.relative_error(torch.zeros(4), torch.ones(4)) == math.inf
