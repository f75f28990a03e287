"""Experts a family stores packed on disk, read one expert tensor at a time and written packed.

Some families keep all experts of a layer in one tensor on disk and nowhere else: gpt-oss's
``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` (gate and up interleaved column by column, stored
input-major) with ``gate_up_proj_bias`` ``[E, 2I]``, ``down_proj`` ``[E, I, H]`` and
``down_proj_bias`` ``[E, H]``; GraniteMoE's ``input_linear.weight`` ``[E, 2I, H]`` (gate rows,
then up rows) and ``output_linear.weight`` ``[E, H, I]``. transformers reads no per-expert form
of them, so a written model must hold them packed again.

A spec describes such a tensor as a :class:`StoredLayout` (``experts.stored`` in its JSON): the
per-expert kinds it holds (``parts``), whether they alternate (``interleaved``) or follow each
other (chunked), and whether each expert's block is stored input-major (``transposed``: the block
is ``[in, parts·out]``, a part is its columns, transposed to the ``[out, in]`` of a Linear).
:meth:`splice.arch.ArchSpec.unpack` lists every part of every expert as a tensor of its own
(a :class:`StoredView`), so planners, merges, analysis and collapse see per-expert tensors
(``mlp.experts.{e}.gate_proj.weight`` ``[I, H]``) exactly as in the other families; reading one
reads its expert's block only. :func:`pack_tasks` turns a plan's per-expert output tasks back
into one task per stored tensor; an expert tensor moved unchanged from a stored tensor of the
same shape stays a byte-for-byte copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch

    from splice.arch import ArchSpec
    from splice.checkpoint import Checkpoint
    from splice.execute import TensorTask


@dataclass(frozen=True)
class StoredLayout:
    """How one stored tensor ``[E, *block]`` holds its per-expert ``parts`` (module docstring)."""

    parts: tuple[str, ...]
    interleaved: bool = False
    transposed: bool = False

    def oriented(self, block: tuple[int, ...], hidden: int, writer: bool) -> StoredLayout:
        """This layout with ``transposed`` read off an expert's ``block`` shape, for families
        whose files exist in both orientations (Qwen3-VL-MoE: its own files input-major,
        transformers 5's output-major): the hidden size is a reader's input width and a
        writer's output width. ``ValueError`` when the block fits neither, or both."""
        if len(block) != 2:
            raise ValueError(f"block {list(block)} is not a matrix")
        out_major = block[0 if writer else 1] == hidden
        in_major = block[1 if writer else 0] == hidden
        if out_major == in_major:
            what = "both orientations" if out_major else "neither orientation"
            raise ValueError(f"block {list(block)} fits {what} at hidden size {hidden}")
        return replace(self, transposed=in_major)

    @property
    def contiguous(self) -> bool:
        """Every part of a block is one run of bytes (a view is an offset, nothing to read)."""
        return not self.transposed and (not self.interleaved or len(self.parts) == 1)

    def part_shape(self, block: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one part of an expert block of shape ``block``."""
        n = len(self.parts)
        if self.transposed:
            if len(block) != 2 or block[1] % n:
                raise ValueError(f"block {list(block)} is not [in, {n}·out]")
            return (block[1] // n, block[0])
        if not block or block[0] % n:
            raise ValueError(f"block {list(block)} is not [{n}·rows, ...]")
        return (block[0] // n, *block[1:])

    def block_shape(self, part: tuple[int, ...]) -> tuple[int, ...]:
        """The inverse of :meth:`part_shape`."""
        n = len(self.parts)
        if self.transposed:
            return (part[1], n * part[0])
        return (n * part[0], *part[1:])

    def take(self, block: torch.Tensor, j: int) -> torch.Tensor:
        """Part ``j`` of one expert's ``block``."""
        n = len(self.parts)
        t = block.T if self.transposed else block  # parts along dim 0 now
        if self.interleaved:
            part = t[j::n]
        else:
            rows = t.shape[0] // n
            part = t[j * rows : (j + 1) * rows]
        return part.contiguous()

    def pack(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """One expert's block from its ``parts`` (the inverse of :meth:`take`)."""
        import torch

        if self.interleaved:
            t = torch.stack(list(parts), dim=1).reshape(-1, *parts[0].shape[1:])
        else:
            t = torch.cat(list(parts), dim=0)
        return (t.T if self.transposed else t).contiguous()


@dataclass(frozen=True)
class StoredView:
    """A per-expert tensor read from its stored tensor: part ``part`` of expert ``expert``'s
    block of ``stored``, the block ``block_nbytes`` bytes at ``block_offset`` of shape
    ``block_shape``."""

    stored: str
    expert: int
    part: int
    layout: StoredLayout
    block_offset: int
    block_nbytes: int
    block_shape: tuple[int, ...]


def layout_of(d: Mapping[str, Any]) -> StoredLayout:
    """A spec JSON's ``experts.stored`` entry."""
    return StoredLayout(
        parts=tuple(d["parts"]),
        interleaved=bool(d.get("interleaved", False)),
        transposed=bool(d.get("transposed", False)),
    )


# ---- writing ----------------------------------------------------------------------------------
class _Pack:
    """compute: the stored tensor ``[E, *block]`` from its per-expert tasks' results: each
    sub-task (compute, scale, number of sources) runs on its own sources, in expert-major,
    part-minor order."""

    def __init__(self, layout: StoredLayout, subs: list[tuple[Any, float, int]]) -> None:
        self.layout, self.subs = layout, subs

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        results, at = [], 0
        for compute, scale, n in self.subs:
            ts = tensors[at : at + n]
            at += n
            r = compute(ts) if compute is not None else ts[0]
            results.append(r * scale if scale != 1.0 else r)
        k = len(self.layout.parts)
        blocks = [self.layout.pack(results[i : i + k]) for i in range(0, len(results), k)]
        return torch.stack(blocks)


def _moved_unchanged(
    subs: list[TensorTask], models: Mapping[str, Checkpoint], layout: StoredLayout
) -> tuple[str, str] | None:
    """``(model, stored name)`` when ``subs`` (expert-major, part-minor) are the views of one
    stored tensor, every expert in place and unchanged; else None."""
    first = subs[0].sources[0] if subs[0].sources else None
    if first is None:
        return None
    stored = None
    k = len(layout.parts)
    for i, t in enumerate(subs):
        if t.compute is not None or t.scale != 1.0 or len(t.sources) != 1:
            return None
        s = t.sources[0]
        info = models[s.model][s.name]
        v = info.view
        if s.model != first.model or v is None or v.layout != layout or info.dtype != t.dtype:
            return None
        if (v.expert, v.part) != divmod(i, k) or stored not in (None, v.stored):
            return None
        stored = v.stored
    assert stored is not None
    source = models[first.model].stored_info(stored)
    if source.shape[0] * k != len(subs):
        return None
    return first.model, stored


def pack_tasks(
    tasks: Sequence[TensorTask], spec: ArchSpec, models: Mapping[str, Checkpoint]
) -> list[TensorTask]:
    """``tasks`` with the per-expert outputs of every tensor ``spec`` stores packed replaced by
    one task making the stored tensor (module docstring); other tasks unchanged, in order."""
    from splice.execute import TensorTask

    ex = spec.experts
    if ex is None or not ex.stored:
        return list(tasks)
    owner = {part: (kind, j) for kind, lay in ex.stored.items() for j, part in enumerate(lay.parts)}
    groups: dict[tuple[int, str], dict[tuple[int, int], TensorTask]] = {}
    order: list[TensorTask | tuple[int, str]] = []
    for t in tasks:
        p = spec.parse(t.name)
        if p.group != "experts" or p.kind not in owner or p.layer is None or p.expert is None:
            order.append(t)
            continue
        kind, j = owner[p.kind]
        key = (p.layer, kind)
        if key not in groups:
            groups[key] = {}
            order.append(key)
        groups[key][(p.expert, j)] = t
    out = []
    for item in order:
        if not isinstance(item, tuple):
            out.append(item)
            continue
        layer, kind = item
        layout, parts = ex.stored[kind], groups[item]
        name = spec.layer_name(layer, kind)
        experts = 1 + max(e for e, _ in parts)
        want = [(e, j) for e in range(experts) for j in range(len(layout.parts))]
        missing = [f"{layout.parts[j]} of expert {e}" for e, j in want if (e, j) not in parts]
        subs = [parts[k] for k in want if k in parts]
        shapes = {t.shape for t in subs}
        dtypes = {t.dtype for t in subs}
        if missing or len(shapes) != 1 or len(dtypes) != 1:
            why = f"no {missing[0]}" if missing else "its experts differ in shape or dtype"
            raise SpliceError(
                f"internal error: {name} cannot be packed ({why}); nothing was written. Please "
                "report this with the model's config.json"
            )
        block = layout.block_shape(subs[0].shape)
        moved = _moved_unchanged(subs, models, layout)
        if moved is not None:
            model, stored = moved
            out.append(TensorTask.copy(name, model, stored, models[model].stored_info(stored)))
            continue
        load = {t.load_dtype for t in subs} - {None}
        out.append(
            TensorTask(
                name,
                (experts, *block),
                subs[0].dtype,
                tuple(s for t in subs for s in t.sources),
                compute=_Pack(layout, [(t.compute, t.scale, len(t.sources)) for t in subs]),
                load_dtype=("float32" if len(load) > 1 else next(iter(load))) if load else None,
                label=f"{experts} experts packed: {subs[0].label}, ...",
            )
        )
    return out
