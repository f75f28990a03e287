"""How ``splice collapse`` decides one MoE layer: the registered methods (``--method``
uniform / frequency / slice; ``--keep-experts`` merge / prune), each filling a layer's
:class:`~splice.surgery.collapse_report.LayerCollapse` record and its :class:`Decision` (which
experts merge with which weights and permutations, or which neurons are kept)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.registry import Registry
from splice.surgery.collapse_report import LayerCollapse

if TYPE_CHECKING:
    import torch

    from splice.surgery.collapse_math import Experts


@dataclass(frozen=True)
class CollapseOptions:
    method: str
    intermediate_size: int | None
    keep_experts: int | None
    top_k: int | None
    prune: bool
    align: bool
    ridge: float
    max_rows: int
    seed: int


@dataclass
class Decision:
    """What the writer needs for one layer: per output expert (one for a dense result) its
    source experts, their weights and permutations; for slice the kept neurons (flat
    ``e·I + j``) and the file of the refit down projection; the router mix ``[k, E]``."""

    members: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    perms: list[list[Any] | None] = field(default_factory=list)
    picks: list[int] | None = None
    down_file: Path | None = None
    router_mix: Any = None


def _blocks(fn: Any, x: torch.Tensor, block: int = 2048) -> torch.Tensor:
    import torch

    return torch.cat([fn(x[lo : lo + block]) for lo in range(0, x.shape[0], block)])


def _merged(ex: Experts, members: list[int], weights: Any, align: bool, ref: int) -> tuple:
    """``(merged Experts of one expert, perms or None, moved, spread before, after)`` of the
    ``weights``-mean of ``members`` (aligned to member ``ref`` first when ``align``)."""
    from splice.surgery import collapse_math as cm

    sub = cm.Experts(ex.w1[members], ex.w3[members], ex.w2[members], ex.router[members])
    perms, moved, before, after = None, None, None, None
    if align and len(members) > 1:
        at = members.index(ref)
        perms = cm.align_permutations(sub, at)
        before = cm.weight_spread(sub, weights)
        sub = sub.permuted(perms)
        after = cm.weight_spread(sub, weights)
        moved = cm.moved_fraction([p for j, p in enumerate(perms) if j != at])
    w1, w3, w2 = cm.average(sub, weights)
    merged = cm.Experts(w1[None], w3[None], w2[None], (weights @ sub.router)[None])
    return merged, perms, moved, before, after


@dataclass
class Layer:
    """One layer being decided: its experts, the calibration rows (``x`` the MoE block's
    inputs, ``y`` its outputs; None without calibration) and their seeded sample ``xs`` /
    ``ys``, the routing statistics, and the record and decision being filled."""

    i: int
    ex: Experts
    x: torch.Tensor | None
    y: torch.Tensor | None
    xs: Any
    ys: Any
    gates: Any
    probability: torch.Tensor
    ref: int  # the most used expert (0 without calibration): what alignment aligns to
    opts: CollapseOptions
    top_k: int
    act: Any
    spill: Path | None
    rec: LayerCollapse
    dec: Decision


@dataclass(frozen=True)
class CollapseMethod:
    """One way to collapse a layer: ``decide(layer)`` fills ``layer.rec`` and ``layer.dec``.
    ``calibrated``: it needs calibration text (as a dense ``--method``); ``neurons``: it
    selects neurons, so it takes ``--intermediate-size`` and refuses ``--align`` and
    ``--keep-experts`` (and spills its refit down projections)."""

    decide: Callable[[Layer], None]
    calibrated: bool = False
    neurons: bool = False


#: ``--method``: the ways to a dense MLP
METHODS: Registry[CollapseMethod] = Registry("collapse method")
#: ``--keep-experts k``: ``merge`` (HC-SMoE grouping) or ``prune`` (NAEE, ``--prune``)
KEEP_METHODS: Registry[CollapseMethod] = Registry("keep-experts method")


def method_of(opts: CollapseOptions) -> CollapseMethod:
    """The registered method ``opts`` asks for."""
    if opts.keep_experts is None:
        return METHODS.get(opts.method)
    return KEEP_METHODS.get("prune" if opts.prune else "merge")


def decide_layer(
    i: int,
    ex: Experts,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    opts: CollapseOptions,
    top_k: int,
    act: Any,
    spill: Path | None,
) -> tuple[LayerCollapse, Decision]:
    import numpy as np
    import torch

    from splice.surgery import collapse_math as cm

    count = ex.count
    rec, dec = LayerCollapse(layer=i), Decision()
    probability = torch.full((count,), 1.0 / count, dtype=torch.float64)
    xs = ys = gates = None
    if x is not None:
        rec.tokens = int(x.shape[0])
        probs, gates = cm.routing(x @ ex.router.T, top_k)
        probability = probs.mean(0)
        rec.probability = probability.tolist()
        rec.frequency = (gates > 0).double().mean(0).tolist()
        rec.mean_gate = gates.mean(0).tolist()
        rng = np.random.default_rng([opts.seed, i])
        n = x.shape[0]
        sample = np.sort(rng.choice(n, opts.max_rows, replace=False)) if n > opts.max_rows else None
        xs = x if sample is None else x[torch.from_numpy(sample)]
        ys = y if sample is None else y[torch.from_numpy(sample)]  # type: ignore[index]
    ref = int(torch.argmax(probability)) if x is not None else 0
    layer = Layer(i, ex, x, y, xs, ys, gates, probability, ref, opts, top_k, act, spill, rec, dec)
    method_of(opts).decide(layer)
    return rec, dec


def _mean(layer: Layer, weights: torch.Tensor) -> None:
    """The dense MLP as the ``weights``-mean of all experts (aligned first with ``--align``)."""
    from splice.surgery import collapse_math as cm

    ex, x, y, rec, dec, act = layer.ex, layer.x, layer.y, layer.rec, layer.dec, layer.act
    count, align = ex.count, layer.opts.align
    merged, perms, rec.moved, rec.spread_before, rec.spread_after = _merged(
        ex, list(range(count)), weights, align, layer.ref
    )
    rec.weights = weights.tolist()
    dec.members, dec.weights, dec.perms = [list(range(count))], [weights.tolist()], [perms]
    if x is not None:
        w1, w3, w2 = merged.w1[0], merged.w3[0], merged.w2[0]
        rec.error = cm.relative_error(y, _blocks(lambda b: cm.mlp_forward(w1, w3, w2, b, act), x))
        if align:
            w1, w3, w2 = cm.average(ex, weights)
            rec.error_unaligned = cm.relative_error(
                y, _blocks(lambda b: cm.mlp_forward(w1, w3, w2, b, act), x)
            )


def _method(
    registry: Registry[CollapseMethod], name: str, **flags: bool
) -> Callable[[Callable[[Layer], None]], Callable[[Layer], None]]:
    """Decorator: register a decide function as ``name`` in ``registry`` (with ``flags``)."""

    def add(decide: Callable[[Layer], None]) -> Callable[[Layer], None]:
        registry.register(name)(CollapseMethod(decide, **flags))
        return decide

    return add


@_method(METHODS, "uniform")
def _uniform(layer: Layer) -> None:
    """The plain mean of the experts."""
    import torch

    count = layer.ex.count
    _mean(layer, torch.full((count,), 1.0 / count, dtype=torch.float64))


@_method(METHODS, "frequency", calibrated=True)
def _frequency(layer: Layer) -> None:
    """The mean weighted by each expert's routing probability mass."""
    _mean(layer, layer.probability / layer.probability.sum())


@_method(METHODS, "slice", calibrated=True, neurons=True)
def _slice(layer: Layer) -> None:
    """The experts as one wide MLP: the neurons that contribute most kept, down refit."""
    import numpy as np
    import torch

    from splice.surgery import collapse_math as cm

    ex, x, y, xs, ys, act = layer.ex, layer.x, layer.y, layer.xs, layer.ys, layer.act
    rec, dec, opts, count = layer.rec, layer.dec, layer.opts, layer.ex.count
    assert x is not None and y is not None
    width = ex.w1.shape[1]
    keep = opts.intermediate_size or width
    mean_gate = layer.gates.mean(0)
    h = ex.hidden(xs, act).permute(1, 0, 2).reshape(xs.shape[0], count * width)
    scale = cm.wide_scores(ex, mean_gate).reshape(-1)
    picks = sorted(cm.select_neurons(h, scale, keep)[0])
    down = cm.ridge_refit(h[:, picks], ys, opts.ridge)  # [H, keep]
    w1 = ex.w1.reshape(count * width, -1)[picks]
    w3 = ex.w3.reshape(count * width, -1)[picks]
    rec.error = cm.relative_error(y, _blocks(lambda b: cm.mlp_forward(w1, w3, down, b, act), x))
    wide = (ex.w2 * mean_gate[:, None, None]).permute(1, 0, 2).reshape(-1, count * width)
    rec.error_before_refit = cm.relative_error(
        y, _blocks(lambda b: cm.mlp_forward(w1, w3, wide[:, picks], b, act), x)
    )
    rec.neurons = np.bincount(np.array(picks) // width, minlength=count).tolist()
    assert layer.spill is not None
    dec.down_file = layer.spill / f"down_{layer.i}.pt"
    torch.save(down.float().contiguous(), dec.down_file)
    dec.picks = picks


def _keep(layer: Layer, groups: Callable[[torch.Tensor, int, int], list[list[int]]]) -> None:
    """``k`` experts, each the probability-weighted mean of one group of source experts
    (``groups(outputs, k, out_k)`` on the experts' outputs ``[E, m, H]``), router rows mixed
    alike."""
    import numpy as np
    import torch

    from splice.surgery import collapse_math as cm

    ex, x, y, xs, act = layer.ex, layer.x, layer.y, layer.xs, layer.act
    rec, dec, opts, probability = layer.rec, layer.dec, layer.opts, layer.probability
    assert x is not None and y is not None
    count = ex.count
    k = opts.keep_experts
    assert k is not None
    out_k = opts.top_k or min(layer.top_k, k)
    outputs = ex.outputs(xs, act)  # [E, m, H]
    mix = torch.zeros((k, count), dtype=torch.float64)
    chosen = groups(outputs, k, out_k)
    parts, moved, before, after, unaligned = [], [], [], [], []
    for g, members in enumerate(chosen):
        w = probability[members] / probability[members].sum()
        gref = members[int(torch.argmax(probability[members]))]
        merged, perms, mv, b, a = _merged(ex, members, w, opts.align, gref)
        parts.append(merged)
        if opts.align:
            unaligned.append(_merged(ex, members, w, False, gref)[0])
            if mv is not None:
                moved.append(mv * (len(members) - 1))
                before.append(b)
                after.append(a)
        mix[g, members] = w
        dec.members.append(members)
        dec.weights.append(w.tolist())
        dec.perms.append(perms)
    dec.router_mix = mix

    def stack(ps: list[Experts]) -> Experts:
        return cm.Experts(
            *(torch.cat([getattr(p, f) for p in ps]) for f in ("w1", "w3", "w2", "router"))
        )

    rec.groups = chosen
    rec.error = cm.relative_error(y, cm.moe_forward(stack(parts), x, out_k, act))
    if opts.align:
        rec.error_unaligned = cm.relative_error(y, cm.moe_forward(stack(unaligned), x, out_k, act))
        total = sum(len(m) - 1 for m in chosen)
        rec.moved = sum(moved) / total if total else 0.0
        rec.spread_before = float(np.mean(before)) if before else 0.0
        rec.spread_after = float(np.mean(after)) if after else 0.0


@_method(KEEP_METHODS, "merge", calibrated=True)
def _merge_groups(layer: Layer) -> None:
    """Experts grouped by the cosine similarity of their outputs (HC-SMoE), merged in groups."""
    from splice.surgery import collapse_math as cm

    _keep(layer, lambda outputs, k, _out_k: cm.group_experts(outputs, k))


@_method(KEEP_METHODS, "prune", calibrated=True)
def _prune_experts(layer: Layer) -> None:
    """The ``k`` experts whose keeping reconstructs the layer best (NAEE), kept as they are."""
    from splice.surgery import collapse_math as cm

    def groups(outputs: torch.Tensor, k: int, out_k: int) -> list[list[int]]:
        kept, _ = cm.prune_experts(layer.xs @ layer.ex.router.T, outputs, layer.ys, k, out_k)
        return [[e] for e in kept]

    _keep(layer, groups)
