"""Across models: A vs B with one architecture, layer i vs layer i, per tensor kind.

Holds two tensors at a time (plus cached spectra), never two models. The null baselines are a
Gaussian of A's shape and norm, and A's layer i against B's unrelated layer ``(i + L // 2) % L``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from splice.analysis.metrics import Baseline, Metric, resolve_metrics
from splice.analysis.report import SimilarityReport
from splice.checkpoint import Checkpoint
from splice.progress import progress
from splice.threads import threads_for

if TYPE_CHECKING:
    pass

from splice.analysis.common import (
    MetricNames,
    ModelRef,
    Timer,
    check_same_arch,
    layer_kinds,
    layers_by_kinds,
    load_finite,
    metric_values,
    open_model,
    other_layer,
    report_meta,
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
    threads: int | None = None,
) -> SimilarityReport:
    """Compare two checkpoints of one architecture tensor by tensor (layer i vs layer i).

    Records: one per tensor and metric with ``tensor``, ``kind``, ``group``, ``layer``, ``value``,
    ``baseline_gaussian`` (A vs a Gaussian of A's shape and norm) and ``baseline_other_layer``
    (A's layer i vs B's layer ``(i + L//2) % L``). Matrices: one ``layers × kinds`` per metric.
    ``kinds`` restricts the comparison to those layer-relative kinds. ``threads``: CPU threads
    for every tensor (None: one below ``splice.threads.SMALL_NUMEL`` elements, torch's setting above).
    """
    start = time.perf_counter()
    ms = resolve_metrics(metrics)
    ca, cb = open_model(a, allow_pickle), open_model(b, allow_pickle)
    check_same_arch(ca, cb)
    timer = Timer()
    base = Baseline(device=device) if baselines else None
    by_kind = layer_kinds(ca, kinds)
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
        ta = load_finite(ca, name, device)
        values = metric_values(
            ms,
            ta,
            lambda name=name: load_finite(cb, name, device),
            base,
            timer,
            cache,
            (f"A:{name}", f"B:{name}"),
            threads,
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
        _other_layer_baselines(
            ca, cb, ms, by_kind, records, cache, device, timer, show_progress, threads
        )
    matrices = {}
    for m in ms:
        mat = layers_by_kinds(records, m.name, by_kind)
        if mat is not None:
            matrices[m.name] = mat
    return SimilarityReport(
        "weights",
        [str(ca.path), str(cb.path)],
        records,
        matrices,
        meta=report_meta(ms, device, start, timer),
    )


def _other_layer_baselines(
    ca: Checkpoint,
    cb: Checkpoint,
    ms: list[Metric],
    by_kind: dict[str, dict[int, str]],
    records: list[dict[str, Any]],
    cache: dict[tuple[Any, str], Any],
    device: str,
    timer: Timer,
    show_progress: bool,
    threads: int | None = None,
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
        with threads_for(math.prod(shape), threads):
            for m in small:
                fa = cache.get((m.features, f"A:{name_a}"))
                fb = cache.get((m.features, f"B:{name_b}"))
                if m.applies(shape) and fa is not None and fb is not None:
                    index[(name_a, m.name)]["baseline_other_layer"] = m.compare(fa, fb)
        todo = [m for m in big if m.applies(shape)]
        if todo:
            ta, tb = ca.load(name_a, device=device), cb.load(name_b, device=device)
            vals = metric_values(todo, ta, tb, None, Timer(), threads=threads)
            for m, (value, _) in vals.items():
                index[(name_a, m)]["baseline_other_layer"] = value
            del ta, tb
        timer.add("baseline_other_layer", t)
