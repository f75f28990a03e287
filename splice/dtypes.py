"""Dtype names, sizes and byte counts, without importing torch.

safetensors headers name dtypes by codes ("BF16"); splice uses torch's names ("bfloat16") in
its API and output. Torch is imported only where a ``torch.dtype`` is actually needed, so that
``splice inspect`` stays fast.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch

# safetensors code -> (torch name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),  # power-of-two scales (DeepSeek-V3.1's ue8m0)
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
NAME_TO_CODE = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}
ITEMSIZE = {name: size for name, size in SAFETENSORS_DTYPES.values()}
ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical torch name of a dtype given as a torch dtype, a torch name or an alias."""
    name = str(dtype).removeprefix("torch.")
    name = ALIASES.get(name.lower(), name.lower())
    if name not in ITEMSIZE:
        raise SpliceError(
            f"unknown dtype {dtype!r}; choose from: {', '.join(sorted(ITEMSIZE))} "
            "(or bf16, fp16, fp32)"
        )
    return name


#: dtypes floating weights may be written in (integer and float8 casts would silently ruin them)
OUTPUT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def output_dtype(dtype: str | torch.dtype | None) -> str | None:
    """The canonical name of an output ``--dtype`` (None: each tensor keeps its own), one
    :class:`SpliceError` line unless weights can be written in it (:data:`OUTPUT_DTYPES`)."""
    if dtype is None:
        return None
    name = dtype_name(dtype)
    if name not in OUTPUT_DTYPES:
        raise SpliceError(
            f"--dtype {dtype}: weights can be converted to {', '.join(OUTPUT_DTYPES)} only"
        )
    return name


def to_torch(dtype: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` for a dtype name, alias or dtype."""
    import torch

    return getattr(torch, dtype_name(dtype))


def nbytes(shape: tuple[int, ...] | list[int], dtype: str | torch.dtype) -> int:
    """Bytes taken by a tensor of this shape and dtype."""
    n = ITEMSIZE[dtype_name(dtype)]
    for d in shape:
        n *= d
    return n


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_size(size: str | int) -> int:
    """Bytes in a size such as ``"2GB"`` (10**9, as Hugging Face counts), ``"500MiB"`` or ``1000``."""
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(size)
        if not m:
            raise SpliceError(f"cannot read size {size!r}; write it like 2GB, 500MB or 1GiB")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value <= 0:
        raise SpliceError(f"size must be positive, got {size!r}")
    return value


def format_size(n: float) -> str:
    """Human-readable bytes: ``1.6 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def config_with_dtype(config: dict, dtype: str | torch.dtype) -> dict:
    """A copy of an HF config naming ``dtype`` as the weights' dtype.

    Sets whichever of ``torch_dtype`` (transformers 4) and ``dtype`` (transformers 5) the config
    has, or ``torch_dtype`` when it has neither.
    """
    out = dict(config)
    keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
    for key in keys:
        out[key] = dtype_name(dtype)
    return out
