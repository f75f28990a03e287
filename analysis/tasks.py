"""Task vectors: what each fine-tune changed relative to its base, compared tensor by tensor.

For a base ``W`` and fine-tunes ``A, B, ...`` of one architecture, the task vector of ``A`` is
``τ_A = A − W`` (float32, one tensor at a time). Per tensor, so per layer and kind (plus
embeddings, head and final norm), the records hold:

- ``delta_norm``: ``‖τ_A‖_F``; ``delta_norm_rel``: ``‖τ_A‖_F / ‖W‖_F`` (one record per model,
  ``against`` the model).
- ``task_cosine``: ``cos(τ_A, τ_B)`` of the flattened task vectors (float64 sums).
- ``sign_conflict``: over the entries where ``τ_A`` and ``τ_B`` are both nonzero, the fraction
  whose signs differ.
- ``topk_overlap``: ``|top(τ_A) ∩ top(τ_B)| / K``, ``top`` the ``K = round(k·n)`` entries of
  largest ``|τ|`` (ties broken by the lower index), ``k = top_k`` (default 0.1).
- ``sign_conflict_elected`` (two or more fine-tunes, ``against`` ``"all"``; NaN where fewer
  than two changed the tensor): TIES's sign election without trimming. The elected sign of an entry is ``sign(Σ_i τ_i)``; the value is the
  fraction of the nonzero entries ``τ_i[e]`` (over models and entries whose elected sign is
  nonzero) whose sign differs from it: the share of task-vector entries a TIES merge at
  density 1 drops.

Pair metrics (``against`` ``"A & B"``) are NaN (and their null None) when one task vector is
zero (a tensor left untouched by the fine-tune). Their null, ``baseline_gaussian``, is the metric between ``τ_A``
and an independent Gaussian of ``τ_B``'s shape: ``task_cosine`` ≈ 0 (± 1/√n),
``sign_conflict`` ≈ 0.5, ``topk_overlap`` ≈ k. ``sign_conflict_elected``'s null replaces every
``τ_i`` by an independent Gaussian of its norm: about ``mean_i arccos(‖τ_i‖ / √Σ_j ‖τ_j‖²) / π``,
0.25 for two task vectors (whatever their norms), 0.30 for three of equal norm.

Memory: the base tensor, one task vector per fine-tune and one Gaussian of one tensor at a
time (plus a float64 sum for the election); never a whole model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from splice.analysis.common import (
    ModelRef,
    check_same_arch,
    layer_kinds,
    layers_by_kinds,
    load_finite,
    open_model,
)
from splice.analysis.metrics import cosine_of, gaussian_like, norm_of
from splice.analysis.report import SimilarityMatrix, SimilarityReport, short_names
from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.progress import progress
from splice.threads import threads_for

if TYPE_CHECKING:
    import torch

PAIR_METRICS = ("task_cosine", "sign_conflict", "topk_overlap")
MODEL_METRICS = ("delta_norm", "delta_norm_rel")
ELECTED = "sign_conflict_elected"

DESCRIPTIONS = {
    "delta_norm": "‖A − base‖_F",
    "delta_norm_rel": "‖A − base‖_F / ‖base‖_F",
    "task_cosine": "cos(A − base, B − base), flattened (float64)",
    "sign_conflict": "fraction of entries, of those where both task vectors are nonzero, whose "
    "signs differ (null 0.5)",
    "topk_overlap": "fraction of A's top-k |task vector| entries that are also in B's (null k)",
    ELECTED: "fraction of nonzero task-vector entries whose sign differs from the elected "
    "sign(Σ task vectors) (TIES, no trimming)",
}


# ---- pure tensor functions ---------------------------------------------------------------------
def task_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``cos(a, b)`` of two task vectors ``[n]`` (float64 sums); NaN if one is zero."""
    if norm_of(a) == 0 or norm_of(b) == 0:
        return float("nan")
    return cosine_of(a, b)


def sign_conflict(a: torch.Tensor, b: torch.Tensor) -> float:
    """Over entries where ``a`` and ``b`` ``[n]`` are both nonzero: the fraction of opposite signs
    (NaN if there are none)."""
    sa, sb = a.sign(), b.sign()
    both = int(((sa != 0) & (sb != 0)).sum())
    if both == 0:
        return float("nan")
    return int((sa * sb < 0).sum()) / both


def elected_sign_conflict(deltas: Sequence[torch.Tensor]) -> float:
    """TIES's election without trimming, on task vectors ``[n]`` each: the elected sign of entry
    e is ``sign(Σ_i τ_i[e])`` (float64 sum); returns the fraction of nonzero ``τ_i[e]`` (over i
    and the entries with a nonzero elected sign) whose sign differs from it (NaN if none)."""
    return _elected_conflict(deltas.__getitem__, len(deltas))


def _elected_conflict(get: Callable[[int], torch.Tensor], count: int) -> float:
    """:func:`elected_sign_conflict` of the ``count`` vectors ``get(i)``, each made twice (one
    pass for the sum, one for the signs), so that no two need to exist at once."""
    import torch

    total = None
    for i in range(count):
        d = get(i)
        if total is None:
            total = torch.zeros(d.shape, dtype=torch.float64, device=d.device)
        total += d
    elected = total.sign()
    del total
    conflicts = counted = 0
    for i in range(count):
        s = get(i).sign()
        both = (s != 0) & (elected != 0)
        counted += int(both.sum())
        conflicts += int((both & (s != elected)).sum())
    return conflicts / counted if counted else float("nan")


def top_k_count(n: int, k: float) -> int:
    """``K = round(k·n)``, at least 1 and at most ``n``."""
    return min(n, max(1, round(k * n)))


def top_k_mask(v: torch.Tensor, k: float) -> torch.Tensor:
    """``[n]`` bool: the ``K = round(k·n)`` entries of ``v`` ``[n]`` of largest ``|v|``; among
    entries equal to the K-th largest, the ones with the lower index."""
    import torch

    n = v.numel()
    count = top_k_count(n, k)
    if count >= n:
        return torch.ones(n, dtype=torch.bool, device=v.device)
    a = v.abs()
    tau = torch.kthvalue(a, n - count + 1).values  # the K-th largest
    above = a > tau
    need = count - int(above.sum())
    tie = a == tau
    return above | (tie & (torch.cumsum(tie, 0) <= need))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: float) -> float:
    """``|top(a) ∩ top(b)| / K`` of two task vectors ``[n]`` (:func:`top_k_mask`); NaN if one is
    zero."""
    if norm_of(a) == 0 or norm_of(b) == 0:
        return float("nan")
    return int((top_k_mask(a, k) & top_k_mask(b, k)).sum()) / top_k_count(a.numel(), k)


def pair_values(a: torch.Tensor, b: torch.Tensor, k: float) -> dict[str, float]:
    """``{task_cosine, sign_conflict, topk_overlap}`` of two task vectors ``[n]``."""
    return {
        "task_cosine": task_cosine(a, b),
        "sign_conflict": sign_conflict(a, b),
        "topk_overlap": topk_overlap(a, b, k),
    }


# ---- the analysis -------------------------------------------------------------------------------
def task_vectors(
    base: ModelRef,
    models: ModelRef | Sequence[ModelRef],
    *,
    top_k: float = 0.1,
    device: str = "cpu",
    baselines: bool = True,
    kinds: Iterable[str] | None = None,
    include_globals: bool = True,
    show_progress: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
) -> SimilarityReport:
    """Task vectors of ``models`` (fine-tunes of ``base``, same architecture), tensor by tensor.

    Records: per tensor, ``delta_norm`` / ``delta_norm_rel`` per model and ``task_cosine``,
    ``sign_conflict``, ``topk_overlap`` per pair of models (``against`` ``"A & B"``, with
    ``baseline_gaussian``), and with two or more models ``sign_conflict_elected`` (``against``
    ``"all"``); see the module docstring. Matrices: ``"{against}/{metric}"``, layers × kinds.
    ``top_k`` is the fraction of entries in the top-k sets; ``kinds`` restricts the comparison
    to those layer-relative kinds. ``threads``: torch CPU threads (None: one for tensors under
    :data:`~splice.threads.SMALL_NUMEL` elements, torch's setting for larger ones).
    """
    start = time.perf_counter()
    if isinstance(models, (str, os.PathLike, Checkpoint)):
        models = [models]
    models = list(models)
    if not models:
        raise SpliceError(
            "task vectors need a base and at least one fine-tune (splice analyze tasks BASE A [B ...])"
        )
    if not 0 < top_k <= 1:
        raise SpliceError(f"top_k must be a fraction in (0, 1], got {top_k}")
    cb = open_model(base, allow_pickle)
    cms = [open_model(m, allow_pickle) for m in models]
    paths = [str(c.path) for c in [cb, *cms]]
    seen = {}
    for p in paths:
        if os.path.realpath(p) in seen:
            raise SpliceError(f"{p} is given twice (as {seen[os.path.realpath(p)]} too)")
        seen[os.path.realpath(p)] = p
    for c in cms:
        check_same_arch(cb, c)
    labels = short_names(paths)[1:]
    by_kind = layer_kinds(cb, kinds)
    jobs = [(kind, layer, name) for kind, ls in by_kind.items() for layer, name in ls.items()]
    if include_globals and kinds is None:
        jobs += [(n, None, n) for n in cb.tensors if cb.arch.parse(n).layer is None]
    records: list[dict[str, Any]] = []
    for kind, layer, name in progress(jobs, "task vectors", enabled=show_progress):
        with threads_for(math.prod(cb.tensors[name].shape), threads):
            records += _tensor_records(cb, cms, labels, name, kind, layer, top_k, device, baselines)
    matrices = _matrices(records, by_kind, labels)
    metrics = [*MODEL_METRICS, *((*PAIR_METRICS, ELECTED) if len(cms) > 1 else ())]
    return SimilarityReport(
        "tasks",
        paths,
        records,
        matrices,
        meta={
            "base": paths[0],
            "models": paths[1:],
            "labels": labels,
            "top_k": top_k,
            "device": str(device),
            "seconds": time.perf_counter() - start,
            "metrics": metrics,
            "descriptions": {m: DESCRIPTIONS[m] for m in metrics},
        },
    )


def _tensor_records(
    cb: Checkpoint,
    cms: list[Checkpoint],
    labels: list[str],
    name: str,
    kind: str,
    layer: int | None,
    top_k: float,
    device: str,
    baselines: bool,
) -> list[dict[str, Any]]:
    """The records of one tensor: norms per model, pair metrics, the elected sign conflict."""
    import torch

    w = load_finite(cb, name, device)
    if not w.is_floating_point():
        return []
    w = w.float().reshape(-1)
    deltas = [torch.sub(load_finite(c, name, device).float().reshape(-1), w) for c in cms]
    shape = tuple(cb.tensors[name].shape)
    common = {"tensor": name, "kind": kind, "group": cb.arch.parse(name).group, "layer": layer}
    out: list[dict[str, Any]] = []

    def add(against: str, metric: str, value: float, null: float | None = None) -> None:
        out.append({**common, "against": against, "metric": metric, "value": value,
                    "baseline_gaussian": null})  # fmt: skip

    base_norm = norm_of(w)
    del w
    norms = [norm_of(d) for d in deltas]
    for label, n in zip(labels, norms, strict=True):
        add(label, "delta_norm", n)
        add(label, "delta_norm_rel", n / base_norm if base_norm > 0 else float("nan"))
    # the null of pair (i, j): τ_i against a Gaussian standing in for τ_j (seeded by j)
    gauss = lambda j: gaussian_like(shape, seed=j + 1).reshape(-1).to(device)  # noqa: E731
    for j in range(1, len(deltas)):
        g = gauss(j) if baselines else None
        for i in range(j):
            both = norms[i] > 0 and norms[j] > 0  # else the values are NaN: no null either
            nulls = pair_values(deltas[i], g, top_k) if g is not None and both else {}
            for metric, value in pair_values(deltas[i], deltas[j], top_k).items():
                add(f"{labels[i]} & {labels[j]}", metric, value, nulls.get(metric))
        del g
    if len(deltas) > 1:
        # an election needs two task vectors that changed this tensor
        live = [j for j, n in enumerate(norms) if n > 0]
        value = null = float("nan")
        if len(live) > 1:
            value = elected_sign_conflict([deltas[j] for j in live])
            if baselines:
                null = _elected_conflict(lambda j: gauss(live[j]).mul_(norms[live[j]]), len(live))
        add("all", ELECTED, value, null if baselines else None)
    return out


def _matrices(
    records: list[dict[str, Any]], by_kind: dict[str, dict[int, str]], labels: list[str]
) -> dict[str, SimilarityMatrix]:
    """``"{against}/{metric}"``: a layers × kinds matrix per model, per pair and for ``all``."""
    groups = list(dict.fromkeys(r["against"] for r in records))
    out: dict[str, SimilarityMatrix] = {}
    for against in groups:
        rs = [r for r in records if r["against"] == against]
        for metric in dict.fromkeys(r["metric"] for r in rs):
            m = layers_by_kinds(rs, metric, by_kind)
            if m is None:
                continue
            what = f"{against} − base" if against in labels else against
            out[f"{against}/{metric}"] = dataclasses.replace(m, title=f"{what}: {metric}")
    return out


def summary(report: SimilarityReport, max_rows: int = 60) -> str:
    """Plain-text tables of a :func:`task_vectors` report, means over the layers of each kind:
    ``‖τ‖/‖W‖`` per model (with how many of the kind's tensors it changed), then per pair and
    for all models the pair metrics with their nulls (over the tensors both changed)."""
    labels = report.meta["labels"]
    kinds = list(dict.fromkeys(r["kind"] for r in report.records))[:max_rows]

    def mean(rs: list[dict[str, Any]], key: str = "value") -> float:
        vs = [r[key] for r in rs if r[key] is not None and math.isfinite(r[key])]
        return sum(vs) / len(vs) if vs else float("nan")

    def cell(rs: list[dict[str, Any]]) -> str:
        v, b = mean(rs), mean(rs, "baseline_gaussian")
        return "n/a" if math.isnan(v) else f"{v:.3f} ({b:.3f})" if not math.isnan(b) else f"{v:.3f}"

    width = max(len(k.removesuffix(".weight")) for k in [*kinds, "kind"])
    lines = [
        f"tasks: {', '.join(labels)} against {report.meta['base']} (top_k {report.meta['top_k']})",
        "‖τ‖/‖W‖ (mean over layers; tensors changed)",
        f"{'kind':<{width}}  " + "  ".join(f"{m:>16}" for m in labels),
    ]
    for k in kinds:
        cells = []
        for m in labels:
            rs = report.values("delta_norm_rel", kind=k, against=m)
            changed = sum(1 for r in rs if r["value"])
            cells.append(f"{mean(rs):.4f} ({changed}/{len(rs)})" if rs else "n/a")
        lines.append(
            f"{k.removesuffix('.weight'):<{width}}  " + "  ".join(f"{c:>16}" for c in cells)
        )
    groups = [a for a in dict.fromkeys(r["against"] for r in report.records) if a not in labels]
    for against in groups:
        metrics = list(
            dict.fromkeys(
                r["metric"] for r in (r for r in report.records if r["against"] == against)
            )
        )
        who = "two or more models" if against == "all" else "both"
        lines.append(f"{against}: value (null), mean over the tensors changed by {who}")
        lines.append(f"{'kind':<{width}}  " + "  ".join(f"{m:>22}" for m in metrics))
        for k in kinds:
            cells = [cell(report.values(m, kind=k, against=against)) for m in metrics]
            if any(c != "n/a" for c in cells):  # kinds both changed
                lines.append(
                    f"{k.removesuffix('.weight'):<{width}}  " + "  ".join(f"{c:>22}" for c in cells)
                )
    lines.append(f"time: {report.meta['seconds']:.1f} s")
    return "\n".join(lines)
