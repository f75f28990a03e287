"""The arithmetic of expert collapsing: pure functions on one layer's tensors (float64).

Notation: ``E`` experts of intermediate width ``I`` on a residual stream of width ``H``;
``w1`` (gate) and ``w3`` (up) are ``[E, I, H]``, ``w2`` (down) ``[E, H, I]``, the router
``[E, H]`` (and a selection bias ``[E]`` where the family has one); an expert computes
``w2_e · glu(w1_e x, w3_e x)``, ``glu(g, u) = act(g) * u`` in most families (gpt-oss clamps
both and adds one to ``u``: :func:`splice.surgery.collapse_stream.activation`), with biases
``b1``, ``b3`` ``[E, I]`` and ``b2`` ``[E, H]`` where the family has them (gpt-oss, whose router
also has a bias ``[E]`` added to its logits). Calibration rows are ``x`` ``[n, H]`` (the MoE block's
normed input) and ``y`` ``[n, H]`` (its routed experts' part of the output: shared experts
taken out). How the router's logits become weights is a
:class:`~splice.surgery.collapse_routing.Routing` (Mixtral's softmax top-k renormalised when
none is given). Nothing here reads files or knows tensor names: :mod:`splice.surgery.collapse`
owns those.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from splice.surgery.collapse_routing import Routing

#: an expert's gated unit: ``glu(gate pre-activation, up pre-activation)`` ``[..., I]``
Act = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Experts:
    """One MoE layer: ``w1``, ``w3`` ``[E, I, H]``, ``w2`` ``[E, H, I]``, ``router`` ``[E, H]``,
    ``bias`` ``[E]`` the router's selection bias (None: the family has none); ``b1``, ``b3``
    ``[E, I]``, ``b2`` ``[E, H]`` the experts' biases and ``router_bias`` ``[E]`` the one added
    to the router's logits (gpt-oss; None elsewhere)."""

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    router: torch.Tensor
    bias: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    b3: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, E]``: the router's logits on rows ``x`` ``[n, H]``."""
        out = x @ self.router.T
        return out if self.router_bias is None else out + self.router_bias

    def gates(self, x: torch.Tensor, routing: Routing | None, top_k: int) -> torch.Tensor:
        """``[n, E]``: the routing weights of rows ``x`` (Mixtral's when ``routing`` is None)."""
        logits = self.logits(x)
        if routing is None:
            return routing_weights(logits, top_k)[1]
        return routing.route(logits, self.bias)

    def _each(self, fn: Callable[[torch.Tensor], torch.Tensor], router: bool = True) -> dict:
        """The optional per-expert tensors, ``fn`` applied (router biases only if ``router``)."""
        names = ("bias", "b1", "b3", "b2", "router_bias") if router else ("b1", "b3", "b2")
        return {k: None if getattr(self, k) is None else fn(getattr(self, k)) for k in names}

    def subset(self, keep: list[int]) -> Experts:
        """The experts ``keep`` (router rows and biases alike)."""
        return Experts(
            self.w1[keep], self.w3[keep], self.w2[keep], self.router[keep],
            **self._each(lambda t: t[keep]),
        )  # fmt: skip

    def mixed(self, weights: torch.Tensor) -> Experts:
        """One expert: the ``weights`` ``[E]``-weighted sum of every tensor (router rows and
        biases alike)."""

        def mix(t: torch.Tensor) -> torch.Tensor:
            return torch.tensordot(weights, t, dims=1)[None]

        return Experts(
            mix(self.w1), mix(self.w3), mix(self.w2), mix(self.router), **self._each(mix)
        )

    @property
    def count(self) -> int:
        return self.w1.shape[0]

    @property
    def biased(self) -> bool:
        """The experts have biases (gpt-oss)."""
        return self.b1 is not None or self.b3 is not None or self.b2 is not None

    def hidden(self, x: torch.Tensor, act: Act) -> torch.Tensor:
        """``[E, n, I]``: every expert's intermediate on every row of ``x`` ``[n, H]``."""
        g = torch.einsum("nh,eih->eni", x, self.w1)
        u = torch.einsum("nh,eih->eni", x, self.w3)
        if self.b1 is not None:
            g = g + self.b1[:, None, :]
        if self.b3 is not None:
            u = u + self.b3[:, None, :]
        return act(g, u)

    def outputs(self, x: torch.Tensor, act: Act) -> torch.Tensor:
        """``[E, n, H]``: every expert's output (unweighted) on every row."""
        out = torch.einsum("eni,ehi->enh", self.hidden(x, act), self.w2)
        return out if self.b2 is None else out + self.b2[:, None, :]

    def permuted(self, perms: list[torch.Tensor]) -> Experts:
        """Each expert's intermediate neurons reordered by ``perms[e]`` ``[I]`` (new j <- old
        ``perms[e][j]``); the function of every expert is unchanged."""
        idx = torch.stack(perms)  # [E, I]
        rows = idx[:, :, None].expand_as(self.w1)
        return Experts(
            self.w1.gather(1, rows),
            self.w3.gather(1, rows),
            self.w2.gather(2, idx[:, None, :].expand_as(self.w2)),
            self.router,
            self.bias,
            b1=None if self.b1 is None else self.b1.gather(1, idx),
            b3=None if self.b3 is None else self.b3.gather(1, idx),
            b2=self.b2,
            router_bias=self.router_bias,
        )


def routing_weights(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing of router logits ``[n, E]``: ``(probs [n, E], gates [n, E])`` — the
    softmax, and the top-``k`` probabilities renormalised to sum to 1 (zero elsewhere)."""
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, top.indices, top.values)
    return probs, gates / gates.sum(-1, keepdim=True)


def moe_forward(
    experts: Experts,
    x: torch.Tensor,
    top_k: int,
    act: Act,
    block: int = 1024,
    routing: Routing | None = None,
) -> torch.Tensor:
    """``[n, H]``: the routed experts' output on ``x`` (every expert evaluated on every row, in
    blocks of ``block`` rows; ``routing`` as the family routes, Mixtral's when None)."""
    out = []
    for lo in range(0, x.shape[0], block):
        xb = x[lo : lo + block]
        gates = experts.gates(xb, routing, top_k)
        out.append(torch.einsum("ne,enh->nh", gates, experts.outputs(xb, act)))
    return torch.cat(out)


def mlp_forward(
    w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, act: Act
) -> torch.Tensor:
    """``[n, H]``: a dense gated MLP (``w1``, ``w3`` ``[I, H]``, ``w2`` ``[H, I]``) on ``x``."""
    return act(x @ w1.T, x @ w3.T) @ w2.T


def relative_error(y: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖y − approx‖_F / ‖y‖_F``."""
    return float(torch.linalg.norm(y - approx) / torch.linalg.norm(y).clamp(min=1e-30))


# ---- alignment ---------------------------------------------------------------------------------
def neuron_features(experts: Experts) -> torch.Tensor:
    """``[E, I, 3H]``: each intermediate neuron's weights (its w1 row, w3 row and w2 column,
    and its w1 / w3 biases where there are), unit-normalised, so that matching neurons have
    cosine 1."""
    parts = [experts.w1, experts.w3, experts.w2.transpose(1, 2)]
    parts += [b[:, :, None] for b in (experts.b1, experts.b3) if b is not None]
    f = torch.cat(parts, dim=-1)
    return f / torch.linalg.norm(f, dim=-1, keepdim=True).clamp(min=1e-30)


def align_permutations(experts: Experts, reference: int) -> list[torch.Tensor]:
    """Per expert, the permutation ``[I]`` of its neurons that best matches expert
    ``reference``'s (``scipy.optimize.linear_sum_assignment`` maximising the summed cosine of
    the neurons' weights, MC-SMoE's weight matching); the reference keeps the identity."""
    from scipy.optimize import linear_sum_assignment

    f = neuron_features(experts)
    width = f.shape[1]
    perms = []
    for e in range(experts.count):
        if e == reference:
            perms.append(torch.arange(width))
            continue
        sim = (f[reference] @ f[e].T).numpy()  # [I_ref, I_e]
        rows, cols = linear_sum_assignment(sim, maximize=True)
        perm = np.empty(width, dtype=np.int64)
        perm[rows] = cols
        perms.append(torch.from_numpy(perm))
    return perms


def moved_fraction(perms: list[torch.Tensor]) -> float:
    """Share of the neurons of all experts that a permutation moved."""
    moved = sum(int((p != torch.arange(p.numel())).sum()) for p in perms)
    return moved / max(1, sum(p.numel() for p in perms))


def weight_spread(experts: Experts, weights: torch.Tensor) -> float:
    """``Σ_e w_e ‖W_e − W̄‖² / Σ_e w_e ‖W_e‖²`` over the concatenated w1, w3, w2 (``W̄`` the
    ``weights``-average): 0 when the experts are equal; what averaging throws away."""
    tensors = [experts.w1, experts.w3, experts.w2, *experts._each(lambda t: t, False).values()]
    flat = torch.cat([t.flatten(1) for t in tensors if t is not None], dim=1)  # [E, P]
    mean = weights @ flat
    num = (weights * ((flat - mean) ** 2).sum(1)).sum()
    return float(num / (weights * (flat**2).sum(1)).sum().clamp(min=1e-30))


def stacked(parts: list[Experts]) -> Experts:
    """The experts of ``parts`` as one layer, in order (every tensor concatenated)."""

    def cat(name: str) -> torch.Tensor | None:
        ts = [getattr(p, name) for p in parts]
        return None if ts[0] is None else torch.cat(ts)

    fields = ("w1", "w3", "w2", "router", "bias", "b1", "b3", "b2", "router_bias")
    return Experts(*(cat(f) for f in fields))  # type: ignore[arg-type]


# ---- slice: one wide MLP of E·I neurons, sliced to I and refit ----------------------------------
def wide_scores(experts: Experts, mean_gate: torch.Tensor) -> torch.Tensor:
    """``[E, I]``: the scale of each neuron's column in the wide MLP, its mean routing weight
    times the norm of its down-projection column (``mean_gate`` ``[E]``)."""
    return mean_gate[:, None] * torch.linalg.norm(experts.w2, dim=1)


def select_neurons(
    h: torch.Tensor, scale: torch.Tensor, keep: int, gram_limit: int = 8192
) -> tuple[list[int], list[float]]:
    """The ``keep`` columns of the wide intermediate ``h`` ``[n, E·I]`` (scaled by ``scale``
    ``[E·I]``) that contribute most: greedy pivoting (a partial pivoted Cholesky of the scaled
    Gram matrix), so each pick is the neuron whose scaled activation has the largest part not
    explained by the neurons picked before (a neuron duplicated in several experts is kept
    once). The Gram matrix ``[E·I, E·I]`` is formed when ``E·I <= gram_limit``; above, each
    pick computes its column from ``h`` (one pass). When the sample has fewer independent
    directions than ``keep`` the rest follow by scaled norm. Returns the flat indices
    ``e·I + j`` in pick order and the residual norm at each pick."""
    hs = h * scale[None, :]
    width = hs.shape[1]
    gram = hs.T @ hs if width <= gram_limit else None

    def column(p: int) -> torch.Tensor:
        return gram[:, p] if gram is not None else hs.T @ hs[:, p]

    resid = (hs * hs).sum(0)  # squared norm of each column's unexplained part
    first = float(resid.max())
    order = torch.argsort(resid, descending=True, stable=True).tolist()
    factor = torch.zeros((width, keep), dtype=hs.dtype)
    taken = torch.zeros(width, dtype=torch.bool)
    picked: list[int] = []
    gains: list[float] = []
    for t in range(keep):
        p = int(torch.argmax(resid.masked_fill(taken, -math.inf)))
        top = float(resid[p])
        if top <= 1e-12 * max(first, 1e-300):
            break
        col = (column(p) - factor[:, :t] @ factor[p, :t]) / math.sqrt(top)
        factor[:, t] = col
        resid = resid - col * col
        taken[p] = True
        picked.append(p)
        gains.append(math.sqrt(top))
    for p in order:  # rank-deficient sample: fill up by the original scaled norm
        if len(picked) == keep:
            break
        if not taken[p]:
            picked.append(p)
            gains.append(0.0)
            taken[p] = True
    return picked, gains


def ridge_refit(h: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W [H, k]`` minimising ``‖y − h Wᵀ‖² + λ‖W‖²`` for ``h`` ``[n, k]``, ``y`` ``[n, H]``,
    with ``λ = ridge · trace(hᵀh) / k`` (float64 normal equations, a Cholesky solve)."""
    gram = h.T @ h
    lam = ridge * float(torch.trace(gram)) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, h.T @ y).T


# ---- fewer experts: HC-SMoE grouping, NAEE pruning --------------------------------------------
def group_experts(outputs: torch.Tensor, k: int) -> list[list[int]]:
    """HC-SMoE: ``k`` groups of experts by the cosine distance of their outputs ``[E, n, H]``
    on calibration rows (``scipy.cluster.hierarchy``, average linkage, the tree cut at
    exactly ``k`` clusters); groups ordered by their smallest expert."""
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import pdist

    count = outputs.shape[0]
    if k >= count:
        return [[e] for e in range(count)]
    feats = outputs.reshape(count, -1).numpy()
    dist = np.clip(pdist(feats, metric="cosine"), 0.0, None)
    labels = cut_tree(linkage(dist, method="average"), n_clusters=k).reshape(-1)
    groups: dict[int, list[int]] = {}
    for e, g in enumerate(labels):
        groups.setdefault(int(g), []).append(e)
    return sorted(groups.values(), key=lambda g: g[0])


def subset_output(
    logits: torch.Tensor,
    outputs: torch.Tensor,
    keep: list[int],
    top_k: int,
    route: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[n, H]``: the MoE output with only the experts ``keep`` (router rows restricted,
    top-``k`` renormalised among them, or ``route(keep, logits[:, keep])`` the family's
    weights), from ``logits`` ``[n, E]`` and ``outputs`` ``[E, n, H]``."""
    if route is None:
        gates = routing_weights(logits[:, keep], top_k)[1]
    else:
        gates = route(keep, logits[:, keep])
    return torch.einsum("ne,enh->nh", gates, outputs[keep])


def prune_experts(
    logits: torch.Tensor,
    outputs: torch.Tensor,
    y: torch.Tensor,
    k: int,
    top_k: int,
    exhaustive_limit: int = 5000,
    route: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[int], float]:
    """NAEE: the ``k`` experts whose keeping (the others removed) reconstructs ``y`` best:
    every subset when there are at most ``exhaustive_limit``, else greedy backward
    elimination (``route``: see :func:`subset_output`). Returns the kept experts (sorted) and
    their relative error."""
    count = outputs.shape[0]

    def err(keep: list[int]) -> float:
        return relative_error(y, subset_output(logits, outputs, keep, top_k, route))

    if math.comb(count, k) <= exhaustive_limit:
        best = min((list(c) for c in itertools.combinations(range(count), k)), key=err)
        return best, err(best)
    keep = list(range(count))
    while len(keep) > k:
        keep = min(([e for e in keep if e != d] for d in keep), key=err)
    return keep, err(keep)


# ---- REAP -----------------------------------------------------------------------------------------
def reap_saliency(gates: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """REAP (Cerebras, 2025): ``[E]``, per expert ``e`` the mean over the rows routed to ``e``
    (``gates[:, e] > 0``) of ``g_e(x) · ‖E_e(x)‖₂``, from the routing weights ``gates`` ``[n, E]``
    and the experts' outputs ``outputs`` ``[E, n, H]``; 0 for an expert no row chose."""
    norms = torch.linalg.norm(outputs, dim=-1).T  # [n, E]
    chosen = gates > 0
    total = (gates * norms * chosen).sum(0)
    count = chosen.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def top_experts(saliency: torch.Tensor, k: int) -> list[int]:
    """The ``k`` experts of highest saliency (ties: the lower index), sorted."""
    order = sorted(range(saliency.numel()), key=lambda e: (-float(saliency[e]), e))
    return sorted(order[:k])
