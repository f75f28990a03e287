"""Weight similarities, streaming tensor by tensor over lazy checkpoints.

Three comparisons, each returning a :class:`~splice.analysis.report.SimilarityReport`:

- :func:`compare_models`: A vs B with one architecture, layer i vs layer i, per tensor kind.
  Holds two tensors at a time (plus cached spectra), never two models.
- :func:`compare_layers`: within one model, layer i vs layer j for every pair, a layers ×
  layers matrix per kind. Holds one kind's tensors for all layers, one kind at a time.
- :func:`compare_experts`: every expert of every layer of a MoE against the dense model's MLP
  at the same layer, and expert vs expert within each layer. Holds one layer's experts of one
  kind at a time.

Every value comes with its null baseline: the metric between the first tensor and a Gaussian
matrix of its shape and Frobenius norm (``baseline_gaussian``) and, across models and for
experts, against an unrelated layer ``(i + L // 2) % L`` (``baseline_other_layer``).

Model folders with pickled ``.bin`` weights are opened only with ``allow_pickle=True``
(``torch.load(weights_only=True)``). A tensor holding NaN or inf is a :class:`SpliceError`
naming it (its metrics would be NaN, and the spectra's eigensolver fails on it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.activations import check_finite
from splice.analysis.metrics import Baseline, Metric, flat, nbytes_of, resolve_metrics
from splice.analysis.report import SimilarityMatrix, SimilarityReport
from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.progress import progress

if TYPE_CHECKING:
    import torch

ModelRef = str | os.PathLike[str] | Checkpoint
MetricNames = str | Sequence[str] | None


def _open(ref: ModelRef, allow_pickle: bool = False) -> Checkpoint:
    return ref if isinstance(ref, Checkpoint) else open_checkpoint(ref, allow_pickle=allow_pickle)


def _load(ckpt: Checkpoint, name: str, device: str) -> torch.Tensor:
    """``ckpt.load(name)`` on ``device``; ``SpliceError`` naming the tensor if it holds NaN or
    inf (every metric would be NaN, and the spectra's eigensolver fails on them)."""
    t = ckpt.load(name, device=device)
    check_finite(t, f"{ckpt.path}: {name}")
    return t


def short(kind: str) -> str:
    """``self_attn.q_proj.weight`` -> ``self_attn.q_proj`` (labels for plots)."""
    return kind.removesuffix(".weight")


def other_layer(i: int, layers: Sequence[int]) -> int | None:
    """An unrelated layer for layer ``i``: half the depth away (cyclically), None if one layer."""
    if len(layers) < 2:
        return None
    pos = layers.index(i)
    return layers[(pos + len(layers) // 2) % len(layers)]


class _Timer:
    """Seconds spent per metric (features + comparisons), for the report's ``meta``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _metric_values(
    metrics: list[Metric],
    a: torch.Tensor,
    b: torch.Tensor | Callable[[], torch.Tensor],
    baseline: Baseline | None,
    timer: _Timer,
    cache: dict[tuple[Any, str], Any] | None = None,
    keys: tuple[str, str] = ("", ""),
) -> dict[str, tuple[float, float | None]]:
    """``{metric: (value(a, b), gaussian baseline of a)}`` for the metrics that apply.

    ``b`` may be a function that loads it: it is then read only after ``a``'s Gaussian baseline
    is done and its Gaussian freed, so ``a``, ``b`` and a Gaussian never coexist. Metrics with
    one ``features`` function (cosine and both Frobenius: the flattened tensor) share each
    tensor's features; ``cache`` memoises small ones under ``(features, key)``.
    """
    shape = tuple(a.shape)
    todo = [m for m in metrics if m.applies(shape)]
    fa: dict[Any, Any] = {}
    for m in todo:
        t = time.perf_counter()
        if m.features not in fa:
            fa[m.features] = _features(m, a, cache, keys[0])
        timer.add(m.name, t)
    bases: dict[str, float] = {}
    if baseline is not None and todo:
        t = time.perf_counter()
        bases = baseline.values(todo, a, fa)
        timer.add("baseline_gaussian", t)
    tb = b() if callable(b) else b
    fb: dict[Any, Any] = {}
    values: dict[str, float] = {}
    for m in todo:
        t = time.perf_counter()
        if m.features not in fb:
            fb[m.features] = _features(m, tb, cache, keys[1])
        values[m.name] = m.compare(fa[m.features], fb[m.features])
        timer.add(m.name, t)
    return {name: (v, bases.get(name)) for name, v in values.items()}


def _features(m: Metric, t: torch.Tensor, cache: dict | None, key: str) -> Any:
    """``m.features(t)``, memoised in ``cache`` under ``(features, key)`` for the small features
    the other-layer baselines reuse (spectra); CKA's Gram matrices are never kept."""
    if cache is None or not key or not m.small_features or not m.other_layer_baseline:
        return m.features(t)
    k = (m.features, key)
    if k not in cache:
        cache[k] = m.features(t)
    return cache[k]


def _layer_kinds(ckpt: Checkpoint, only: Sequence[str] | None = None) -> dict[str, dict[int, str]]:
    """``{kind: {layer: tensor name}}`` for the non-expert per-layer tensors, in file order;
    ``only`` keeps the kinds named there (full or short names)."""
    kinds: dict[str, dict[int, str]] = {}
    for name in ckpt.tensors:
        t = ckpt.arch.parse(name)
        if t.layer is not None and t.expert is None:
            kinds.setdefault(t.kind, {})[t.layer] = name
    only = [k for k in only if k] if only is not None else None
    wanted = set(only) if only is not None else None
    if only is not None:
        if not only:
            raise SpliceError("--kinds names no tensor kind")
        known = [short(k) for k in kinds]
        unknown = [k for k in only if k not in kinds and k not in known]
        if unknown:
            raise SpliceError(
                f"{ckpt.path}: no tensor kind {unknown[0]!r}; choose from: {', '.join(known)}"
            )
    return {
        k: dict(sorted(v.items()))
        for k, v in kinds.items()
        if wanted is None or k in wanted or short(k) in wanted
    }


def _check_same_arch(a: Checkpoint, b: Checkpoint) -> None:
    ta, tb = a.arch.model_type, b.arch.model_type
    if ta != tb:
        raise SpliceError(
            f"{b.path} is {tb} but {a.path} is {ta}: an across-models comparison needs one "
            "architecture (use `splice analyze experts` for a MoE against a dense model)"
        )
    missing = [n for n in a.tensors if n not in b.tensors]
    extra = [n for n in b.tensors if n not in a.tensors]
    if missing or extra:
        example = (missing or extra)[0]
        where = b.path if missing else a.path
        raise SpliceError(
            f"{a.path} and {b.path} differ in their tensors ({len(missing)} missing, "
            f"{len(extra)} extra; e.g. {example!r} is not in {where}): same architecture, "
            "different shape or depth"
        )
    for name, info in a.tensors.items():
        if b.tensors[name].shape != info.shape:
            raise SpliceError(
                f"{name} has shape {list(info.shape)} in {a.path} but "
                f"{list(b.tensors[name].shape)} in {b.path}"
            )


def compare_models(
    a: ModelRef,
    b: ModelRef,
    *,
    metrics: MetricNames = None,
    device: str = "cpu",
    baselines: bool = True,
    kinds: Iterable[str] | None = None,
    include_globals: bool = True,
    show_progress: bool = False,
    allow_pickle: bool = False,
) -> SimilarityReport:
    """Compare two checkpoints of one architecture tensor by tensor (layer i vs layer i).

    Records: one per tensor and metric with ``tensor``, ``kind``, ``group``, ``layer``, ``value``,
    ``baseline_gaussian`` (A vs a Gaussian of A's shape and norm) and ``baseline_other_layer``
    (A's layer i vs B's layer ``(i + L//2) % L``). Matrices: one ``layers × kinds`` per metric.
    ``kinds`` restricts the comparison to those layer-relative kinds.
    """
    start = time.perf_counter()
    ms = resolve_metrics(metrics)
    ca, cb = _open(a, allow_pickle), _open(b, allow_pickle)
    _check_same_arch(ca, cb)
    timer = _Timer()
    base = Baseline(device=device) if baselines else None
    by_kind = _layer_kinds(ca, kinds)
    records: list[dict[str, Any]] = []
    jobs = [(kind, layer, name) for kind, ls in by_kind.items() for layer, name in ls.items()]
    if include_globals and kinds is None:
        jobs += [
            (name, None, name)
            for name in ca.tensors
            if ca.arch.parse(name).layer is None and name in cb.tensors
        ]
    cache: dict[tuple[Any, str], Any] = {}
    for kind, layer, name in progress(jobs, "compare", enabled=show_progress):
        ta = _load(ca, name, device)
        values = _metric_values(
            ms,
            ta,
            lambda name=name: _load(cb, name, device),
            base,
            timer,
            cache,
            (f"A:{name}", f"B:{name}"),
        )
        del ta
        for metric, (value, gauss) in values.items():
            records.append(
                {
                    "tensor": name,
                    "kind": kind,
                    "group": ca.arch.parse(name).group,
                    "layer": layer,
                    "metric": metric,
                    "value": value,
                    "baseline_gaussian": gauss,
                    "baseline_other_layer": None,
                }
            )
    if baselines:
        _other_layer_baselines(ca, cb, ms, by_kind, records, cache, device, timer, show_progress)
    matrices = {}
    for m in ms:
        mat = _layers_by_kinds(records, m.name, by_kind)
        if mat is not None:
            matrices[m.name] = mat
    return SimilarityReport(
        "weights",
        [str(ca.path), str(cb.path)],
        records,
        matrices,
        meta={
            "metrics": [m.name for m in ms],
            "device": str(device),
            "seconds": time.perf_counter() - start,
            "seconds_per_metric": timer.seconds,
            "descriptions": {m.name: m.description for m in ms},
        },
    )


def _other_layer_baselines(
    ca: Checkpoint,
    cb: Checkpoint,
    ms: list[Metric],
    by_kind: dict[str, dict[int, str]],
    records: list[dict[str, Any]],
    cache: dict[tuple[Any, str], Any],
    device: str,
    timer: _Timer,
    show_progress: bool,
) -> None:
    """Fill ``baseline_other_layer``: A's layer i vs B's layer ``(i + L//2) % L``.

    Spectra come from the cache filled by the main pass; flattened metrics reload both tensors.
    Metrics with ``other_layer_baseline=False`` (CKA) are skipped (left None).
    """
    index = {(r["tensor"], r["metric"]): r for r in records}
    jobs = []
    for layers in by_kind.values():
        order = list(layers)
        for i, name in layers.items():
            j = other_layer(i, order)
            if j is not None:
                jobs.append((name, layers[j]))
    big = [m for m in ms if not m.small_features and m.other_layer_baseline]
    small = [m for m in ms if m.small_features and m.other_layer_baseline]
    for name_a, name_b in progress(jobs, "baselines", enabled=show_progress):
        shape = tuple(ca.tensors[name_a].shape)
        t = time.perf_counter()
        for m in small:
            fa, fb = cache.get((m.features, f"A:{name_a}")), cache.get((m.features, f"B:{name_b}"))
            if m.applies(shape) and fa is not None and fb is not None:
                index[(name_a, m.name)]["baseline_other_layer"] = m.compare(fa, fb)
        todo = [m for m in big if m.applies(shape)]
        if todo:
            ta, tb = ca.load(name_a, device=device), cb.load(name_b, device=device)
            for m, (value, _) in _metric_values(todo, ta, tb, None, _Timer()).items():
                index[(name_a, m)]["baseline_other_layer"] = value
            del ta, tb
        timer.add("baseline_other_layer", t)


def _layers_by_kinds(
    records: list[dict[str, Any]], metric: str, by_kind: dict[str, dict[int, str]]
) -> SimilarityMatrix | None:
    """``[layers, kinds]`` matrix of one metric from per-tensor records (NaN where absent)."""
    rs = [r for r in records if r["metric"] == metric and r["layer"] is not None]
    if not rs:
        return None
    layers = sorted({r["layer"] for r in rs})
    kinds = [k for k in by_kind if any(r["kind"] == k for r in rs)]
    values = np.full((len(layers), len(kinds)), np.nan)
    for r in rs:
        values[layers.index(r["layer"]), kinds.index(r["kind"])] = r["value"]
    gauss = [r["baseline_gaussian"] for r in rs if r["baseline_gaussian"] is not None]
    return SimilarityMatrix(
        f"{metric} per layer and kind",
        metric,
        values,
        [str(i) for i in layers],
        [short(k) for k in kinds],
        "layer",
        "kind",
        float(np.nanmean(gauss)) if gauss else None,
    )


# ---- within one model ---------------------------------------------------------------------------
def compare_layers(
    model: ModelRef,
    *,
    metrics: MetricNames = None,
    device: str = "cpu",
    baselines: bool = True,
    kinds: Iterable[str] | None = None,
    show_progress: bool = False,
    allow_pickle: bool = False,
) -> SimilarityReport:
    """Layer i vs layer j for every pair, per tensor kind: one layers × layers matrix each.

    Matrices are keyed ``"{kind}/{metric}"`` (row i, column j: metric(layer i, layer j)).
    Records hold adjacent pairs (layer i vs i+1) with the Gaussian baseline of layer i.
    ``recommendations["identical"]`` lists pairs of layers whose tensors of a kind are bit-for-bit
    equal, and ``recommendations["duplicate_layers"]`` pairs equal in every kind.
    """
    start = time.perf_counter()
    ms = resolve_metrics(metrics)
    ckpt = _open(model, allow_pickle)
    timer = _Timer()
    base = Baseline(device=device) if baselines else None
    by_kind = _layer_kinds(ckpt, kinds)
    records: list[dict[str, Any]] = []
    matrices: dict[str, SimilarityMatrix] = {}
    identical: dict[str, list[list[int]]] = {}
    for kind, layers in progress(list(by_kind.items()), "kinds", enabled=show_progress):
        order = list(layers)
        tensors = [_load(ckpt, layers[i], device) for i in order]  # one kind at a time
        shape = tuple(tensors[0].shape)
        identical[short(kind)] = [
            [order[i], order[j]]
            for i in range(len(order))
            for j in range(i + 1, len(order))
            if torch_equal(tensors[i], tensors[j])
        ]
        for m in ms:
            if not m.applies(shape):
                continue
            values, gauss = _pairwise(m, tensors, base, timer)
            key = f"{short(kind)}/{m.name}"
            labels = [str(i) for i in order]
            matrices[key] = SimilarityMatrix(
                f"{short(kind)}: {m.name}",
                m.name,
                values,
                labels,
                labels,
                baseline_gaussian=float(np.nanmean(gauss)) if gauss else None,
            )
            for p in range(len(order) - 1):
                records.append(
                    {
                        "kind": kind,
                        "layer": order[p],
                        "other": order[p + 1],
                        "metric": m.name,
                        "value": float(values[p, p + 1]),
                        "baseline_gaussian": gauss[p] if gauss else None,
                    }
                )
        del tensors
    kinds_list = [short(k) for k in by_kind]
    pairs = {tuple(p) for k in kinds_list for p in identical.get(k, [])}
    duplicates = sorted(
        [list(p) for p in pairs if all(list(p) in identical[k] for k in kinds_list)]
    )
    return SimilarityReport(
        "within",
        [str(ckpt.path)],
        records,
        matrices,
        recommendations={
            "duplicate_layers": duplicates,
            "identical": {k: v for k, v in identical.items() if v},
        },
        meta={
            "metrics": [m.name for m in ms],
            "device": str(device),
            "seconds": time.perf_counter() - start,
            "seconds_per_metric": timer.seconds,
            "descriptions": {m.name: m.description for m in ms},
        },
    )


def torch_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return bool(a.shape == b.shape and torch.equal(a, b))


def _pairwise(
    m: Metric,
    tensors: list[torch.Tensor],
    base: Baseline | None,
    timer: _Timer,
    budget: int = 512 * 2**20,
) -> tuple[np.ndarray, list[float]]:
    """``[n, n]`` metric matrix over ``tensors`` and each tensor's Gaussian baseline ``[n]``.

    Each tensor's features are computed once and kept (flattened features are views; spectra
    are small) unless they would pass ``budget`` bytes, then once per row and per column.
    """
    t0 = time.perf_counter()
    n = len(tensors)
    fits = [m.applies(tuple(t.shape)) for t in tensors]
    keep = m.small_features or m.features is flat
    feats: list[Any] = [None] * n
    if not keep and any(fits):
        first = m.features(tensors[fits.index(True)])
        keep = n * nbytes_of(first) <= budget
    if keep:
        feats = [m.features(t) if ok else None for t, ok in zip(tensors, fits, strict=True)]
    values = np.full((n, n), np.nan)
    gauss: list[float] = []
    for i in range(n):
        if not fits[i]:
            if base is not None:
                gauss.append(float("nan"))
            continue
        fi = feats[i] if keep else m.features(tensors[i])
        if base is not None:
            gauss.append(base(m, tensors[i], fi))
        for j in range(n):
            if m.symmetric and j < i:
                values[i, j] = values[j, i]
                continue
            if tensors[i].shape != tensors[j].shape:
                continue  # e.g. a layer with another width: no comparison (NaN)
            fj = feats[j] if keep else (fi if j == i else m.features(tensors[j]))
            values[i, j] = m.compare(fi, fj)
    timer.add(m.name, t0)
    return values, gauss


# ---- MoE experts ----------------------------------------------------------------------------------
def _expert_names(ckpt: Checkpoint) -> dict[tuple[int, str], dict[int, str]]:
    """``{(layer, expert kind): {expert: tensor name}}``; SpliceError if there are no experts."""
    out: dict[tuple[int, str], dict[int, str]] = {}
    if ckpt.arch.experts is not None:
        for name in ckpt.tensors:
            t = ckpt.arch.parse(name)
            if t.expert is not None and t.layer is not None:
                out.setdefault((t.layer, t.kind), {})[t.expert] = name
    if not out:
        raise SpliceError(
            f"{ckpt.path} is a dense {ckpt.arch.model_type} model with no experts: an expert "
            "analysis needs a MoE (e.g. Mixtral) first, then optionally its dense model"
        )
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def _dense_names(
    moe: Checkpoint, dense: Checkpoint, experts: dict[tuple[int, str], dict[int, str]]
) -> dict[tuple[int, str], str]:
    """``{(layer, expert kind): dense tensor name}`` via ``ArchSpec.dense_kind``."""
    if dense.arch.experts is not None and _has_experts(dense):
        raise SpliceError(
            f"{dense.path} is itself a MoE ({dense.arch.model_type}); give the dense model "
            "the experts may have been up-cycled from"
        )
    spec = moe.arch.experts
    assert spec is not None
    n_moe, n_dense = moe.num_layers, dense.num_layers
    if n_moe != n_dense:
        raise SpliceError(
            f"{moe.path} has {n_moe} layers but {dense.path} has {n_dense}: experts are "
            "compared with the dense MLP at the same layer"
        )
    out: dict[tuple[int, str], str] = {}
    for layer, kind in experts:
        name = dense.arch.layer_name(layer, moe.arch.dense_kind(kind))
        if name not in dense.tensors:
            raise SpliceError(
                f"{dense.path}: no {name!r} to compare with expert {kind!r} of layer {layer} "
                f"(is it a dense {spec.dense_model_type or 'model'} of the same family?)"
            )
        shape_e = moe.tensors[next(iter(experts[(layer, kind)].values()))].shape
        if dense.tensors[name].shape != shape_e:
            raise SpliceError(
                f"{name} has shape {list(dense.tensors[name].shape)} in {dense.path} but the "
                f"experts' {kind} has {list(shape_e)}"
            )
        out[(layer, kind)] = name
    return out


def _has_experts(ckpt: Checkpoint) -> bool:
    return any(ckpt.arch.parse(n).expert is not None for n in ckpt.tensors)


def compare_experts(
    moe: ModelRef,
    dense: ModelRef | None = None,
    *,
    metrics: MetricNames = None,
    device: str = "cpu",
    baselines: bool = True,
    show_progress: bool = False,
    allow_pickle: bool = False,
) -> SimilarityReport:
    """Each MoE expert vs the dense MLP at its layer (if ``dense``), and expert vs expert.

    Records (``against="dense"``): ``layer``, ``expert``, ``kind`` (expert kind), ``dense_kind``,
    ``value``, ``baseline_gaussian`` (expert vs a Gaussian of its shape and norm) and
    ``baseline_other_layer`` (expert vs the dense MLP half the depth away). Records with
    ``against="experts"`` hold each expert's mean metric to the other experts of its layer.
    Matrices: ``"{kind}/{metric}"`` layers × experts vs dense (panels), and
    ``"L{i}/{kind}/{metric}"`` experts × experts per layer (data; their mean over layers as
    ``"{kind}/{metric}/experts"``).
    """
    start = time.perf_counter()
    ms = resolve_metrics(metrics)
    cm = _open(moe, allow_pickle)
    experts = _expert_names(cm)
    cd = _open(dense, allow_pickle) if dense is not None else None
    dense_names = _dense_names(cm, cd, experts) if cd is not None else {}
    timer = _Timer()
    base = Baseline(device=device) if baselines else None
    records: list[dict[str, Any]] = []
    matrices: dict[str, SimilarityMatrix] = {}
    dense_cache: dict[tuple[Any, str], Any] = {}
    layers_of_kind: dict[str, list[int]] = {}
    for layer, kind in experts:
        layers_of_kind.setdefault(kind, []).append(layer)
    for (layer, kind), names in progress(list(experts.items()), "experts", enabled=show_progress):
        tensors = [_load(cm, n, device) for n in names.values()]  # one layer, one kind
        ids = list(names)
        shape = tuple(tensors[0].shape)
        applicable = [m for m in ms if m.applies(shape)]
        if cd is not None:
            dname = dense_names[(layer, kind)]
            dt = _load(cd, dname, device)
            j = other_layer(layer, layers_of_kind[kind])
            other = _load(cd, dense_names[(j, kind)], device) if j is not None else None
            for e, t in zip(ids, tensors, strict=True):
                vals = _metric_values(applicable, t, dt, base, timer, dense_cache, ("", dname))
                others = (
                    _metric_values(
                        [m for m in applicable if m.other_layer_baseline],
                        t,
                        other,
                        None,
                        _Timer(),
                        dense_cache,
                        ("", dense_names[(j, kind)]),
                    )
                    if other is not None
                    else {}
                )
                for metric, (value, gauss) in vals.items():
                    records.append(
                        {
                            "layer": layer,
                            "expert": e,
                            "kind": kind,
                            "dense_kind": cd.arch.parse(dname).kind,
                            "against": "dense",
                            "metric": metric,
                            "value": value,
                            "baseline_gaussian": gauss,
                            "baseline_other_layer": others[metric][0] if metric in others else None,
                        }
                    )
            del dt, other
        for m in applicable:
            values, gauss = _pairwise(m, tensors, base, timer)
            labels = [f"e{e}" for e in ids]
            matrices[f"L{layer}/{short(kind)}/{m.name}"] = SimilarityMatrix(
                f"layer {layer} {short(kind)}: {m.name} expert vs expert",
                m.name,
                values,
                labels,
                labels,
                "expert",
                "expert",
                float(np.nanmean(gauss)) if gauss else None,
                panel=False,
            )
            off = ~np.eye(len(ids), dtype=bool)
            for p, e in enumerate(ids):
                records.append(
                    {
                        "layer": layer,
                        "expert": e,
                        "kind": kind,
                        "dense_kind": None,
                        "against": "experts",
                        "metric": m.name,
                        "value": float(values[p][off[p]].mean()) if len(ids) > 1 else None,
                        "baseline_gaussian": gauss[p] if gauss else None,
                        "baseline_other_layer": None,
                    }
                )
        del tensors
    matrices.update(_expert_panels(records, matrices, ms, layers_of_kind))
    return SimilarityReport(
        "experts",
        [str(cm.path)] + ([str(cd.path)] if cd is not None else []),
        records,
        matrices,
        meta={
            "metrics": [m.name for m in ms],
            "device": str(device),
            "seconds": time.perf_counter() - start,
            "seconds_per_metric": timer.seconds,
            "descriptions": {m.name: m.description for m in ms},
            "num_experts": max(len(v) for v in experts.values()),
        },
    )


def _expert_panels(
    records: list[dict[str, Any]],
    per_layer: dict[str, SimilarityMatrix],
    ms: list[Metric],
    layers_of_kind: dict[str, list[int]],
) -> dict[str, SimilarityMatrix]:
    """Plot panels: layers × experts vs dense, and the expert × expert matrix averaged over layers."""
    out: dict[str, SimilarityMatrix] = {}
    for kind, layers in layers_of_kind.items():
        for m in ms:
            rs = [
                r
                for r in records
                if r["kind"] == kind and r["metric"] == m.name and r["against"] == "dense"
            ]
            if rs:
                experts = sorted({r["expert"] for r in rs})
                values = np.full((len(layers), len(experts)), np.nan)
                for r in rs:
                    values[layers.index(r["layer"]), experts.index(r["expert"])] = r["value"]
                gauss = [r["baseline_gaussian"] for r in rs if r["baseline_gaussian"] is not None]
                dense_kind = short(rs[0]["dense_kind"])
                out[f"{short(kind)}/{m.name}"] = SimilarityMatrix(
                    f"{short(kind)} vs dense {dense_kind}: {m.name}",
                    m.name,
                    values,
                    [str(i) for i in layers],
                    [f"e{e}" for e in experts],
                    "layer",
                    "expert",
                    float(np.nanmean(gauss)) if gauss else None,
                )
            mats = [per_layer.get(f"L{i}/{short(kind)}/{m.name}") for i in layers]
            mats = [x for x in mats if x is not None]
            if mats and all(x.values.shape == mats[0].values.shape for x in mats):
                gauss = [x.baseline_gaussian for x in mats if x.baseline_gaussian is not None]
                out[f"{short(kind)}/{m.name}/experts"] = SimilarityMatrix(
                    f"{short(kind)}: {m.name} expert vs expert (mean over layers)",
                    m.name,
                    np.mean([x.values for x in mats], axis=0),
                    mats[0].rows,
                    mats[0].cols,
                    "expert",
                    "expert",
                    float(np.nanmean(gauss)) if gauss else None,
                )
    return out
