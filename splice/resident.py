"""The evolve path: source tensors kept on the device, and empty models built on it.

An evolutionary search merges hundreds of candidates from the same sources into one live model
(``splice.merge.merge_into``). :class:`ResidentCheckpoint` is a :class:`Checkpoint` whose tensors
stay on one device after their first load, so the second and later candidates read no file and
copy nothing host -> device; :func:`empty_model` builds the module they are merged into directly
on the target device, without materialising random weights on the host.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint
from splice.dtypes import to_torch
from splice.errors import SpliceError
from splice.lora import LoraCheckpoint
from splice.multimodal import LanguageModel

if TYPE_CHECKING:
    import torch


class ResidentCheckpoint(Checkpoint):
    """A checkpoint whose tensors, once loaded, stay resident on ``device``.

    Same interface as :class:`Checkpoint` (tensor metadata, ``config``, ``arch``, ``load``).
    The first ``load(name)`` reads from disk and keeps the tensor on ``device`` in ``dtype``
    (``None``: as stored); later loads read nothing: they return a copy made on the device (fresh
    memory, as ``Checkpoint.load`` promises, so a method may work in place), cast if asked.
    ``bytes_read`` counts what came from disk; ``resident_bytes`` what is held.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        dtype: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(path, allow_pickle=allow_pickle)
        self._hold(device, dtype)

    def _hold(self, device: str, dtype: str | None) -> None:
        from splice.devices import resolve_device

        self.device = resolve_device(device)
        self.dtype = dtype
        self._resident: dict[str, torch.Tensor] = {}
        self.bytes_read = 0

    @classmethod
    def of(
        cls, ckpt: Checkpoint, *, device: str = "cpu", dtype: str | None = None
    ) -> ResidentCheckpoint:
        """A resident view of the model folder ``ckpt`` reads (its own file handles); of a LoRA
        reference, a :class:`ResidentLora`; of a multimodal model's language model, a
        :class:`ResidentLanguageModel`."""
        if isinstance(ckpt, ResidentCheckpoint):
            return ckpt
        if isinstance(ckpt, LanguageModel):
            return ResidentLanguageModel(
                ckpt.path, device=device, dtype=dtype, allow_pickle=ckpt.allow_pickle
            )
        if isinstance(ckpt, LoraCheckpoint):
            return ResidentLora(
                ckpt.base_path,
                ckpt.adapter_path,
                device=device,
                dtype=dtype,
                allow_pickle=ckpt.allow_pickle,
            )
        return cls(ckpt.path, device=device, dtype=dtype, allow_pickle=ckpt.allow_pickle)

    def warm(self, names: Iterable[str] | None = None) -> None:
        """Load ``names`` (default: every tensor) onto the device now."""
        for name in self.tensors if names is None else names:
            self._get(name)

    def _get(self, name: str) -> torch.Tensor:
        t = self._resident.get(name)
        if t is None:
            t = super().load(name, dtype=self.dtype, device=self.device)
            with self._lock:
                self.bytes_read += self.stored_info(name).nbytes
                t = self._resident.setdefault(name, t)
        return t

    def load(
        self,
        name: str,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Tensor ``[*shape]`` from the device copy (read from disk only the first time)."""
        t = self._get(name)
        want = to_torch(dtype) if dtype is not None else t.dtype
        out = t.to(device=device or t.device, dtype=want)
        return out.clone() if out is t else out

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._resident.values())

    def release(self) -> None:
        """Drop the device copies (the next load reads from disk again)."""
        self._resident.clear()


class ResidentLora(ResidentCheckpoint, LoraCheckpoint):
    """A LoRA reference ``BASE+ADAPTER`` held resident: each tensor adapted on its first load
    (:class:`splice.lora.LoraCheckpoint`), then kept on the device like any other."""

    def __init__(
        self,
        base: str | os.PathLike[str],
        adapter: str | os.PathLike[str],
        *,
        device: str = "cpu",
        dtype: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        LoraCheckpoint.__init__(self, base, adapter, allow_pickle=allow_pickle)
        self._hold(device, dtype)


class ResidentLanguageModel(ResidentCheckpoint, LanguageModel):
    """The language model of a multimodal checkpoint (:class:`splice.multimodal.LanguageModel`)
    held resident like any other source."""


# ---- a module to merge into -------------------------------------------------------------------
def _no_init() -> contextlib.AbstractContextManager[Any]:
    """transformers' switch that skips weight initialisation (its home moved in v5)."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            module = __import__(where, fromlist=["no_init_weights"])
            return module.no_init_weights()
    return contextlib.nullcontext()


def empty_model(
    config: dict[str, Any] | Any,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A causal-LM module for ``config`` with uninitialised weights, allocated on ``device``.

    Nothing is allocated on the host for a GPU device, and no random initialisation runs: the
    parameters are placeholders for ``merge_into`` / ``execute_into`` to fill. Buffers that the
    model computes at construction and never saves (rotary ``inv_freq``) are computed for real,
    which building on the meta device and calling ``to_empty`` would leave as garbage.
    ``config`` is a ``config.json`` dict or a transformers config. In eval mode.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    from splice.devices import resolve_device

    device = resolve_device(device)
    if isinstance(config, PretrainedConfig):
        cfg = config
    else:
        data = dict(config)
        if data.get("auto_map") and not trust_remote_code:
            raise SpliceError(
                "the config names its own model code (auto_map); pass trust_remote_code=True "
                "only if you trust it"
            )
        model_type = data.pop("model_type", None)
        if not model_type:
            raise SpliceError("config has no model_type")
        try:
            cfg = AutoConfig.for_model(model_type, **data)
        except ValueError as e:
            raise SpliceError(f"model_type {model_type!r}: {e}") from None
    torch_dtype = to_torch(dtype) if dtype else getattr(cfg, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = to_torch(torch_dtype)
    with torch.device(device), _no_init():
        model = AutoModelForCausalLM.from_config(
            cfg, trust_remote_code=trust_remote_code, dtype=torch_dtype
        )
    model.tie_weights()
    return model.eval()
