"""The output tensors of a slicing: :func:`slice_tasks` makes one :class:`TensorTask` per
tensor of the source, by its residual-stream role (embedding, reader, writer, norm, head, off the
stream), from the kept bases ``Q_d`` ``[D, d]``, plus the per-layer shortcuts ``[d, d]``; a
LayerNorm's bias ``β`` folds into its readers' biases or stays in the norm.
The formulas are derived in :mod:`splice.surgery.slicing`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.execute import Source, TensorTask
from splice.surgery.slicing_arch import HiddenSized, SliceArch, slice_arch
from splice.surgery.slicing_math import fold_reader, fold_writer

if TYPE_CHECKING:
    import torch

#: how a task makes its tensor from its loaded sources
_Fn = Callable[[list["torch.Tensor"]], "torch.Tensor"]


def _bias_modes(ckpt: Checkpoint) -> dict[str, str]:
    """Per LayerNorm with a bias ``β`` (its weight's name): ``"fold"`` (every linear it feeds
    has a bias: ``b <- b + W·β``) or ``"ones"`` (one has none: ``β`` stays in the norm, see
    :mod:`splice.surgery.slicing`)."""
    spec = ckpt.arch
    names = ckpt.tensors
    readers: dict[str, list[str]] = {}
    for name in names:
        if spec.role(name) == "reader" and name.endswith(".weight"):
            norm = spec.feeding_norm(name)
            if norm is not None:
                readers.setdefault(norm, []).append(name)
    readers[spec.final_norm] = [spec.lm_head]  # the head's bias is lm_head.bias, tied or not
    modes = {}
    for norm, linears in readers.items():
        if _bias(norm) not in names:
            continue
        folds = all(_bias(w) in names for w in linears)
        modes[norm] = "fold" if folds else "ones"
    return modes


def _bias(weight: str) -> str:
    """The bias beside a module's weight."""
    return weight.rpartition(".")[0] + ".bias"


def slice_tasks(
    ckpt: Checkpoint,
    qs: list[torch.Tensor],
    d: int,
    basis: str,
    dtype: str | None,
    arch: SliceArch | None = None,
    sized: HiddenSized | None = None,
    channels: dict[tuple[int, str], torch.Tensor] | None = None,
) -> list[TensorTask]:
    """One task per output tensor, computed in float64 from ``qs``, the kept bases ``Q_d``
    ``[D, d]`` of the ``nb·L + 1`` block inputs (the formulas: :mod:`splice.surgery.slicing`);
    ``channels`` the kept channels ``[d]`` of each hidden-sized module group."""
    import torch

    spec = ckpt.arch
    arch = arch or slice_arch(ckpt)
    sized = sized or HiddenSized()
    channels = channels or {}
    key = str(ckpt.path)
    hidden = int(ckpt.config["hidden_size"])
    n_layers = ckpt.num_layers
    nb = arch.per_layer
    offset = arch.offset
    centred = arch.centred
    root = math.sqrt(hidden / d)
    # the output's stream is the source's times 1/root (see :mod:`splice.surgery.slicing`); a
    # sqrt(hidden_size) embedding scale shrinks by 1/root by itself, a config multiplier
    # (granite) stays as it is
    emb_scale = 1.0 if spec.embed_scale == "sqrt_hidden_size" else 1.0 / root
    head_q = qs[nb * n_layers]
    modes = _bias_modes(ckpt) if centred else {}
    shrink = f" * {1 / root:.6g}" if d != hidden else ""  # the output stream's scale

    def task(
        name: str, shape: tuple[int, ...], like: str, sources: tuple[str, ...], fn: _Fn, label: str
    ) -> TensorTask:
        return TensorTask(
            name=name,
            shape=tuple(shape),
            dtype=dtype or ckpt[like].dtype,
            sources=tuple(Source(key, s) for s in sources),
            compute=fn,
            load_dtype="float64",
            label=label,
        )

    def const(value: torch.Tensor) -> _Fn:
        return lambda _: value

    def select(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Keep the chosen channels of ``name``'s hidden-sized dims (identity if none)."""
        dims = sized.dims.get(name)
        if not dims:
            return lambda t: t
        idx = channels[sized.group(name, spec)]

        def fn(t: torch.Tensor) -> torch.Tensor:
            for dim, chunks in dims:
                t = t.unflatten(dim, (chunks, hidden)).index_select(dim + 1, idx.to(t.device))
                t = t.flatten(dim, dim + 1)
            return t

        return fn

    def shape_of(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` with the hidden-sized dims cut to ``d`` channels per chunk."""
        out = list(shape)
        for dim, chunks in sized.dims.get(name, []):
            out[dim] = chunks * d
        return tuple(out)

    def as_is(name: str, shape: tuple[int, ...], info: Any) -> TensorTask:
        """A tensor the rotation leaves alone: copied, or its kept channels where it has
        hidden-sized dims."""
        if name not in sized.dims:
            return TensorTask.copy(name, key, name, info, dtype=dtype)
        return task(
            name,
            shape_of(name, shape),
            name,
            (name,),
            _first(select(name)),
            f"{key}:{name}, {d} of {hidden} channels",
        )

    def reads(q: torch.Tensor, mode: str | None, sel: Callable[..., Any]) -> _Fn:
        """``(W [out, D], γ [D][, β [D]])`` -> ``[out, d]``: ``W·diag(γ)·Q_d``; mode
        ``"ones"``: ``·C_d + (W·β)·1_dᵀ/d``."""

        def fn(t: list[torch.Tensor]) -> torch.Tensor:
            beta = t[2] if mode == "ones" else None
            return fold_reader(sel(t[0]), t[1] + offset, q.to(t[0].device), beta)

        return fn

    def folds(sel: Callable[..., Any]) -> _Fn:  # (b [out], W [out, D], β [D]) -> b + W·β
        return lambda t: sel(t[0] + t[1] @ t[2])

    def writes(q: torch.Tensor, sel: Callable[..., Any]) -> _Fn:
        """``[D, in]`` -> ``[d, in]`` (``Q_dᵀ·C·W``); bias ``[D]`` -> ``[d]`` (``C`` only where
        centred)."""

        def fn(t: list[torch.Tensor]) -> torch.Tensor:
            return fold_writer(sel(t[0]), q.to(t[0].device), centred, 1.0 / root)

        return fn

    def embeds(q: torch.Tensor) -> _Fn:  # [V, D] -> [V, d]
        def fn(t: list[torch.Tensor]) -> torch.Tensor:
            e = t[0] - t[0].mean(1, keepdim=True) if centred else t[0]
            return (e @ q.to(e.device)) * emb_scale

        return fn

    def reader_task(
        name: str, src: str, shape: tuple[int, ...], norm: str, q: torch.Tensor, k: Any
    ) -> TensorTask:
        """Reader ``name`` made from weight ``src`` (the embedding for a tied head)."""
        mode = modes.get(norm)
        sources = (src, norm, _bias(norm)) if mode == "ones" else (src, norm)
        what = "norm (β kept in the norm)" if mode == "ones" else "norm"
        return task(
            name,
            (shape_of(name, shape)[0], d),
            src,
            sources,
            reads(q, mode, select(name)),
            f"{key}:{src} * {what} @ Q_{k}",
        )

    tasks: list[TensorTask] = []
    final_mode = modes.get(spec.final_norm)
    for name, info in ckpt.tensors.items():
        role = spec.role(name)
        shape = tuple(info.shape)
        if role == "embed":
            tasks.append(
                task(
                    name,
                    (shape[0], d),
                    name,
                    (name,),
                    embeds(qs[0]),
                    f"{key}:{name}{' centred' if centred else ''} @ Q_0"
                    + (f" * {emb_scale:.6g}" if emb_scale != 1.0 else ""),
                )
            )
            if ckpt.tied:  # the head reads the original (un-centred) embedding matrix
                tasks.append(
                    reader_task(spec.lm_head, name, shape, spec.final_norm, head_q, "head")
                )
        elif role == "head" and len(shape) == 2:
            tasks.append(reader_task(name, name, shape, spec.final_norm, head_q, "head"))
        elif role == "head":  # a bias over the vocabulary: the final norm's β folds into it
            if final_mode == "fold":
                head = spec.embed if ckpt.tied else spec.lm_head
                tasks.append(
                    task(
                        name,
                        shape,
                        name,
                        (name, head, _bias(spec.final_norm)),
                        folds(lambda t: t),
                        f"{key}:{name} + {head} @ final norm bias",
                    )
                )
            else:
                tasks.append(TensorTask.copy(name, key, name, info, dtype=dtype))
        elif role in ("norm", "final_norm"):
            if not name.endswith(".bias"):
                value = torch.full((d,), root - offset, dtype=torch.float64)
                tasks.append(
                    task(name, (d,), name, (), const(value), f"const sqrt(D/d)={root:.6g}")
                )
            else:
                weight = name.removesuffix(".bias") + ".weight"
                ones = modes.get(weight) == "ones"
                value = (torch.ones if ones else torch.zeros)((d,), dtype=torch.float64)
                what = "const 1 (β kept, see the readers)" if ones else "const 0 (β folded)"
                tasks.append(task(name, (d,), name, (), const(value), what))
        elif role == "reader":
            norm = spec.feeding_norm(name)
            layer = spec.layer_of(name)
            assert norm is not None and layer is not None
            k = nb * layer + arch.block_of_norm(spec.parse(norm).kind)
            if len(shape) == 2:
                tasks.append(reader_task(name, name, shape, norm, qs[k], k))
            elif name.endswith(".bias") and modes.get(norm) == "fold":
                weight = name.removesuffix(".bias") + ".weight"
                tasks.append(
                    task(
                        name,
                        shape_of(name, shape),
                        name,
                        (name, weight, _bias(norm)),
                        folds(select(name)),
                        f"{key}:{name} + {weight} @ norm bias",
                    )
                )
            else:
                tasks.append(as_is(name, shape, info))
        elif role == "inner":  # off the stream (q/k norms over head dims): as it is
            tasks.append(as_is(name, shape, info))
        elif role == "writer":
            layer = spec.layer_of(name)
            module = spec._module(name)
            assert layer is not None and module is not None
            k = nb * layer + arch.block_of_module(module[1].split(".")[0])
            out_shape = (d, *shape_of(name, shape)[1:])
            centre = "C @ " if centred else ""
            tasks.append(
                task(
                    name,
                    out_shape,
                    name,
                    (name,),
                    writes(qs[k + 1], select(name)),
                    f"Q_{k + 1}^T @ {centre}{key}:{name}{shrink}",
                )
            )
        else:  # slice_arch refused these
            raise SpliceError(f"{name}: no residual-stream role")
    if basis == "per-layer":
        like = spec.final_norm
        for i in range(n_layers):
            for j, b in enumerate(arch.layout):
                k = nb * i + j
                s = (qs[k].T @ qs[k + 1]).contiguous()
                tasks.append(
                    task(
                        spec.layer_prefix.format(i=i) + b.shortcut,
                        (d, d),
                        like,
                        (),
                        const(s),
                        f"Q_{k}^T Q_{k + 1}",
                    )
                )
    return tasks


def _first(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[list[torch.Tensor]], Any]:
    """``fn`` of a task's first loaded source."""
    return lambda t: fn(t[0])


def module_writer_tasks(
    ckpt: Checkpoint, qs: list[torch.Tensor], d: int, dtype: str | None, arch: SliceArch
) -> list[TensorTask]:
    """A multimodal model's linears outside the language model that write its residual stream
    (the projector's last one, Qwen3-VL's deepstack mergers: :meth:`Layout.stream_writers`),
    sliced like the layers' writers with the basis of the block input they write: an image
    token's features enter the stream where a word's embedding does. None for a text model.
    Shapes: ``[D, in]`` -> ``[d, in]`` (``[in, D]`` -> ``[in, d]`` where stored transposed),
    bias ``[D]`` -> ``[d]``."""
    from splice.multimodal import LanguageModel

    if not isinstance(ckpt, LanguageModel):
        return []
    key = str(ckpt.path)
    scale = math.sqrt(d / int(ckpt.config["hidden_size"]))
    own = ckpt.module_tensors
    tasks = []
    for name, (layer, transposed) in ckpt.layout.stream_writers(own).items():
        info, k = own[name], arch.per_layer * layer

        def fn(t: list[torch.Tensor], q: torch.Tensor = qs[k], flip: bool = transposed) -> Any:
            w = t[0].T if flip else t[0]
            out = fold_writer(w, q.to(w.device), arch.centred, scale)
            return out.T.contiguous() if flip else out

        shape = (*info.shape[:-1], d) if transposed else (d, *info.shape[1:])
        tasks.append(
            TensorTask(
                name=name,
                shape=tuple(shape),
                dtype=dtype or info.dtype,
                sources=(Source(key, name),),
                compute=fn,
                load_dtype="float64",
                label=f"Q_{k}^T @ {key}:{name}" + (" (stored transposed)" if transposed else ""),
            )
        )
    return tasks
