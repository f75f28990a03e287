"""The modules of a sliced model: residual blocks with a projection or a shortcut.

A decoder layer of the families slicing supports is one or more residual blocks, each a norm
feeding one or more modules whose outputs are added to the stream, ``x + Σ_m f_m(norm(x))``:
two pre-norm blocks ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (Llama; LFM2, whose first
block is attention or a short convolution depending on the layer), or one parallel block
``x + attn(norm(x)) + mlp(norm(x))`` (Phi, Cohere). :class:`BlockLayout` is one block of a
layer as data (its norm, the modules it feeds, its shortcut's name), :func:`layout_of` finds
the layout from a spec's ``norm_feeds`` and ``residual_writers`` (a module belongs to the block
of the norm that feeds its readers). :class:`Block` is one block built from the layer's own
transformers modules (no copies), with two optional ``[*, *]`` matrices on the residual path
(row vectors, ``x @ M``):

- ``proj`` ``Q_d`` ``[D, d]`` at the input, ``x <- x @ Q_d @ Q_dᵀ``: the sliced model
  simulated at full width in the original coordinates (calibration runs on this);
- ``shortcut`` ``[d, d]`` on the residual only, ``x @ S + Σ_m f_m(norm(x))`` with
  ``S = Q_kᵀ Q_{k+1}``: SliceGPT's per-layer basis change between two blocks (its
  ``attn_shortcut_Q`` / ``mlp_shortcut_Q``; a parallel block's is ``layer_shortcut_Q``).

:func:`load_sliced` loads a ``--basis per-layer`` output: the stock transformers model of the
source family at width ``d`` (``from_pretrained`` with a config of that family), whose decoder
layers are then replaced by :class:`SlicedLayer` holding the shortcut matrices. No remote code.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError
from splice.sliced_check import SLICED_TYPE

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: the shortcut tensors' names per decoder layer, by the number of blocks a layer has (more
#: blocks: ``block{j}_shortcut_Q``)
SHORTCUT_NAMES: dict[int, tuple[str, ...]] = {
    1: ("layer_shortcut_Q",),
    2: ("attn_shortcut_Q", "mlp_shortcut_Q"),
}
#: every shortcut name a per-layer output of one or two blocks per layer may hold
SHORTCUTS = ("attn_shortcut_Q", "mlp_shortcut_Q", "layer_shortcut_Q")
#: config key naming the family a per-layer output was sliced from
SLICED_FROM = "sliced_from"

#: the names transformers gives an MLP / MoE block where a spec names another (Mixtral's
#: ``block_sparse_moe`` is ``mlp`` in transformers 5)
_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
#: short labels of a block's modules in the report
_LABELS = {"self_attn": "attn", "block_sparse_moe": "mlp", "feed_forward": "mlp"}


@dataclass(frozen=True)
class BlockLayout:
    """One residual block of a decoder layer: ``norm`` (its norm's weight, layer-relative, as
    in the spec's ``norm_feeds``: ``"input_layernorm.weight"``), ``modules`` (the first path
    components of the modules it feeds that write the stream, run in parallel on the normed
    input: ``("self_attn", "mlp")``; a layer holds at least one of them) and ``shortcut`` (the
    name of its per-layer shortcut tensor)."""

    norm: str
    modules: tuple[str, ...]
    shortcut: str

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data (a per-layer output's config stores its layout)."""
        return {**asdict(self), "modules": list(self.modules)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> BlockLayout:
        return BlockLayout(str(d["norm"]), tuple(d["modules"]), str(d["shortcut"]))


def shortcut_names(n_blocks: int) -> tuple[str, ...]:
    """The shortcut tensors' names of a layer of ``n_blocks`` blocks."""
    return SHORTCUT_NAMES.get(n_blocks) or tuple(f"block{j}_shortcut_Q" for j in range(n_blocks))


def layout_of(norm_feeds: Mapping[str, Sequence[str]], writers: Sequence[str]) -> list[BlockLayout]:
    """The blocks of a decoder layer, in ``norm_feeds`` order (the order the norms run in):
    each residual writer (``"self_attn.o_proj"``) belongs to the block of the norm that feeds
    its module's readers (``"self_attn.q_proj"``: the same first path component). A one-line
    ``SpliceError`` when a writer's module reads no norm, or reads two."""
    tops: dict[str, int] = {}
    for j, feeds in enumerate(norm_feeds.values()):
        for top in {f.split(".")[0] for f in feeds}:
            if tops.setdefault(top, j) != j:
                raise SpliceError(f"its module {top!r} reads two norms")
    modules: list[list[str]] = [[] for _ in norm_feeds]
    for w in writers:
        top = w.split(".")[0]
        if top not in tops:
            raise SpliceError(f"its residual writer {w!r} belongs to a module no norm feeds")
        if top not in modules[tops[top]]:
            modules[tops[top]].append(top)
    empty = [n for n, m in zip(norm_feeds, modules, strict=True) if not m]
    if empty:
        raise SpliceError(f"the modules {empty[0]!r} feeds write nothing to the stream")
    names = shortcut_names(len(modules))
    return [
        BlockLayout(norm, tuple(mods), names[j])
        for j, (norm, mods) in enumerate(zip(norm_feeds, modules, strict=True))
    ]


def _convention(module: Any) -> tuple[str, frozenset[str]]:
    """How a block calls ``module`` on the normed stream, and the names its forward takes:
    ``"attention"`` (it takes ``position_embeddings``: ``hidden_states=`` and everything the
    layer was handed), ``"mixer"`` (it takes an ``attention_mask`` or ``cache``, a convolution
    or linear attention: ``hidden_states=`` and the keyword arguments it names) or ``"mlp"``
    (the normed stream alone)."""
    try:
        params = frozenset(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return "mlp", frozenset()
    if "position_embeddings" in params:
        return "attention", params
    if "attention_mask" in params or "cache" in params:
        return "mixer", params
    return "mlp", params


def _module_class() -> type:
    import torch

    class Block(torch.nn.Module):
        """``x @ shortcut + scale · Σ_m mods[m](norm(x))`` after ``x <- x @ proj @ projᵀ`` (both
        optional); with no ``mods`` (the head boundary) only the projection. ``x``:
        ``[B, T, width]``."""

        def __init__(self, norm: Any, mods: Mapping[str, Any], scale: float = 1.0) -> None:
            super().__init__()
            self.norm = norm
            self.mods = torch.nn.ModuleDict(dict(mods))
            self.calls = {name: _convention(m) for name, m in mods.items()}
            self.scale = scale  # the block's output multiplier (granite's residual_multiplier)
            self.register_buffer("proj", None, persistent=False)
            self.register_buffer("shortcut", None, persistent=False)

        @property
        def label(self) -> str:
            """The block's modules, short (``attn``, ``conv``, ``attn+mlp``; ``head``)."""
            return "+".join(_LABELS.get(m, m) for m in self.mods) or "head"

        def _run(self, name: str, h: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
            module, (call, names) = self.mods[name], self.calls[name]
            if call == "attention":
                out = module(hidden_states=h, **kwargs)
            elif call == "mixer":
                out = module(hidden_states=h, **{k: v for k, v in kwargs.items() if k in names})
            else:
                out = module(h)
            y = out[0] if isinstance(out, (tuple, list)) else out
            return y.view(*h.shape[:-1], y.shape[-1])  # an MoE block answers [tokens, hidden]

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                raise TypeError("Block takes the hidden states and keyword arguments only")
            x = hidden_states
            if self.proj is not None:  # [D, d] orthonormal columns: x <- x Q_d Q_dᵀ
                q = self.proj.to(x.dtype)
                x = (x @ q) @ q.T
            if not self.calls:
                return x
            h = self.norm(x)
            out = None
            for name in self.calls:
                y = self._run(name, h, kwargs)
                out = y if out is None else out + y
            res = x if self.shortcut is None else x @ self.shortcut.to(x.dtype)
            return res + (out * self.scale if self.scale != 1.0 else out)

    return Block


def _layer_class() -> type:
    import torch

    class SlicedLayer(torch.nn.Module):
        """A decoder layer as its :class:`Block`s in turn; ``[B, T, width]`` in and out."""

        def __init__(self, blocks: Sequence[Any], attention_type: str | None = None) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(blocks)
            if attention_type is not None:
                self.attention_type = attention_type

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            for block in self.blocks:
                hidden_states = block(hidden_states, *args, **kwargs)
            return hidden_states

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
        _CLASSES["SlicedLayer"] = _layer_class()
        _CLASSES["ProjectedNorm"] = _headed_class()
    return _CLASSES[name]


def _module(layer: Any, top: str) -> Any:
    """``layer``'s module ``top`` (an MLP under any of its names), or None."""
    found = getattr(layer, top, None)
    if found is None and top in _MLP_NAMES:
        found = next((getattr(layer, n) for n in _MLP_NAMES if hasattr(layer, n)), None)
    return found


def block_modules(
    layer: Any, layout: Sequence[BlockLayout], index: int, scale: float = 1.0
) -> list[Any]:
    """The :class:`Block`s of transformers decoder layer ``layer`` (one per ``layout`` entry):
    its norm module and those of its modules the layer has (LFM2's first block holds
    ``self_attn`` or ``conv``), each block's output multiplied by ``scale`` before the add."""
    Block = _cls("Block")
    out = []
    for b in layout:
        norm_name = b.norm.removesuffix(".weight")
        norm = getattr(layer, norm_name, None)
        mods = {top: m for top in b.modules if (m := _module(layer, top)) is not None}
        if norm is None or not mods:
            raise SpliceError(
                f"layer {index}: no module {norm_name!r} or none of {', '.join(b.modules)} "
                "(the residual blocks slicing needs)"
            )
        out.append(Block(norm, mods, scale))
    return out


def units(model: PreTrainedModel, layers: Any, layout: Sequence[BlockLayout]) -> list[Any]:
    """``nb·L + 1`` :class:`Block`s (``nb = len(layout)``): each layer's blocks in turn, then the
    head boundary (the final norm's input). They share the model's modules."""
    Block = _cls("Block")
    out: list[Any] = []
    scale = float(getattr(model.config, "residual_multiplier", None) or 1.0)
    for i, layer in enumerate(layers):
        out += block_modules(layer, layout, i, scale)
    out.append(Block(None, {}))
    return out


def as_layers(
    model: PreTrainedModel,
    blocks: Sequence[Any],
    old_layers: Any,
    layers_path: str,
    final_norm: str = "model.norm",
) -> None:
    """Put ``blocks`` (from :func:`units`) into ``model`` in place of its decoder layers: a
    :class:`SlicedLayer` per layer and the head boundary before the final norm (module path
    ``final_norm``)."""
    import torch

    SlicedLayer, ProjectedNorm = _cls("SlicedLayer"), _cls("ProjectedNorm")
    nb = (len(blocks) - 1) // len(old_layers)
    layers = [
        SlicedLayer(blocks[nb * i : nb * (i + 1)], getattr(old, "attention_type", None))
        for i, old in enumerate(old_layers)
    ]
    parent, _, name = layers_path.rpartition(".")
    setattr(model.get_submodule(parent), name, torch.nn.ModuleList(layers))
    owner_path, _, norm_name = final_norm.rpartition(".")
    owner = model.get_submodule(owner_path)
    setattr(owner, norm_name, ProjectedNorm(blocks[-1], getattr(owner, norm_name)))


def saved_layout(info: Mapping[str, Any]) -> list[BlockLayout]:
    """The block layout a per-layer output's ``splice_slicing`` config records (``blocks``;
    outputs of older splice versions: ``norms`` and ``writers``, two blocks)."""
    if info.get("blocks"):
        return [BlockLayout.from_dict(b) for b in info["blocks"]]
    norms, writers = info.get("norms"), info.get("writers")
    if not norms or not writers or len(norms) != len(writers):
        raise SpliceError("config.json has no splice_slicing blocks (or norms / writers)")
    names = shortcut_names(len(norms))
    return [
        BlockLayout(n, (w.split(".")[0],), s) for n, w, s in zip(norms, writers, names, strict=True)
    ]


def load_sliced(
    path: str | os.PathLike[str], *, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """A ``splice slice --basis per-layer`` output as a live causal LM (eval mode).

    The standard tensors load into the source family's transformers model at width ``d``;
    each decoder layer then becomes a :class:`SlicedLayer` whose blocks carry the layer's
    shortcut matrices ``[d, d]`` on the residual path.
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
    try:
        layout = saved_layout(info)
    except SpliceError as e:
        raise SpliceError(f"{folder}: {e}") from None
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
    wanted = {b.shortcut for b in layout}
    shortcuts: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.rsplit(".", 1)[-1] in wanted:
                    shortcuts[name] = f.get_tensor(name).to(to_torch(dtype))
    layers_path = info.get("layers", "model.layers")
    old = model.get_submodule(layers_path)
    blocks = units(model, old, layout)
    prefix = info.get("layer_prefix", "model.layers.{i}.")
    nb = len(layout)
    for i in range(len(old)):
        for j, b in enumerate(layout):
            name = prefix.format(i=i) + b.shortcut
            if name not in shortcuts:
                raise SpliceError(f"{folder}: tensor {name} is missing")
            blocks[nb * i + j].shortcut = shortcuts[name]
    as_layers(model, blocks, old, layers_path, info.get("final_norm", "model.norm"))
    return model.to(resolve_device(device)).eval()
