"""What a merge plan resolved, per tensor and as a compact table (``splice merge --dry-run``).

:func:`tensor_parameters` reads each planned tensor's method and parameters (slerp's ``t``,
per-model ``weight`` and ``density``, a copy's source layer and ``scale``, ...) as the executor
will use them; :func:`parameter_table` folds them into rows by layer range and tensor group (the
architecture's ``attention`` / ``mlp`` / ``norms`` / ``embed`` / ``head`` ...): the groups of a
layer with equal values share a row, and a row spans the consecutive layers with equal values,
as in ``layers 0-3  mlp  t=0.25``. :func:`format_table` and :func:`plan_json` are what the CLI
prints. Nothing here reads tensor data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from splice.arch import ArchSpec
from splice.merge.methods import METHODS, REQUIRED
from splice.merge.moe import _Noise
from splice.merge.planner import MergePlan, _MethodCall, _parameter_scopes
from splice.merge.vocab import ReindexVocab

#: where a group's rows go in the table (layers' groups in this order within a layer range)
_GROUP_ORDER = ("embed", "attention", "mlp", "experts", "router", "norms", "other")
_TRAILING = ("final_norm", "head")  # global tensors printed after the layers


@dataclass(frozen=True)
class TensorParams:
    """One output tensor as the plan makes it.

    ``method``: the merge method, ``copy`` (one source's tensor, perhaps scaled or noised) or
    ``computed`` (no source: a router, zeros; ``params["what"]`` says which). ``models``: the
    models the per-model values in ``params`` follow, in order (a copy's: its source);
    ``params``: recipe spellings (``lambda``, not ``lambda_``), per-model ones as lists.
    ``source_layer``: the layer a copy reads. ``seed``: a stochastic method's generator seed.
    """

    name: str
    layer: int | None
    group: str
    expert: int | None
    kind: str
    method: str
    models: tuple[str, ...]
    base: str | None
    params: dict[str, Any]
    source_layer: int | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models)
        return data


@dataclass(frozen=True)
class TableRow:
    """Tensors of ``what`` (groups or ``group:kind`` joined by ``,``) in ``layers`` (first,
    last; ``None``: a global tensor) that share ``method``, ``models``, ``base`` and ``params``;
    a copy's ``source_layers`` (first, last) shift with ``layers``."""

    layers: tuple[int, int] | None
    what: str
    method: str
    models: tuple[str, ...]
    base: str | None
    params: dict[str, Any]
    source_layers: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models)
        return data


def _spec(plan: MergePlan) -> ArchSpec:
    """The output's architecture (a MoE's is not its base model's), else the first model's."""
    model_type = plan.config.get("model_type")
    if model_type in ArchSpec.known():
        return ArchSpec.load(model_type)
    return next(iter(plan.models.values())).arch


def tensor_parameters(plan: MergePlan) -> list[TensorParams]:
    """Every output tensor's method and resolved parameters, in the plan's order."""
    from splice.multimodal import LanguageModel

    spec = _spec(plan)
    holder = plan.models.get(plan.tokenizer_from) if plan.tokenizer_from else None
    out = []
    for task in plan.tasks:
        parsed = spec.parse(task.name)
        compute = task.compute
        if isinstance(compute, ReindexVocab):  # embeddings / head on a merged vocabulary
            compute = compute.inner
        # a ``modules:`` recipe's vision tower or projector tensor: its module is its group
        module = holder.layout.module_of(task.name) if isinstance(holder, LanguageModel) else None
        common = dict(
            name=task.name,
            layer=None if module else parsed.layer,
            group=module or parsed.group,
            expert=None if module else parsed.expert,
            kind=parsed.kind,
        )
        if isinstance(compute, _MethodCall):
            method = compute.method
            sources = [s.model for s in task.sources]
            base = sources.pop(0) if compute.has_base else None
            params = {k.removesuffix("_"): _plain(v) for k, v in compute.kwargs.items()}
            out.append(
                TensorParams(
                    **common,
                    method=method.name,
                    models=tuple(sources),
                    base=base,
                    params=params,
                    seed=compute.seed,
                )
            )
        elif task.sources:
            src = task.sources[0]
            params = {} if task.scale == 1.0 else {"scale": task.scale}
            if isinstance(compute, _Noise):
                params["noise"] = compute.scale
            ckpt = plan.models.get(src.model)
            out.append(
                TensorParams(
                    **common,
                    method="copy",
                    models=(src.model,),
                    base=None,
                    params=params,
                    source_layer=ckpt.arch.layer_of(src.name) if ckpt is not None else None,
                )
            )
        else:
            out.append(
                TensorParams(
                    **common, method="computed", models=(), base=None, params={"what": task.label}
                )
            )
    return out


def _plain(value: Any) -> Any:
    """A parameter value as JSON data (lists for per-model values)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _values_key(t: TensorParams) -> tuple[Any, ...]:
    """What must agree for tensors to share a row (a copy's source layer relative to its own,
    so that ``layers 0-3 from=math:4-7`` is one row)."""
    shift = None
    if t.source_layer is not None and t.layer is not None:
        shift = t.source_layer - t.layer
    return (t.method, t.models, t.base, _frozen(t.params), shift)


def _unit(t: TensorParams) -> str:
    return f"expert {t.expert}" if t.group == "experts" and t.expert is not None else t.group


def _rank(what: str) -> tuple[int, int, str]:
    first = what.split(",")[0].split(":")[0]
    if first.startswith("expert "):
        return (_GROUP_ORDER.index("experts"), int(first.split()[1]), what)
    group = first if first in _GROUP_ORDER else "other"
    return (_GROUP_ORDER.index(group), 0, what)


def parameter_table(plan: MergePlan | Sequence[TensorParams]) -> list[TableRow]:
    """The plan's tensors folded into rows (see the module docstring): global tensors one row
    per group, then layer ranges in order, the groups of each range in ``_GROUP_ORDER``."""
    tensors = tensor_parameters(plan) if isinstance(plan, MergePlan) else list(plan)
    # per layer (None: global tensors): unit (a group, an expert; group:kind where the group's
    # tensors disagree) -> values key and one of its tensors
    by_layer: dict[int | None, dict[str, list[TensorParams]]] = {}
    for t in tensors:
        by_layer.setdefault(t.layer, {}).setdefault(_unit(t), []).append(t)
    cells: dict[int | None, list[tuple[str, TensorParams]]] = {}
    for layer, units in by_layer.items():
        parts: list[tuple[str, TensorParams]] = []
        for unit, members in units.items():
            if len({_values_key(m) for m in members}) == 1:
                parts.append((unit, members[0]))
            else:
                parts += [(f"{unit}:{m.kind}", m) for m in members]
        if layer is not None:  # a layer's units with equal values share a row
            joined: dict[tuple[Any, ...], tuple[list[str], TensorParams]] = {}
            for what, t in sorted(parts, key=lambda p: _rank(p[0])):
                joined.setdefault(_values_key(t), ([], t))[0].append(what)
            parts = [(",".join(names), t) for names, t in joined.values()]
        cells[layer] = parts
    rows: list[TableRow] = []
    leading = [(w, t) for w, t in cells.get(None, []) if t.group not in _TRAILING]
    trailing = [(w, t) for w, t in cells.get(None, []) if t.group in _TRAILING]
    rows += [_row(None, w, t) for w, t in sorted(leading, key=lambda p: _rank(p[0]))]
    open_rows: dict[tuple[str, tuple[Any, ...]], int] = {}  # (what, values) -> index in rows
    for layer in sorted(k for k in cells if k is not None):
        still_open = {}
        for what, t in cells[layer]:
            key = (what, _values_key(t))
            i = open_rows.get(key)
            prev = rows[i] if i is not None else None
            if prev is not None and prev.layers is not None and prev.layers[1] == layer - 1:
                rows[i] = _extend(prev)
                still_open[key] = i
            else:
                rows.append(_row(layer, what, t))
                still_open[key] = len(rows) - 1
        open_rows = still_open
    body = [r for r in rows if r.layers is not None]
    body.sort(key=lambda r: (r.layers[0], _rank(r.what)))  # type: ignore[index]
    head = [r for r in rows if r.layers is None]
    order = {g: i for i, g in enumerate(_TRAILING)}
    tail = [_row(None, w, t) for w, t in sorted(trailing, key=lambda p: order[p[1].group])]
    return head + body + tail


def _row(layer: int | None, what: str, t: TensorParams) -> TableRow:
    src = None if t.source_layer is None else (t.source_layer, t.source_layer)
    return TableRow(
        None if layer is None else (layer, layer),
        what,
        t.method,
        t.models,
        t.base,
        t.params,
        src if layer is not None else None,
    )


def _extend(row: TableRow) -> TableRow:
    assert row.layers is not None
    src = row.source_layers
    return TableRow(
        (row.layers[0], row.layers[1] + 1),
        row.what,
        row.method,
        row.models,
        row.base,
        row.params,
        None if src is None else (src[0], src[1] + 1),
    )


# ---- printing ---------------------------------------------------------------------------------
def short_names(refs: Iterable[str]) -> dict[str, str]:
    """Each model reference's folder name, or the reference itself where two share a name."""
    refs = list(dict.fromkeys(refs))
    names = {r: Path(r).name or r for r in refs}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {r: (r if n in clash else n) for r, n in names.items()}


def _number(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def _shown(plan: MergePlan, rows: Sequence[TableRow]) -> tuple[set[str], bool, bool]:
    """Which global parameters the table shows (those the recipe sets, required ones and any
    that differ from the method's default), and whether rows need their method and base."""
    named = {k for _, params in _parameter_scopes(plan.recipe) for k in params}
    methods = {r.method for r in rows}
    bases = {r.base for r in rows if r.method not in ("copy", "computed")}
    return named, len(methods) > 1, len(bases) > 1


def _values(row: TableRow, names: dict[str, str], named: set[str], method: bool, base: bool) -> str:
    parts = [row.method] if method else []
    if row.method == "copy":
        src = names[row.models[0]]
        if row.source_layers is not None:
            src += ":" + _span(*row.source_layers)
        parts.append(f"from={src}")
        parts += [f"{k}={_number(v)}" for k, v in row.params.items()]
        return " ".join(parts)
    if row.method == "computed":
        return " ".join([*parts, str(row.params.get("what", ""))])
    if base and row.base is not None:
        parts.append(f"base={names[row.base]}")
    m = METHODS.get(row.method) if row.method in METHODS else None
    for key, value in row.params.items():
        if isinstance(value, list):  # per model
            if len(set(map(_frozen, value))) == 1:
                parts.append(f"{key}={_number(value[0])}")
            else:
                each = ",".join(
                    f"{names[ref]}:{_number(v)}" for ref, v in zip(row.models, value, strict=True)
                )
                parts.append(f"{key}={each}")
            continue
        default = m.global_params.get(key, REQUIRED) if m is not None else REQUIRED
        if key in named or default is REQUIRED or value != default:
            parts.append(f"{key}={_number(value)}")
    return " ".join(parts)


def format_table(plan: MergePlan, rows: Sequence[TableRow] | None = None) -> str:
    """``parameter_table(plan)`` as aligned text, with a legend of the models' short names."""
    rows = parameter_table(plan) if rows is None else rows
    refs = [r for row in rows for r in (*row.models, *([row.base] if row.base else []))]
    names = short_names(refs)
    named, method, base = _shown(plan, rows)
    methods = sorted({r.method for r in rows} - {"copy", "computed"})
    bases = sorted({names[r.base] for r in rows if r.base})
    title = "resolved parameters"
    if methods and not method:
        title += f" ({methods[0]}" + (f", base {bases[0]}" if len(bases) == 1 else "") + ")"
    lines = [title + ":"]
    legend = [f"{n} = {r}" for r, n in names.items() if n != r]
    if legend:
        lines.append("  models: " + ", ".join(legend))
    if any(m in METHODS and METHODS.get(m).stochastic for m in methods):
        lines.append(
            f"  seed {plan.seed}: each tensor's generator is seeded from it and the "
            "tensor's name (--json lists them)"
        )
    cols = [
        (
            "-"
            if r.layers is None
            else ("layer " if r.layers[0] == r.layers[1] else "layers ") + _span(*r.layers),
            r.what,
            _values(r, names, named, method, base),
        )
        for r in rows
    ]
    w0 = max(len(c[0]) for c in cols) if cols else 0
    w1 = max(len(c[1]) for c in cols) if cols else 0
    lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in cols]
    return "\n".join(lines)


def describe(plan: MergePlan) -> str:
    """``splice merge --dry-run``'s text: the plan's tensors, then the parameter table."""
    return plan.describe() + "\n" + format_table(plan)


def plan_json(plan: MergePlan) -> dict[str, Any]:
    """``splice merge --dry-run --json``: the output's layers and tensor count, the table's
    rows and every tensor's resolved parameters."""
    tensors = tensor_parameters(plan)
    return {
        "method": plan.recipe.merge_method,
        "layers": plan.config.get("num_hidden_layers"),
        "tensors": [
            {**t.to_dict(), "shape": list(task.shape), "dtype": task.dtype}
            for t, task in zip(tensors, plan.tasks, strict=True)
        ],
        "rows": [r.to_dict() for r in parameter_table(tensors)],
    }
