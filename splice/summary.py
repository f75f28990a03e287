"""What ``splice inspect`` reports: a model's shape, read from headers alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from splice.checkpoint import Checkpoint
from splice.text import plural


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
    #: where experts are stored packed: whether outputs store them packed again (splice.stored)
    packed_written: bool = False
    #: multi-token-prediction layers after the decoder layers (not in ``num_params``)
    mtp_layers: list[int] = field(default_factory=list)
    mtp_params: int = 0
    #: MoE models: layers without routed experts, and each shared expert's module prefix
    dense_layers: list[int] = field(default_factory=list)
    shared_experts: list[str] = field(default_factory=list)
    globals: list[TensorRow] = field(default_factory=list)
    layer_blocks: list[LayerBlock] = field(default_factory=list)
    #: a quantized model: its format, the quantized tensors' count, their logical dtype
    quantization: dict[str, Any] | None = None
    #: a multimodal model: its own model type and class, the language model's stored prefix,
    #: and every other module (name, prefixes, tensors, parameters, layers, config model type)
    multimodal: dict[str, Any] | None = None
    #: the config's attention and MLP shape, RoPE and context (None: the config has no such
    #: key); ``rope_theta`` is per layer type (``{"full_attention": 1e6, ...}``) where the
    #: config's RoPE parameters are, ``rope_type`` its scaling type (``default``, ``llama3``...)
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    moe_intermediate_size: int | None = None
    rope_theta: float | dict[str, float] | None = None
    rope_type: str | dict[str, str] | None = None
    max_position_embeddings: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the config keys of each shape field: transformers' spellings, the first present is read,
#: unless the architecture spec names the key (``config_keys``, :meth:`ArchSpec.config_key`)
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size", "n_inner"),
    "moe_intermediate_size": ("moe_intermediate_size", "expert_intermediate_size"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "seq_length"),
}


def _config_field(spec: Any, cfg: dict[str, Any], role: str) -> Any:
    """``role``'s value in ``cfg`` (:data:`CONFIG_FIELDS`), or None where the config has none."""
    key = spec.config_key(role, cfg)
    if key is None:
        key = next((k for k in CONFIG_FIELDS[role] if cfg.get(k) is not None), None)
    value = cfg.get(key) if key else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _rope(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """``(theta, scaling type)`` of a config: transformers 5's ``rope_parameters`` (one dict,
    or one per layer type), else ``rope_theta`` and ``rope_scaling`` (``rope_type`` / ``type``;
    none: ``default``). Either is None where the config has no RoPE fields."""

    def one(params: dict[str, Any], theta: Any) -> tuple[Any, Any]:
        theta = params.get("rope_theta", theta)
        kind = params.get("rope_type") or params.get("type")
        return (theta if isinstance(theta, (int, float)) else None), kind

    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        pairs = {k: one(v, cfg.get("rope_theta")) for k, v in params.items()}
        thetas = {k: t for k, (t, _) in pairs.items() if t is not None}
        kinds = {k: str(t) for k, (_, t) in pairs.items() if t is not None}
        return thetas or None, kinds or None
    if not isinstance(params, dict):
        params = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else {}
    theta, kind = one(params, cfg.get("rope_theta"))
    if kind is None and theta is not None:
        kind = "default"
    return theta, (str(kind) if kind is not None else None)


def summarize(ckpt: Checkpoint) -> ModelSummary:
    """Summarize a checkpoint without reading any tensor data."""
    spec, cfg = ckpt.arch, ckpt.config
    by_dtype: Counter[str] = Counter()
    files: dict[str, dict[str, Any]] = {}
    globals_: list[TensorRow] = []
    per_layer: dict[int, list[TensorRow]] = {}
    stored = [*ckpt.stored_tensors.values(), *_module_infos(ckpt)]
    for info in [p for i in stored for p in (i.quant.parts if i.quant else (i,))]:
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
        packed_written=bool(spec.experts and spec.experts.stored)
        or bool(getattr(ckpt, "stored_layouts", None)),  # a multimodal model's, as it stores them
        mtp_layers=list(spec.mtp_layers(cfg)) if ckpt.mtp else [],
        mtp_params=sum(i.numel for i in ckpt.mtp.values()),
        dense_layers=[i for i in sorted(per_layer) if i not in with_experts] if moe else [],
        shared_experts=[p.rstrip(".") for p in shared],
        globals=globals_,
        layer_blocks=blocks,
        multimodal=_multimodal(ckpt),
        quantization=_quantization(ckpt),
        **{role: _config_field(spec, cfg, role) for role in CONFIG_FIELDS},
        **dict(zip(("rope_theta", "rope_type"), _rope(cfg), strict=True)),
    )


def _quantization(ckpt: Checkpoint) -> dict[str, Any] | None:
    """A quantized checkpoint's format and what it covers (:mod:`splice.quant`)."""
    scheme = ckpt.quant_scheme
    if scheme is None:
        return None
    quantized = [i for i in ckpt.stored_tensors.values() if i.quant is not None]
    return {
        "method": scheme.method,
        "format": scheme.label,
        "block_size": list(scheme.block) if scheme.block else None,
        "tensors": len(quantized),
        "logical_dtype": quantized[0].dtype if quantized else None,
        "stored_bytes": sum(i.quant.nbytes for i in quantized if i.quant is not None),
        "unquantized": len(ckpt.stored_tensors) - len(quantized),
    }


def _module_infos(ckpt: Checkpoint) -> list[Any]:
    from splice.multimodal import LanguageModel

    return list(ckpt.module_tensors.values()) if isinstance(ckpt, LanguageModel) else []


def _multimodal(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The modules of a multimodal checkpoint (:class:`splice.multimodal.LanguageModel`)."""
    import re

    from splice.multimodal import TEXT_MODULE, LanguageModel

    if not isinstance(ckpt, LanguageModel):
        return None
    mm, layout = ckpt.mm_config, ckpt.layout
    modules = []
    for module, tensors in ckpt.modules.items():
        prefixes = sorted({p for p in layout.modules if layout.modules[p] == module
                           and any(n.startswith(p) for n in tensors)}, key=len)  # fmt: skip
        layers = {
            m.group(1) for n in tensors if (m := re.search(r"\.(?:layers|blocks)\.(\d+)\.", n))
        }
        section = mm.get(module.replace("_tower", "_config").replace("_model", "_config"))
        modules.append(
            {
                "module": module,
                "prefix": prefixes[0] if prefixes else "",
                "tensors": len(tensors),
                "params": sum(i.numel for i in tensors.values()),
                "layers": len(layers) or None,
                "model_type": section.get("model_type") if isinstance(section, dict) else None,
            }
        )
    return {
        "model_type": mm.get("model_type"),
        "architectures": list(mm.get("architectures") or []),
        "text_module": TEXT_MODULE,
        "text_prefix": layout.text[ckpt.form],
        "modules": modules,
    }


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


def _per_type(value: Any, show: Any = str) -> str:
    """A value, or one per layer type: ``1e+06 (full_attention), 10000 (sliding_attention)``."""
    if isinstance(value, dict):
        return ", ".join(f"{show(v)} ({k})" for k, v in value.items())
    return show(value)


def _shape_lines(s: ModelSummary) -> list[str]:
    """The ``attention`` / ``mlp`` / ``position`` header lines: only what the config has."""
    attn = [
        f"{label} {value}"
        for label, value in (
            ("heads", s.num_heads),
            ("kv heads", s.num_kv_heads),
            ("head dim", s.head_dim),
        )
        if value is not None
    ]
    mlp = [
        f"{label} {value}"
        for label, value in (
            ("intermediate", s.intermediate_size),
            ("experts' intermediate", s.moe_intermediate_size),
        )
        if value is not None
    ]
    position = []
    if s.rope_theta is not None:
        position.append(f"rope theta {_per_type(s.rope_theta, lambda t: f'{t:g}')}")
    if s.rope_type is not None:
        position.append(f"rope type {_per_type(s.rope_type)}")
    if s.max_position_embeddings is not None:
        position.append(f"context {s.max_position_embeddings}")
    lines = []
    for head, parts in (("attention", attn), ("mlp", mlp), ("position", position)):
        if parts:
            lines.append(f"{head:<12} " + "   ".join(parts))
    return lines


def _multimodal_lines(mm: dict[str, Any]) -> list[str]:
    """The ``multimodal`` header lines: the checkpoint's own class, then one line per module."""
    archs = ", ".join(mm["architectures"]) or "no architectures listed"
    lines = [
        f"multimodal   {mm['model_type']} ({archs}): every verb acts on the language model "
        "below and carries the other modules",
        f"  {mm['text_module']:<22} {mm['text_prefix']}*  (the language model, below)",
    ]
    for m in mm["modules"]:
        what = [plural(m["tensors"], "tensor"), f"{_count(m['params'])} parameters"]
        if m["layers"]:
            what.append(f"{m['layers']} layers")
        if m["model_type"]:
            what.append(str(m["model_type"]))
        lines.append(f"  {m['module']:<22} {m['prefix']}*  ({', '.join(what)})")
    return lines


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
            f"{f['file']} ({format_size(f['nbytes'])}, {f['tensors']} "
            f"{'tensor' if f['tensors'] == 1 else 'tensors'})"
            for f in s.files
        ),
    ]
    lines[3:3] = _shape_lines(s)  # after the layers line
    if s.dense_layers:
        lines.append(f"dense layers {_list(s.dense_layers)} (no routed experts)")
    if s.packed:
        lines.append(
            f"storage      experts packed ({', '.join(s.packed)}), listed below per expert; "
            + ("outputs store them packed again" if s.packed_written else
               "outputs use the per-expert layout")
        )  # fmt: skip
    if s.mtp_layers:
        n = len(s.mtp_layers)
        lines.append(
            f"mtp          {n} multi-token-prediction layer{'s' if n != 1 else ''} "
            f"({_list(s.mtp_layers)}, {s.mtp_params:,} parameters, not counted above): carried "
            "after the last layer by every verb but collapse and slice"
        )
    if s.quantization:
        q = s.quantization
        lines.append(
            f"quantized    {q['format']}: {plural(q['tensors'], 'tensor')} stored quantized "
            f"({format_size(q['stored_bytes'])}), read as {q['logical_dtype']}; "
            f"{plural(q['unquantized'], 'tensor')} as stored"
        )
    if s.multimodal:
        lines[1:1] = _multimodal_lines(s.multimodal)
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
