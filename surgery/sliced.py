"""The modules of a sliced model: pre-norm residual blocks with a projection or a shortcut.

A decoder layer of the families slicing supports is two pre-norm residual blocks,
``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. :class:`Block` is one of them, built from
the layer's own transformers modules (no copies), with two optional ``[*, *]`` matrices on the
residual path (row vectors, ``x @ M``):

- ``proj`` ``Q_d`` ``[D, d]`` at the input, ``x <- x @ Q_d @ Q_dᵀ``: the sliced model
  simulated at full width in the original coordinates (calibration runs on this);
- ``shortcut`` ``[d, d]`` on the residual only, ``x @ S + f(norm(x))`` with
  ``S = Q_kᵀ Q_{k+1}``: SliceGPT's per-layer basis change between two blocks (its
  ``attn_shortcut_Q`` / ``mlp_shortcut_Q``).

:func:`load_sliced` loads a ``--basis per-layer`` output: the stock transformers model of the
source family at width ``d`` (``from_pretrained`` with a config of that family), whose decoder
layers are then replaced by :class:`SlicedLayer` holding the shortcut matrices. No remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError
from splice.sliced_check import SLICED_TYPE

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: the names of the shortcut tensors in a per-layer output, per decoder layer
SHORTCUTS = ("attn_shortcut_Q", "mlp_shortcut_Q")
#: config key naming the family a per-layer output was sliced from
SLICED_FROM = "sliced_from"

_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")


def _module_class() -> type:
    import torch

    class Block(torch.nn.Module):
        """``x @ shortcut + block(norm(x))`` after ``x <- x @ proj`` (both optional); with no
        ``block`` (the head boundary) only the projection. ``x``: ``[B, T, width]``."""

        def __init__(self, norm: Any, block: Any, kind: str, scale: float = 1.0) -> None:
            super().__init__()
            self.norm = norm
            self.block = block
            self.kind = kind  # "attn", "mlp" or "head"
            self.scale = scale  # the block's output multiplier (granite's residual_multiplier)
            self.register_buffer("proj", None, persistent=False)
            self.register_buffer("shortcut", None, persistent=False)

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                raise TypeError("Block takes the hidden states and keyword arguments only")
            x = hidden_states
            if self.proj is not None:  # [D, d] orthonormal columns: x <- x Q_d Q_dᵀ
                q = self.proj.to(x.dtype)
                x = (x @ q) @ q.T
            if self.block is None:
                return x
            h = self.norm(x)
            out = self.block(hidden_states=h, **kwargs) if self.kind == "attn" else self.block(h)
            if isinstance(out, (tuple, list)):
                out = out[0]
            res = x if self.shortcut is None else x @ self.shortcut.to(x.dtype)
            return res + (out * self.scale if self.scale != 1.0 else out)

    return Block


def _pair_class() -> type:
    import torch

    class SlicedLayer(torch.nn.Module):
        """A decoder layer as its two :class:`Block`s; ``[B, T, width]`` in and out."""

        def __init__(self, attn: Any, mlp: Any, attention_type: str | None = None) -> None:
            super().__init__()
            self.attn = attn
            self.mlp = mlp
            if attention_type is not None:
                self.attention_type = attention_type

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.mlp(self.attn(hidden_states, *args, **kwargs))

    return SlicedLayer


def _headed_class() -> type:
    import torch

    class ProjectedNorm(torch.nn.Module):
        """The final norm after the head boundary's projection: ``norm(x @ P)``."""

        def __init__(self, unit: Any, norm: Any) -> None:
            super().__init__()
            self.unit = unit
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.unit(x))

    return ProjectedNorm


_CLASSES: dict[str, type] = {}


def _cls(name: str) -> type:
    if not _CLASSES:
        _CLASSES["Block"] = _module_class()
        _CLASSES["SlicedLayer"] = _pair_class()
        _CLASSES["ProjectedNorm"] = _headed_class()
    return _CLASSES[name]


def block_modules(
    layer: Any, norms: list[str], writers: list[str], index: int, scale: float = 1.0
) -> list[Any]:
    """The two :class:`Block`s (attention, MLP) of transformers decoder layer ``layer``:
    norm modules named by the spec's ``norm_feeds`` keys, blocks by its residual writers'
    first path component (``self_attn``, ``mlp``; the MoE block under any of its names), each
    block's output multiplied by ``scale`` before the residual add."""
    Block = _cls("Block")
    out = []
    for j, (norm_name, writer) in enumerate(zip(norms, writers, strict=True)):
        norm = getattr(layer, norm_name.removesuffix(".weight"), None)
        top = writer.split(".")[0]
        block = getattr(layer, top, None)
        if block is None and j == 1:
            block = next((getattr(layer, n) for n in _MLP_NAMES if hasattr(layer, n)), None)
        if norm is None or block is None:
            raise SpliceError(
                f"layer {index}: no module {norm_name.removesuffix('.weight')!r} or {top!r} "
                "(slicing needs pre-norm attention and MLP blocks)"
            )
        out.append(Block(norm, block, "attn" if j == 0 else "mlp", scale))
    return out


def units(model: PreTrainedModel, layers: Any, norms: list[str], writers: list[str]) -> list[Any]:
    """``2L + 1`` :class:`Block`s: attention and MLP of every layer, then the head boundary
    (the final norm's input). They share the model's modules."""
    Block = _cls("Block")
    out: list[Any] = []
    scale = float(getattr(model.config, "residual_multiplier", None) or 1.0)
    for i, layer in enumerate(layers):
        out += block_modules(layer, norms, writers, i, scale)
    out.append(Block(None, None, "head"))
    return out


def as_layers(model: PreTrainedModel, blocks: list[Any], old_layers: Any, layers_path: str) -> None:
    """Put ``blocks`` (from :func:`units`) into ``model`` in place of its decoder layers: a
    :class:`SlicedLayer` per layer and the head boundary before the final norm."""
    import torch

    SlicedLayer, ProjectedNorm = _cls("SlicedLayer"), _cls("ProjectedNorm")
    pairs = [
        SlicedLayer(blocks[2 * i], blocks[2 * i + 1], getattr(old, "attention_type", None))
        for i, old in enumerate(old_layers)
    ]
    parent, _, name = layers_path.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, name, torch.nn.ModuleList(pairs))
    owner.norm = ProjectedNorm(blocks[-1], owner.norm)


def load_sliced(
    path: str | os.PathLike[str], *, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """A ``splice slice --basis per-layer`` output as a live causal LM (eval mode).

    The standard tensors load into the source family's transformers model at width ``d``;
    each decoder layer then becomes a :class:`SlicedLayer` whose blocks carry the layer's
    ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` ``[d, d]`` on the residual path.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splice.devices import resolve_device
    from splice.dtypes import to_torch

    folder = Path(path)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SpliceError(f"{folder}: cannot read config.json ({e})") from None
    family = raw.get(SLICED_FROM)
    info = raw.get("splice_slicing") or {}
    if raw.get("model_type") != SLICED_TYPE or not family:
        raise SpliceError(
            f"{folder}: not a per-layer sliced model (model_type {raw.get('model_type')!r}); "
            "a --basis shared output loads with AutoModelForCausalLM"
        )
    fields = {
        k: v for k, v in raw.items() if k not in ("model_type", SLICED_FROM, "splice_slicing")
    }
    config = AutoConfig.for_model(family, **fields)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the shortcut tensors are "unexpected" to the stock model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), config=config, dtype=to_torch(dtype)
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    shortcuts: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.rsplit(".", 1)[-1] in SHORTCUTS:
                    shortcuts[name] = f.get_tensor(name).to(to_torch(dtype))
    layers_path = info.get("layers", "model.layers")
    old = model.get_submodule(layers_path)
    norms, writers = info.get("norms"), info.get("writers")
    if not norms or not writers:
        raise SpliceError(f"{folder}: config.json has no splice_slicing norms / writers")
    blocks = units(model, old, norms, writers)
    prefix = info.get("layer_prefix", "model.layers.{i}.")
    for i in range(len(old)):
        for j, kind in enumerate(SHORTCUTS):
            name = prefix.format(i=i) + kind
            if name not in shortcuts:
                raise SpliceError(f"{folder}: tensor {name} is missing")
            blocks[2 * i + j].shortcut = shortcuts[name]
    as_layers(model, blocks, old, layers_path)
    return model.to(resolve_device(device)).eval()
