"""What the weight comparisons share: opening and loading models (finite tensors only),
computing metrics with their Gaussian null (on as many CPU threads as the tensor's size pays
for: :func:`splice.threads.threads_for`), the layer / kind tables, and the report metadata, built in one
place (:func:`report_meta`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.analysis.metrics import Baseline, Metric, flat, nbytes_of
from splice.analysis.report import SimilarityMatrix, null_per
from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.finite import check_finite
from splice.threads import threads_for

if TYPE_CHECKING:
    import torch

ModelRef = str | os.PathLike[str] | Checkpoint
MetricNames = str | Sequence[str] | None


def open_model(ref: ModelRef, allow_pickle: bool = False) -> Checkpoint:
    return ref if isinstance(ref, Checkpoint) else open_checkpoint(ref, allow_pickle=allow_pickle)


def load_finite(ckpt: Checkpoint, name: str, device: str) -> torch.Tensor:
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


class Timer:
    """Seconds spent per metric (features + comparisons), for the report's ``meta``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def metric_values(
    metrics: list[Metric],
    a: torch.Tensor,
    b: torch.Tensor | Callable[[], torch.Tensor],
    baseline: Baseline | None,
    timer: Timer,
    cache: dict[tuple[Any, str], Any] | None = None,
    keys: tuple[str, str] = ("", ""),
    threads: int | None = None,
) -> dict[str, tuple[float, float | None]]:
    """``{metric: (value(a, b), gaussian baseline of a)}`` for the metrics that apply, on the
    CPU threads :func:`threads_for` picks for ``a``'s size (``threads``: that many always).

    ``b`` may be a function that loads it: it is then read only after ``a``'s Gaussian baseline
    is done and its Gaussian freed, so ``a``, ``b`` and a Gaussian never coexist. Metrics with
    one ``features`` function (cosine and both Frobenius: the flattened tensor) share each
    tensor's features; ``cache`` memoises small ones under ``(features, key)``.
    """
    with threads_for(a.numel(), threads):
        return _metric_values(metrics, a, b, baseline, timer, cache, keys)


def _metric_values(
    metrics: list[Metric],
    a: torch.Tensor,
    b: torch.Tensor | Callable[[], torch.Tensor],
    baseline: Baseline | None,
    timer: Timer,
    cache: dict[tuple[Any, str], Any] | None,
    keys: tuple[str, str],
) -> dict[str, tuple[float, float | None]]:
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


def layer_kinds(ckpt: Checkpoint, only: Sequence[str] | None = None) -> dict[str, dict[int, str]]:
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


def check_same_arch(a: Checkpoint, b: Checkpoint) -> None:
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


def layers_by_kinds(
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
    per_kind = null_per(rs, metric)
    return SimilarityMatrix(
        f"{metric} per layer and kind",
        metric,
        values,
        [str(i) for i in layers],
        [short(k) for k in kinds],
        "layer",
        "kind",
        float(np.nanmean(gauss)) if gauss else None,
        col_baselines=[per_kind.get(k) for k in kinds] if gauss else None,
    )


# ---- within one model ---------------------------------------------------------------------------
def torch_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return bool(a.shape == b.shape and torch.equal(a, b))


def pairwise(
    m: Metric,
    tensors: list[torch.Tensor],
    base: Baseline | None,
    timer: Timer,
    budget: int = 512 * 2**20,
    threads: int | None = None,
) -> tuple[np.ndarray, list[float]]:
    """``[n, n]`` metric matrix over ``tensors`` and each tensor's Gaussian baseline ``[n]``.

    Each tensor's features are computed once and kept (flattened features are views; spectra
    are small) unless they would pass ``budget`` bytes, then once per row and per column.
    Runs on the threads :func:`threads_for` picks for the largest tensor.
    """
    with threads_for(max(t.numel() for t in tensors), threads):
        return _pairwise(m, tensors, base, timer, budget)


def _pairwise(
    m: Metric,
    tensors: list[torch.Tensor],
    base: Baseline | None,
    timer: Timer,
    budget: int,
) -> tuple[np.ndarray, list[float]]:
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


def report_meta(ms: list[Metric], device: str, start: float, timer: Timer, **extra: Any) -> dict:
    """The ``meta`` every weight report carries: metrics, device, timings, descriptions."""
    return {
        "metrics": [m.name for m in ms],
        "device": str(device),
        "seconds": time.perf_counter() - start,
        "seconds_per_metric": timer.seconds,
        "descriptions": {m.name: m.description for m in ms},
        **extra,
    }
