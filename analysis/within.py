"""Within one model: layer i vs layer j for every pair, a layers × layers matrix per kind, and
exact duplicate layers. Holds one kind's tensors for all layers, one kind at a time."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.analysis.metrics import Baseline, resolve_metrics
from splice.analysis.report import SimilarityMatrix, SimilarityReport
from splice.progress import progress

if TYPE_CHECKING:
    pass

from splice.analysis.common import (
    MetricNames,
    ModelRef,
    Timer,
    layer_kinds,
    load_finite,
    open_model,
    pairwise,
    report_meta,
    short,
    torch_equal,
)


def compare_layers(
    model: ModelRef,
    *,
    metrics: MetricNames = None,
    device: str = "cpu",
    baselines: bool = True,
    kinds: Iterable[str] | None = None,
    show_progress: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
) -> SimilarityReport:
    """Layer i vs layer j for every pair, per tensor kind: one layers × layers matrix each.

    Matrices are keyed ``"{kind}/{metric}"`` (row i, column j: metric(layer i, layer j)).
    Records hold adjacent pairs (layer i vs i+1) with the Gaussian baseline of layer i.
    ``recommendations["identical"]`` lists pairs of layers whose tensors of a kind are bit-for-bit
    equal, and ``recommendations["duplicate_layers"]`` pairs equal in every kind. ``threads``:
    CPU threads for every tensor (None: one below ``splice.threads.SMALL_NUMEL`` elements).
    """
    start = time.perf_counter()
    ms = resolve_metrics(metrics)
    ckpt = open_model(model, allow_pickle)
    timer = Timer()
    base = Baseline(device=device) if baselines else None
    by_kind = layer_kinds(ckpt, kinds)
    records: list[dict[str, Any]] = []
    matrices: dict[str, SimilarityMatrix] = {}
    identical: dict[str, list[list[int]]] = {}
    for kind, layers in progress(list(by_kind.items()), "kinds", enabled=show_progress):
        order = list(layers)
        tensors = [load_finite(ckpt, layers[i], device) for i in order]  # one kind at a time
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
            values, gauss = pairwise(m, tensors, base, timer, threads=threads)
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
        meta=report_meta(ms, device, start, timer),
    )
