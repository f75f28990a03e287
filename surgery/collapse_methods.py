"""How ``splice collapse`` decides one MoE layer: the registered methods (``--method``
uniform / frequency / slice; ``--keep-experts`` merge / prune, the experts ``--prune`` keeps
chosen ``--by`` naee / reap), each filling a layer's
:class:`~splice.surgery.collapse_report.LayerCollapse` record and its :class:`Decision` (which
experts merge with which weights and permutations, or which neurons are kept). The family's
routing (:class:`~splice.surgery.collapse_routing.Routing`) gives every calibration row's routing
weights; a layer's shared experts are taken out of its output first, so every method fits the
routed experts' part alone."""

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
    from splice.surgery.collapse_routing import Family, Routing, Shared


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
    by: str = "naee"  # --prune criterion (PRUNE_BY)
    shared_gate: str = "keep"  # Qwen's sigmoid shared-expert gate: keep (exact) | mean (folded)


@dataclass
class Decision:
    """What the writer needs for one layer: per output expert (one for a dense result) its
    source experts, their weights and permutations; for slice the kept neurons (flat
    ``e·I + j``) and the file of the refit down projection; the router mix ``[k, E]`` (its
    selection bias mixed alike) and the routing of the kept experts (``routing``, with a
    ``note`` when the expert groups changed). ``down_scale``: the factor of the dense MLP's
    down projection (the mean routed mass ``Σ_e g_e(x)``; 1 for slice, whose refit has it);
    ``shared_scale``: the factor of the shared experts' down projection folded into a dense
    MLP (Qwen's mean sigmoid gate; 1 for ungated shared experts)."""

    members: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    perms: list[list[Any] | None] = field(default_factory=list)
    picks: list[int] | None = None
    down_file: Path | None = None
    router_mix: Any = None
    routing: Any = None
    note: str | None = None
    down_scale: float = 1.0
    shared_scale: float = 1.0


def _blocks(fn: Any, x: torch.Tensor, block: int = 2048) -> torch.Tensor:
    import torch

    return torch.cat([fn(x[lo : lo + block]) for lo in range(0, x.shape[0], block)])


def _merged(ex: Experts, members: list[int], weights: Any, align: bool, ref: int) -> tuple:
    """``(merged Experts of one expert, perms or None, moved, spread before, after)`` of the
    ``weights``-mean of ``members`` (aligned to member ``ref`` first when ``align``)."""
    from splice.surgery import collapse_math as cm

    sub = ex.subset(members)
    perms, moved, before, after = None, None, None, None
    if align and len(members) > 1:
        at = members.index(ref)
        perms = cm.align_permutations(sub, at)
        before = cm.weight_spread(sub, weights)
        sub = sub.permuted(perms)
        after = cm.weight_spread(sub, weights)
        moved = cm.moved_fraction([p for j, p in enumerate(perms) if j != at])
    return sub.mixed(weights), perms, moved, before, after


@dataclass
class Layer:
    """One layer being decided: its experts, the calibration rows (``x`` the MoE block's
    inputs, ``y`` its routed experts' part of the output: the block's output less what its
    shared experts add; None without calibration) and their seeded sample ``xs`` / ``ys``,
    the routing statistics (``gates`` the family's routing weights, ``mass`` the dense MLP's
    scale: the routed mass, exact or measured), and the record and decision being filled.
    Errors are relative to ``y_norm``, the norm of the whole block's output."""

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
    routing: Routing
    family: Family
    mass: float = 1.0
    y_norm: float = 1.0

    def error(self, approx: torch.Tensor) -> float:
        """``‖y − approx‖ / ‖block output‖`` on all calibration rows."""
        import torch

        assert self.y is not None
        return float(torch.linalg.norm(self.y - approx) / max(self.y_norm, 1e-30))

    def route_kept(self, keep: list[int], logits: torch.Tensor, top_k: int) -> torch.Tensor:
        """The routing weights ``[n, k]`` of the experts ``keep`` alone (their router rows,
        ``logits`` ``[n, k]``), as the written router of those experts routes."""
        routing, _ = self.routing.for_experts([[e] for e in keep], top_k, self.family)
        bias = None if self.ex.bias is None else self.ex.bias[keep]
        return routing.route(logits, bias)


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
#: ``--keep-experts k``: ``merge`` (HC-SMoE grouping) or ``prune`` (``--prune``, the experts
#: kept chosen by ``--by``: :data:`PRUNE_BY`)
KEEP_METHODS: Registry[CollapseMethod] = Registry("keep-experts method")
#: ``--prune --by NAME``: ``choose(layer, outputs [E, m, H], k, out_k) -> kept experts``
PRUNE_BY: Registry[Callable[[Layer, Any, int, int], list[int]]] = Registry("prune criterion")


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
    routing: Routing,
    act: Any,
    spill: Path | None,
    *,
    family: Family,
    shared: Shared | None = None,
) -> tuple[LayerCollapse, Decision]:
    """Decide layer ``i``: its experts ``ex``, the block's calibration inputs ``x`` and outputs
    ``y`` (None without calibration), routed by ``routing``; ``shared``: its shared experts,
    whose part of ``y`` is taken out first (all of it; with ``shared_gate="mean"`` the
    shared experts folded into the dense MLP at their mean gate, so the rest of ``y`` is what
    the routed part is fitted to)."""
    import numpy as np
    import torch

    count, top_k = ex.count, routing.top_k
    rec, dec = LayerCollapse(layer=i), Decision()
    probability = torch.full((count,), 1.0 / count, dtype=torch.float64)
    xs = ys = gates = None
    mass = routing.constant_mass()
    y_norm = 1.0
    if x is not None:
        assert y is not None
        y_norm = float(torch.linalg.norm(y))
        if shared is not None:
            part = shared.ungated(x, act)
            g = shared.gate_values(x)
            if g is not None and opts.shared_gate == "mean" and opts.keep_experts is None:
                m = float(g.mean())
                dec.shared_scale = rec.shared_gate_mean = m
                rec.shared_gate_error = float(torch.linalg.norm((g - m) * part)) / max(
                    y_norm, 1e-30
                )
                y = y - m * part
            else:
                y = y - (part if g is None else g * part)
        rec.tokens = int(x.shape[0])
        probs = routing.scores(ex.logits(x))
        gates = ex.gates(x, routing, top_k)
        probability = probs.mean(0)
        rec.probability = probability.tolist()
        rec.frequency = (gates > 0).double().mean(0).tolist()
        rec.mean_gate = gates.mean(0).tolist()
        measured = float(gates.sum(1).mean())
        rec.mass_measured = measured
        if mass is None:
            mass = measured
        rng = np.random.default_rng([opts.seed, i])
        n = x.shape[0]
        sample = np.sort(rng.choice(n, opts.max_rows, replace=False)) if n > opts.max_rows else None
        xs = x if sample is None else x[torch.from_numpy(sample)]
        ys = y if sample is None else y[torch.from_numpy(sample)]
    if mass is None:  # plan_collapse refuses this before calibration
        raise AssertionError("the routed mass is neither constant nor measured")
    ref = int(torch.argmax(probability)) if x is not None else 0
    layer = Layer(
        i, ex, x, y, xs, ys, gates, probability, ref, opts, top_k, act, spill, rec, dec,
        routing, family, mass, y_norm,
    )  # fmt: skip
    if opts.keep_experts is None and not method_of(opts).neurons:
        rec.mass = mass
    method_of(opts).decide(layer)
    return rec, dec


def _mean(layer: Layer, weights: torch.Tensor) -> None:
    """The dense MLP as the ``weights``-mean of all experts (aligned first with ``--align``),
    its down projection times the routed mass."""
    ex, x, rec, dec, act = layer.ex, layer.x, layer.rec, layer.dec, layer.act
    count, align, mass = ex.count, layer.opts.align, layer.mass
    merged, perms, rec.moved, rec.spread_before, rec.spread_after = _merged(
        ex, list(range(count)), weights, align, layer.ref
    )
    rec.weights = weights.tolist()
    dec.members, dec.weights, dec.perms = [list(range(count))], [weights.tolist()], [perms]
    dec.down_scale = mass
    if x is not None:
        rec.error = layer.error(_blocks(lambda b: mass * merged.outputs(b, act)[0], x))
        if align:
            plain = ex.mixed(weights)
            rec.error_unaligned = layer.error(_blocks(lambda b: mass * plain.outputs(b, act)[0], x))


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

    ex, x, xs, ys, act = layer.ex, layer.x, layer.xs, layer.ys, layer.act
    rec, dec, opts, count = layer.rec, layer.dec, layer.opts, layer.ex.count
    assert x is not None and layer.y is not None
    width = ex.w1.shape[1]
    keep = opts.intermediate_size or width
    mean_gate = layer.gates.mean(0)
    h = ex.hidden(xs, act).permute(1, 0, 2).reshape(xs.shape[0], count * width)
    scale = cm.wide_scores(ex, mean_gate).reshape(-1)
    picks = sorted(cm.select_neurons(h, scale, keep)[0])
    down = cm.ridge_refit(h[:, picks], ys, opts.ridge)  # [H, keep]
    w1 = ex.w1.reshape(count * width, -1)[picks]
    w3 = ex.w3.reshape(count * width, -1)[picks]
    rec.error = layer.error(_blocks(lambda b: cm.mlp_forward(w1, w3, down, b, act), x))
    wide = (ex.w2 * mean_gate[:, None, None]).permute(1, 0, 2).reshape(-1, count * width)
    rec.error_before_refit = layer.error(
        _blocks(lambda b: cm.mlp_forward(w1, w3, wide[:, picks], b, act), x)
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

    ex, x, xs, act = layer.ex, layer.x, layer.xs, layer.act
    rec, dec, opts, probability = layer.rec, layer.dec, layer.opts, layer.probability
    assert x is not None and layer.y is not None
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
    routing, note = layer.routing.for_experts(chosen, out_k, layer.family)
    dec.routing, dec.note, rec.note = routing, note, note

    rec.groups = chosen
    rec.error = layer.error(cm.moe_forward(cm.stacked(parts), x, out_k, act, routing=routing))
    if opts.align:
        rec.error_unaligned = layer.error(
            cm.moe_forward(cm.stacked(unaligned), x, out_k, act, routing=routing)
        )
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
    """The ``k`` experts ``--by`` chooses (:data:`PRUNE_BY`), kept as they are."""
    choose = PRUNE_BY.get(layer.opts.by)

    def groups(outputs: torch.Tensor, k: int, out_k: int) -> list[list[int]]:
        return [[e] for e in choose(layer, outputs, k, out_k)]

    _keep(layer, groups)


@PRUNE_BY.register("naee")
def _naee(layer: Layer, outputs: torch.Tensor, k: int, out_k: int) -> list[int]:
    """NAEE: the ``k`` experts whose keeping reconstructs the layer best (the others removed,
    the kept ones routed as the written router routes them)."""
    from splice.surgery import collapse_math as cm

    def route(keep: list[int], logits: torch.Tensor) -> torch.Tensor:
        return layer.route_kept(keep, logits, out_k)

    logits = layer.ex.logits(layer.xs)
    kept, _ = cm.prune_experts(logits, outputs, layer.ys, k, out_k, route=route)
    return kept


@PRUNE_BY.register("frequency")
def _by_frequency(layer: Layer, outputs: torch.Tensor, k: int, out_k: int) -> list[int]:
    """The ``k`` experts routed to most often: the share of calibration tokens whose top-k
    holds the expert (ties: the lower index)."""
    import torch

    from splice.surgery import collapse_math as cm

    return cm.top_experts(torch.tensor(layer.rec.frequency, dtype=torch.float64), k)


@PRUNE_BY.register("reap")
def _reap(layer: Layer, outputs: torch.Tensor, k: int, out_k: int) -> list[int]:
    """REAP: the ``k`` experts of highest router-weighted expert activation norm, the mean over
    the calibration rows routed to expert ``e`` of ``g_e(x) · ‖E_e(x)‖₂`` (``g_e`` the
    family's routing weight: renormalised top-k, times ``routed_scaling_factor``)."""
    from splice.surgery import collapse_math as cm

    gates = layer.ex.gates(layer.xs, layer.routing, layer.top_k)
    saliency = cm.reap_saliency(gates, outputs)
    layer.rec.saliency = saliency.tolist()
    return cm.top_experts(saliency, k)
