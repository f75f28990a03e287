"""What slicing needs of an architecture, read from its spec and config before anything runs.

:class:`SliceArch` (:func:`slice_arch`): the residual blocks of a layer, RMSNorm or LayerNorm,
the norm weights' offset, or a one-line refusal. :class:`HiddenSized` (:func:`hidden_sized`): the
dims off the stream that transformers sizes from ``hidden_size`` (LFM2's short convolution), found
by building the family's model at width ``d`` on the meta device. :func:`sliced_config`: the
output's ``config.json`` at width ``d``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.surgery.sliced import SLICED_FROM, SLICED_TYPE, BlockLayout, layout_of

NORM_KINDS = ("rms", "layer")


@dataclass(frozen=True)
class SliceArch:
    """What slicing needs of an architecture: the blocks of a layer (:class:`BlockLayout`, in
    the order they run), whether its norms are LayerNorms (``centred``: the stream is made
    mean-zero and every basis keeps ``1/√D``) and the norm weights' offset (1.0 where ``w - 1``
    is stored)."""

    layout: tuple[BlockLayout, ...]
    centred: bool
    offset: float

    @property
    def per_layer(self) -> int:
        """Blocks (block inputs) per decoder layer."""
        return len(self.layout)

    def block_of_norm(self, kind: str) -> int:
        """The block a norm (layer-relative weight name) feeds."""
        return next(j for j, b in enumerate(self.layout) if b.norm == kind)

    def block_of_module(self, top: str) -> int:
        """The block a module (first path component) belongs to."""
        return next(j for j, b in enumerate(self.layout) if top in b.modules)


def slice_arch(ckpt: Checkpoint) -> SliceArch:
    """The :class:`SliceArch` of ``ckpt``'s spec and config; a one-line ``SpliceError`` when
    the spec lacks the roles slicing needs or its blocks cannot be sliced exactly."""
    spec = ckpt.arch
    mt = spec.model_type
    kind = spec.norm.get("kind")
    why = None
    layout: list[BlockLayout] = []
    if spec.block in ("post_norm", "sandwich"):
        why = (
            "its blocks normalise their own output before the residual add (post-norm), and a "
            "norm there does not commute with a rotation of the stream, so no exact slicing "
            "exists"
        )
    elif spec.unsupported.get("slice"):
        why = spec.unsupported["slice"]
    elif spec.inferred or not spec.norm_feeds or not spec.residual_writers:
        why = "its spec declares no norm_feeds / residual_writers roles"
    elif kind not in NORM_KINDS:
        why = f"its norms are {kind!r}, neither RMSNorm nor LayerNorm"
    elif spec.embed_scale not in (None, "sqrt_hidden_size") and not str(
        spec.embed_scale
    ).startswith("config:"):
        why = f"its embedding scale {spec.embed_scale!r} is not known to slicing"
    else:
        other = [n for n in ckpt.tensors if spec.role(n) == "other"]
        if other:
            why = f"its spec gives no residual-stream role to {other[0]}" + (
                f" and {len(other) - 1} more tensors" if len(other) > 1 else ""
            )
        else:
            try:
                layout = layout_of(spec.norm_feeds, spec.residual_writers)
            except SpliceError as e:
                why = str(e)
    if why is None and not (
        ckpt.config.get("hidden_size") and ckpt.config.get("num_attention_heads")
    ):
        why = "its config has no hidden_size / num_attention_heads"
    if why is not None:
        raise SpliceError(f"slice: architecture {mt!r} is not supported: {why}")
    return SliceArch(tuple(layout), kind == "layer", float(spec.norm.get("offset", 0.0)))


@dataclass(frozen=True)
class HiddenSized:
    """Tensor dims off the stream that transformers sizes from ``hidden_size`` (LFM2's short
    convolution): ``dims`` maps a tensor to its ``(dim, chunks)`` (``chunks·D`` -> ``chunks·d``,
    the same channels kept in every chunk of ``D``), ``scored`` a module group ``(layer, module)``
    to the writer whose input channels pick the kept ones."""

    dims: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    scored: dict[tuple[int, str], str] = field(default_factory=dict)

    def group(self, name: str, spec: Any) -> tuple[int, str]:
        """``(layer, module)`` of a per-layer tensor."""
        return int(spec.layer_of(name)), spec.parse(name).kind.split(".")[0]


def _meta_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of the causal LM transformers builds from ``config`` (a
    config.json dict of a stock family), on the meta device (no memory, no weights)."""
    from splice.loadcheck import expected_shapes

    try:
        return expected_shapes(config)
    except SpliceError as e:  # transformers' verdict on the config at width d
        raise SpliceError(
            f"slice: transformers cannot build the model at the new width: {e}"
        ) from None


def hidden_sized(ckpt: Checkpoint, d: int, arch: SliceArch) -> HiddenSized:
    """The :class:`HiddenSized` dims of ``ckpt`` at width ``d``: its tensors' shapes against
    those of the family's model built at width ``d``, off the stream. A one-line
    ``SpliceError`` for a dim that changes other than ``k·D -> k·d`` (Phi's q/k LayerNorms,
    sized ``hidden_size / heads``), or a module with such dims and no writer to score them."""
    from transformers import CONFIG_MAPPING

    spec = ckpt.arch
    hidden = int(ckpt.config["hidden_size"])
    out = HiddenSized()
    if d == hidden or spec.model_type not in CONFIG_MAPPING:
        return out  # nothing narrows; or remote code, which the output's load check builds
    want = _meta_shapes(sliced_config(ckpt, d, "shared", None, arch))
    for name, info in ckpt.tensors.items():
        shape = tuple(info.shape)
        if name not in want or len(want[name]) != len(shape):
            continue
        stream = spec.residual_dims(name, len(shape))
        for dim, (a, b) in enumerate(zip(shape, want[name], strict=True)):
            if dim in stream or a == b:
                continue
            if a % hidden or b != a // hidden * d:
                raise SpliceError(
                    f"slice: architecture {spec.model_type!r} is not supported at width {d}: "
                    f"dim {dim} of {name} ({a}) is sized from hidden_size ({b} at width {d}) "
                    "in a way slicing cannot map"
                )
            out.dims.setdefault(name, []).append((dim, a // hidden))
    for name in out.dims:
        group = out.group(name, spec)
        if group in out.scored:
            continue
        scored = next(
            (
                n
                for n, dims in out.dims.items()
                if out.group(n, spec) == group
                and spec.role(n) == "writer"
                and (1, 1) in dims
                and len(ckpt[n].shape) == 2
            ),
            None,
        )
        if scored is None:
            raise SpliceError(
                f"slice: architecture {spec.model_type!r} is not supported at width {d}: "
                f"{name} has channels sized from hidden_size, and no writer of its module to "
                "choose the kept ones by"
            )
        out.scored[group] = scored
    return out


def sliced_config(
    ckpt: Checkpoint, d: int, basis: str, dtype: str | None, arch: SliceArch | None = None
) -> dict[str, Any]:
    """The output's ``config.json`` at width ``d``: ``hidden_size`` ``d``, ``head_dim`` written
    out, the head untied; per-layer, the sliced model type and its block layout
    (``splice_slicing``), which :func:`splice.surgery.load_sliced` reads."""
    from splice.dtypes import config_with_dtype

    spec = ckpt.arch
    arch = arch or slice_arch(ckpt)
    cfg = dict(ckpt.config)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    cfg["head_dim"] = int(cfg.get("head_dim") or hidden // heads)
    cfg["hidden_size"] = d
    cfg["tie_word_embeddings"] = False
    if basis == "per-layer":
        cfg[SLICED_FROM] = cfg["model_type"]
        cfg["model_type"] = SLICED_TYPE
        cfg["splice_slicing"] = {
            "basis": basis,
            "source_hidden_size": hidden,
            "layer_prefix": spec.layer_prefix,
            "layers": spec.layer_prefix.split("{i}")[0].rstrip("."),
            "final_norm": spec.final_norm.rpartition(".")[0],
            "blocks": [b.as_dict() for b in arch.layout],
            "shortcuts": [b.shortcut for b in arch.layout],
        }
    if dtype:
        cfg = config_with_dtype(cfg, dtype)
    return cfg
