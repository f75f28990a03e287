"""What ``splice inspect`` reports: a model's shape, read from headers alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from splice.checkpoint import Checkpoint


@dataclass
class TensorRow:
    """One tensor in a table: layer-relative ``kind`` (or full name), group, shape, dtype."""

    kind: str
    group: str
    shape: list[int]
    dtype: str
    count: int = 1  # expert tensors: one row per kind, counting the experts


@dataclass
class LayerBlock:
    """Consecutive layers whose tensor tables are identical (``layers`` lists their indices)."""

    layers: list[int]
    tensors: list[TensorRow]


@dataclass
class ModelSummary:
    """Everything ``splice inspect`` prints; ``to_dict()`` is its ``--json`` form."""

    path: str
    model_type: str
    architectures: list[str]
    arch_inferred: bool
    num_layers: int
    layer_template: str
    hidden_size: int | None
    vocab_size: int | None
    num_experts: int | None
    experts_per_token: int | None
    tied_embeddings: bool
    num_params: int
    nbytes: int
    params_by_dtype: dict[str, int]
    files: list[dict[str, Any]]
    packed: list[str] = field(default_factory=list)  # stored kinds listed as per-expert views
    #: MoE models: layers without routed experts, and each shared expert's module prefix
    dense_layers: list[int] = field(default_factory=list)
    shared_experts: list[str] = field(default_factory=list)
    globals: list[TensorRow] = field(default_factory=list)
    layer_blocks: list[LayerBlock] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(ckpt: Checkpoint) -> ModelSummary:
    """Summarize a checkpoint without reading any tensor data."""
    spec, cfg = ckpt.arch, ckpt.config
    by_dtype: Counter[str] = Counter()
    files: dict[str, dict[str, Any]] = {}
    globals_: list[TensorRow] = []
    per_layer: dict[int, list[TensorRow]] = {}
    for info in ckpt.stored_tensors.values():
        f = files.setdefault(info.file.name, {"file": info.file.name, "tensors": 0, "nbytes": 0})
        f["tensors"] += 1
        f["nbytes"] += info.nbytes
    for name, info in ckpt.tensors.items():
        by_dtype[info.dtype] += info.numel
        t = spec.parse(name)
        if t.layer is None:
            globals_.append(TensorRow(name, t.group, list(info.shape), info.dtype))
            continue
        kind = t.kind if t.expert is None else f"{spec.experts.prefix}{t.kind}"  # type: ignore[union-attr]
        per_layer.setdefault(t.layer, []).append(
            TensorRow(kind, t.group, list(info.shape), info.dtype)
        )
    blocks: list[LayerBlock] = []
    for layer in sorted(per_layer):
        rows = _dedupe(
            sorted(per_layer[layer], key=lambda r: (_GROUP_ORDER.get(r.group, 9), r.kind))
        )
        if blocks and blocks[-1].tensors == rows and blocks[-1].layers[-1] == layer - 1:
            blocks[-1].layers.append(layer)
        else:
            blocks.append(LayerBlock([layer], rows))
    moe = spec.experts is not None and bool(spec.num_experts(cfg))
    rows = [(layer, r) for layer, rs in per_layer.items() for r in rs]
    with_experts = {layer for layer, r in rows if r.group == "experts"}
    shared = sorted({p for _, r in rows if (p := spec.shared_expert(r.kind))})
    return ModelSummary(
        path=str(ckpt.path),
        model_type=str(cfg.get("model_type")),
        architectures=list(cfg.get("architectures") or []),
        arch_inferred=spec.inferred,
        num_layers=ckpt.num_layers,
        layer_template=spec.layer_prefix,
        hidden_size=cfg.get("hidden_size"),
        vocab_size=cfg.get("vocab_size"),
        num_experts=spec.num_experts(cfg),
        experts_per_token=spec.experts_per_token(cfg),
        tied_embeddings=ckpt.tied,
        num_params=ckpt.num_params,
        nbytes=ckpt.nbytes,
        params_by_dtype=dict(by_dtype),
        files=list(files.values()),
        packed=sorted({spec.parse(n).kind for n in ckpt.packed}),
        dense_layers=[i for i in sorted(per_layer) if i not in with_experts] if moe else [],
        shared_experts=[p.rstrip(".") for p in shared],
        globals=globals_,
        layer_blocks=blocks,
    )


def _dedupe(rows: list[TensorRow]) -> list[TensorRow]:
    """Merge identical rows (the experts of a layer) into one row with a count."""
    out: list[TensorRow] = []
    for r in rows:
        if out and (out[-1].kind, out[-1].shape, out[-1].dtype) == (r.kind, r.shape, r.dtype):
            out[-1].count += 1
        else:
            out.append(r)
    return out


_GROUP_ORDER = {"norms": 0, "attention": 1, "mlp": 2, "router": 3, "experts": 4, "other": 5}


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _list(layers: list[int]) -> str:
    """``0-2, 5``: consecutive runs as ranges."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(_ranges(r) for r in runs)


def _ranges(layers: list[int]) -> str:
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def format_summary(s: ModelSummary, all_layers: bool = False) -> str:
    """Plain-text report: header lines, then global and per-layer tensor tables."""
    from splice.dtypes import format_size

    arch = f"{s.model_type} ({', '.join(s.architectures) or 'no architectures listed'})"
    if s.arch_inferred:
        arch += " [layout inferred from tensor names]"
    experts = f"{s.num_experts} (top-{s.experts_per_token})" if s.num_experts else "none"
    if s.num_experts and s.shared_experts:
        experts += f" + shared ({', '.join(s.shared_experts)})"
    dtypes = ", ".join(f"{d} {_count(n)}" for d, n in s.params_by_dtype.items())
    lines = [
        f"model        {s.path}",
        f"architecture {arch}",
        f"layers       {s.num_layers}   hidden {s.hidden_size}   vocab {s.vocab_size}   "
        f"experts {experts}   tied embeddings {'yes' if s.tied_embeddings else 'no'}",
        f"parameters   {_count(s.num_params)} ({dtypes}), {format_size(s.nbytes)}",
        f"files        {len(s.files)}: "
        + ", ".join(
            f"{f['file']} ({format_size(f['nbytes'])}, {f['tensors']} tensors)" for f in s.files
        ),
    ]
    if s.dense_layers:
        lines.append(f"dense layers {_list(s.dense_layers)} (no routed experts)")
    if s.packed:
        lines.append(
            f"storage      experts packed ({', '.join(s.packed)}), listed below per expert; "
            "outputs use the per-expert layout"
        )
    lines.append("")
    width = max(
        [len(r.kind) for r in s.globals]
        + [len(r.kind) for b in s.layer_blocks for r in b.tensors]
        + [10]
    )
    lines.append("global tensors")
    for r in s.globals:
        lines.append(f"  {r.group:<10} {r.kind:<{width}}  {r.shape!s:<16} {r.dtype}")
    blocks = s.layer_blocks
    if all_layers:
        blocks = [LayerBlock([i], b.tensors) for b in blocks for i in b.layers]
    for b in blocks:
        n = len(b.layers)
        lines.append("")
        lines.append(
            f"layer{'s' if n > 1 else ''} {_ranges(b.layers)}"
            + (f" ({n} layers, identical)" if n > 1 else "")
            + f"   {s.layer_template}<kind>"
        )
        for r in b.tensors:
            count = f"  x{r.count}" if r.count > 1 else ""
            lines.append(f"  {r.group:<10} {r.kind:<{width}}  {r.shape!s:<16} {r.dtype}{count}")
    return "\n".join(lines)
