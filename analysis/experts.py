"""Experts vs dense: every expert of every layer of a MoE against the dense model's MLP at the
same layer (via ``ArchSpec.dense_kind``), expert vs expert within each layer, and each routed
expert vs the layer's shared experts where the family has them (Qwen2-MoE, DeepSeek, GLM-4-MoE,
ERNIE ...: kept apart from the routed experts, compared where their tensors have the experts'
shape, e.g. DeepSeek-V3's one shared expert). Holds one layer's experts of one kind at a
time."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.analysis.metrics import Baseline, Metric, resolve_metrics
from splice.analysis.report import SimilarityMatrix, SimilarityReport
from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.progress import progress

if TYPE_CHECKING:
    pass

from splice.analysis.common import (
    MetricNames,
    ModelRef,
    Timer,
    load_finite,
    metric_values,
    open_model,
    other_layer,
    pairwise,
    report_meta,
    short,
)
from splice.text import plural


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
            f"{moe.path} has {plural(n_moe, 'layer')} but {dense.path} has {n_dense}: experts are "
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


def _shared_names(
    ckpt: Checkpoint, experts: dict[tuple[int, str], dict[int, str]]
) -> tuple[dict[tuple[int, str], str], list[str]]:
    """``({(layer, expert kind): shared expert tensor}, skipped)``: the layer's shared-expert
    tensor of the same kind and shape (the spec's ``experts.shared`` prefixes); ``skipped``
    says which exist with another shape (a wider shared MLP: not comparable tensor to tensor)."""
    spec = ckpt.arch
    prefixes = spec.experts.shared if spec.experts is not None else ()
    out: dict[tuple[int, str], str] = {}
    skipped: list[str] = []
    for (layer, kind), names in experts.items():
        shape = ckpt.tensors[next(iter(names.values()))].shape
        for prefix in prefixes:
            name = spec.layer_name(layer, prefix + kind)
            if name not in ckpt.tensors:
                continue
            if ckpt.tensors[name].shape == shape:
                out[(layer, kind)] = name
            elif layer == min(i for i, _ in experts):
                skipped.append(
                    f"{prefix + kind} {list(ckpt.tensors[name].shape)} vs the experts' "
                    f"{list(shape)}"
                )
            break
    return out, skipped


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
    threads: int | None = None,
) -> SimilarityReport:
    """Each MoE expert vs the dense MLP at its layer (if ``dense``), and expert vs expert.

    Records (``against="dense"``): ``layer``, ``expert``, ``kind`` (expert kind), ``dense_kind``,
    ``value``, ``baseline_gaussian`` (expert vs a Gaussian of its shape and norm) and
    ``baseline_other_layer`` (expert vs the dense MLP half the depth away). Records with
    ``against="experts"`` hold each expert's mean metric to the other experts of its layer.
    Records with ``against="shared"`` compare each routed expert with its layer's shared
    experts, with the Gaussian baseline (where their tensors have the experts' shape; ``meta["shared_skipped"]`` names the
    ones that do not). Matrices: ``"{kind}/{metric}"`` layers × experts vs dense (panels),
    ``"{kind}/{metric}/shared"`` layers × experts vs the shared experts (panels), and
    ``"L{i}/{kind}/{metric}"`` experts × experts per layer (data; their mean over layers as
    ``"{kind}/{metric}/experts"``). ``threads``: CPU threads for every tensor (None: one below
    ``splice.threads.SMALL_NUMEL`` elements, torch's setting above).
    """
    start = time.perf_counter()
    ms = resolve_metrics(metrics)
    cm = open_model(moe, allow_pickle)
    experts = _expert_names(cm)
    cd = open_model(dense, allow_pickle) if dense is not None else None
    dense_names = _dense_names(cm, cd, experts) if cd is not None else {}
    shared_names, shared_skipped = _shared_names(cm, experts)
    timer = Timer()
    base = Baseline(device=device) if baselines else None
    records: list[dict[str, Any]] = []
    matrices: dict[str, SimilarityMatrix] = {}
    dense_cache: dict[tuple[Any, str], Any] = {}
    layers_of_kind: dict[str, list[int]] = {}
    for layer, kind in experts:
        layers_of_kind.setdefault(kind, []).append(layer)
    for (layer, kind), names in progress(list(experts.items()), "experts", enabled=show_progress):
        tensors = [load_finite(cm, n, device) for n in names.values()]  # one layer, one kind
        ids = list(names)
        shape = tuple(tensors[0].shape)
        applicable = [m for m in ms if m.applies(shape)]
        if cd is not None:
            dname = dense_names[(layer, kind)]
            dt = load_finite(cd, dname, device)
            j = other_layer(layer, layers_of_kind[kind])
            other = load_finite(cd, dense_names[(j, kind)], device) if j is not None else None
            for e, t in zip(ids, tensors, strict=True):
                vals = metric_values(
                    applicable, t, dt, base, timer, dense_cache, ("", dname), threads
                )
                others = (
                    metric_values(
                        [m for m in applicable if m.other_layer_baseline],
                        t,
                        other,
                        None,
                        Timer(),
                        dense_cache,
                        ("", dense_names[(j, kind)]),
                        threads,
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
        if (layer, kind) in shared_names:
            sname = shared_names[(layer, kind)]
            st = load_finite(cm, sname, device)
            for e, t in zip(ids, tensors, strict=True):
                vals = metric_values(applicable, t, st, base, timer, dense_cache, ("", sname),
                                     threads)  # fmt: skip
                for metric, (value, gauss) in vals.items():
                    records.append(
                        {
                            "layer": layer,
                            "expert": e,
                            "kind": kind,
                            "dense_kind": cm.arch.parse(sname).kind,
                            "against": "shared",
                            "metric": metric,
                            "value": value,
                            "baseline_gaussian": gauss,
                            "baseline_other_layer": None,
                        }
                    )
            del st
        for m in applicable:
            values, gauss = pairwise(m, tensors, base, timer, threads=threads)
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
        meta=report_meta(
            ms,
            device,
            start,
            timer,
            num_experts=max(len(v) for v in experts.values()),
            shared_compared=bool(shared_names),
            shared_skipped=shared_skipped,
        ),
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
            for against, suffix, what in (("dense", "", "dense"), ("shared", "/shared", "shared")):
                rs = [
                    r
                    for r in records
                    if r["kind"] == kind and r["metric"] == m.name and r["against"] == against
                ]
                if not rs:
                    continue
                rows = sorted({r["layer"] for r in rs})
                experts = sorted({r["expert"] for r in rs})
                values = np.full((len(rows), len(experts)), np.nan)
                for r in rs:
                    values[rows.index(r["layer"]), experts.index(r["expert"])] = r["value"]
                gauss = [r["baseline_gaussian"] for r in rs if r["baseline_gaussian"] is not None]
                out[f"{short(kind)}/{m.name}{suffix}"] = SimilarityMatrix(
                    f"{short(kind)} vs {what} {short(rs[0]['dense_kind'])}: {m.name}",
                    m.name,
                    values,
                    [str(i) for i in rows],
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
