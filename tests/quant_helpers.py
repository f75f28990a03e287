"""Builders of quantized tiny models for tests/test_quantized.py, and the reference math they
are checked against, written without splice.

A tiny model from :func:`families.build` (float32, transformers' own ``save_pretrained``) is
rewritten as bfloat16 with its linear weights quantized:

* :func:`make_fp8`: FP8 block-scaled (``quant_method: fp8``), quantized by transformers' own
  ``Fp8Quantize`` op (with a stand-in for the quantizer object it reads); a dim the block does
  not divide is zero-padded first and cropped after, which is DeepSeek's partial-edge rule
  (zeros never raise a block's max |w|).
* :func:`make_ct`: compressed-tensors FP8 (llm-compressor's ``float-quantized``), per tensor
  (with a static ``input_scale``) or per channel, by the documented formula.
* :func:`make_mxfp4`: gpt-oss's experts as MXFP4 ``_blocks`` / ``_scales`` (OCP rounding to the
  nearest e2m1 value, by brute force), as transformers' Mxfp4 integration reads them.

The references: :func:`hf_fp8_dequantize` (transformers' ``Fp8Dequantize``, zero-padded for
partial edges), :func:`ct_dequantize` (compressed-tensors' ``q.to(scale.dtype) * scale``) and
transformers' ``convert_moe_packed_tensors`` for MXFP4.
"""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
#: the e2m1 magnitudes, code 0..7 (bit 3 is the sign)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
#: gpt-oss's own list of what its MXFP4 checkpoints leave unquantized
GPT_OSS_SKIP = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


# ---- files --------------------------------------------------------------------------------------
def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, as stored."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})  # noqa: SIM118
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes (so -0 != 0 and NaN == NaN)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def config_of(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def write_model(
    src: str | Path, dst: str | Path, tensors: dict[str, torch.Tensor], **config: Any
) -> Path:
    """``dst``: ``src``'s files with its weights replaced by ``tensors`` (one shard) and its
    config updated by ``config`` (a None value removes the key)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    cfg = config_of(src)
    for k, v in config.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    return dst


def same_experts(folder: str | Path) -> Path:
    """Rewrite ``folder``'s weights so every expert of a layer equals its expert 0 (per-expert
    ``experts.{e}.`` tensors, or gpt-oss's packed ``experts.*`` ``[E, ...]`` ones)."""
    folder = Path(folder)
    tensors = read_tensors(folder)
    for name, t in tensors.items():
        per_expert = re.search(r"\.experts\.(\d+)\.", name)
        if per_expert:
            t.copy_(tensors[name.replace(per_expert.group(0), ".experts.0.")])
        elif ".mlp.experts." in name:
            t[:] = t[0].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def to_bf16(src: str | Path, dst: str | Path) -> Path:
    """``src`` saved as bfloat16 (the unquantized model the quantized ones are made from)."""
    tensors = {k: v.to(BF16) for k, v in read_tensors(src).items()}
    return write_model(src, dst, tensors, dtype="bfloat16", torch_dtype=None)


# ---- which weights a quantized checkpoint quantizes --------------------------------------------
def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A linear weight of a decoder layer (attention, MLP, per-expert MLP): what an FP8
    checkpoint stores quantized. Norms, routers, embeddings and the head stay as they are."""
    if not name.startswith("model.layers.") or not name.endswith(".weight") or len(shape) < 2:
        return False
    module = name.removesuffix(".weight")
    return not ("norm" in module or module.endswith((".gate", ".router")))


# ---- FP8 block-scaled ------------------------------------------------------------------------
def _padded(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``t`` ``[..., R, C]`` zero-padded to whole blocks (any dtype; fp8 through its bytes)."""
    r, c = t.shape[-2:]
    pr, pc = -r % block[0], -c % block[1]
    if not pr and not pc:
        return t
    out = torch.zeros(
        *t.shape[:-2], r + pr, c + pc, dtype=torch.uint8 if t.dtype == FP8 else t.dtype
    )
    out[..., :r, :c] = t.view(torch.uint8) if t.dtype == FP8 else t
    return out.view(FP8) if t.dtype == FP8 else out


def hf_fp8_quantize(
    w: torch.Tensor, block: tuple[int, int], scale_fmt: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``Fp8Quantize`` of ``w`` in ``block``\\ s: ``(q, weight_scale_inv)``;
    partial edge blocks through zero padding (the grid keeps one scale per partial block)."""
    cfg = types.SimpleNamespace(weight_block_size=tuple(block), scale_fmt=scale_fmt)
    op = Fp8Quantize(types.SimpleNamespace(quantization_config=cfg))
    r, c = w.shape[-2:]
    out = op._quantize_one("x.weight", _padded(w, block))
    return out["x.weight"][..., :r, :c].contiguous(), out["x.weight_scale_inv"]


def hf_fp8_dequantize(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = BF16
) -> torch.Tensor:
    """transformers' ``Fp8Dequantize`` of ``q`` (zero-padded to whole blocks, then cropped:
    transformers itself reads the block size off the grid, which is wrong for partial edges)."""
    r, c = q.shape[-2:]
    out = Fp8Dequantize(None)._dequantize_one(_padded(q, block), scale_inv, output_dtype=dtype)
    return out[..., :r, :c].contiguous()


def fp8_config(block: tuple[int, int], **extra: Any) -> dict[str, Any]:
    """A ``quantization_config`` as DeepSeek-V3 / Qwen3-FP8 ship it."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        **extra,
    }


def make_fp8(
    src: str | Path, dst: str | Path, block: tuple[int, int] = (16, 16), **extra: Any
) -> Path:
    """``src``'s FP8 block-scaled version: every :func:`is_linear_weight` as float8_e4m3fn plus
    ``weight_scale_inv`` (float32, one per block), the rest bfloat16."""
    out: dict[str, torch.Tensor] = {}
    for name, t in read_tensors(src).items():
        t = t.to(BF16)
        if is_linear_weight(name, tuple(t.shape)):
            out[name], out[name + "_scale_inv"] = hf_fp8_quantize(t, block)
        else:
            out[name] = t
    cfg = fp8_config(block, **extra)
    return write_model(src, dst, out, dtype="bfloat16", torch_dtype=None, quantization_config=cfg)


# ---- compressed-tensors FP8 ---------------------------------------------------------------------
def ct_quantize(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's min-max FP8 (symmetric) of a bf16 ``w`` ``[R, C]``, computed in bf16:
    ``scale = amax / 448`` per tensor ``[1]`` or per output channel ``[R, 1]``; ``q = clamp(w /
    scale, -448, 448)`` as e4m3."""
    a = w.abs()
    amax = a.amax().reshape(1) if strategy == "tensor" else a.amax(dim=-1, keepdim=True)
    scale = amax / 448.0
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale).to(w.dtype)
    return (w / scale).clamp(-448, 448).to(FP8), scale


def ct_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``dequantize``: ``q.to(scale.dtype) * scale``."""
    return q.to(scale.dtype) * scale


def ct_config(strategy: str) -> dict[str, Any]:
    """A ``quantization_config`` as llm-compressor writes it: FP8_DYNAMIC (per channel,
    dynamic per-token activations) or FP8 (per tensor, static activation scales)."""
    static = strategy == "tensor"
    fp8 = dict(num_bits=8, type="float", symmetric=True, observer_kwargs={})
    weights = dict(fp8, strategy=strategy, dynamic=False, observer="minmax", group_size=None,
                   block_structure=None, actorder=None)  # fmt: skip
    inputs = dict(fp8, strategy="tensor" if static else "token", dynamic=not static,
                  observer="minmax" if static else None)  # fmt: skip
    group = dict(targets=["Linear"], format="float-quantized", weights=weights,
                 input_activations=inputs, output_activations=None)  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": "0.12.2",
    }


def make_ct(src: str | Path, dst: str | Path, strategy: str = "channel") -> Path:
    """``src``'s compressed-tensors FP8 version (bf16 scales; per tensor: a static
    ``input_scale`` [1] beside each weight)."""
    out: dict[str, torch.Tensor] = {}
    for i, (name, t) in enumerate(read_tensors(src).items()):
        t = t.to(BF16)
        if is_linear_weight(name, tuple(t.shape)):
            out[name], out[name + "_scale"] = ct_quantize(t, strategy)
            if strategy == "tensor":
                out[name.removesuffix("weight") + "input_scale"] = torch.tensor(
                    [0.01 + i / 1000], dtype=BF16
                )
        else:
            out[name] = t
    return write_model(src, dst, out, dtype="bfloat16", torch_dtype=None,
                       quantization_config=ct_config(strategy))  # fmt: skip


# ---- MXFP4 (gpt-oss experts) ----------------------------------------------------------------
def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[..., R, C]`` (C a multiple of 32) -> uint8 ``blocks`` ``[..., R, C/32, 16]`` and
    e8m0 ``scales`` ``[..., R, C/32]``: per 32-value group the OCP shared exponent
    ``floor(log2 amax) - 2``, each value the nearest e2m1 code (ties to the even code,
    saturating at 6), low nibble first."""
    *lead, r, c = w.shape
    x = w.float().reshape(*lead, r, c // 32, 32)
    amax = x.abs().amax(dim=-1)
    k = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127))
    k = k.clamp(-127, 127)
    y = x / torch.pow(2.0, k).unsqueeze(-1)
    dist = (y.abs().unsqueeze(-1) - E2M1).abs()
    nearest = dist == dist.amin(dim=-1, keepdim=True)
    odd = torch.arange(8) % 2  # a tie goes to the even code (round half to even)
    code = torch.where(nearest, odd, 2).argmin(dim=-1).to(torch.uint8)
    code |= torch.signbit(y).to(torch.uint8) << 3
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (k + 127).to(torch.uint8)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype=BF16) -> torch.Tensor:
    """transformers' own: the gpt-oss weight ``[E, K, N]`` of blocks ``[E, N, K/32, 16]``."""
    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def make_mxfp4(src: str | Path, dst: str | Path) -> Path:
    """gpt-oss ``src``'s MXFP4 version: each ``experts.gate_up_proj`` ``[E, H, 2I]`` /
    ``down_proj`` ``[E, I, H]`` as ``_blocks`` ``[E, N, K/32, 16]`` and ``_scales`` of its
    transpose ``[E, N, K]``; everything else bf16."""
    out: dict[str, torch.Tensor] = {}
    for name, t in read_tensors(src).items():
        t = t.to(BF16)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = mxfp4_quantize(t.transpose(-1, -2))
        else:
            out[name] = t
    cfg = {"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_SKIP}
    return write_model(src, dst, out, dtype="bfloat16", torch_dtype=None, quantization_config=cfg)


# ---- comparing quantized tensors --------------------------------------------------------------
def e4m3_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance, in e4m3 codes (ulps), between two float8_e4m3fn tensors (the
    codes are ordered by value within each sign; across 0 the two zeros count as one)."""

    def ordinal(t: torch.Tensor) -> torch.Tensor:
        u = t.contiguous().view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u >= 0x80, -mag, mag)

    return int((ordinal(a) - ordinal(b)).abs().max()) if a.numel() else 0
