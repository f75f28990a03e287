"""Which device a run uses: :func:`resolve_device` (``auto`` -> CUDA when there is one)."""

from __future__ import annotations

from splice.errors import SpliceError


def resolve_device(device: str | None) -> str:
    """``auto``/None -> ``cuda`` when available else ``cpu``; a cuda device must exist.

    ``cpu`` is returned without importing torch, so a verb that only copies files (``splice
    upscale --solar``) never loads it.
    """
    if device == "cpu":
        return device
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SpliceError(f"--device {device}: not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpliceError(f"--device {device}: no CUDA device here (use cpu or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SpliceError(
                f"--device {device}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise SpliceError(f"--device {device}: no MPS device here (use cpu or auto)")
    elif dev.type != "cpu":
        raise SpliceError(f"--device {device}: cannot run here; use cpu, cuda, cuda:N or mps")
    return device
