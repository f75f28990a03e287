"""Collectors: statistics folded in batch by batch from what a hooked module saw.

:class:`Capture` is what one hooked module (a *site*, :data:`SITES`) saw on one batch and
:class:`Collector` the base class :func:`splice.calib.runner.run` feeds. Shipped here:

- :class:`Gram` — ``Σ xᵀx`` in float64 of a site's input or output (SliceGPT's PCA);
- :class:`RouterCounts` — top-k selections and softmax probability mass per expert;
- :class:`NeuronStats` — per-neuron mean ``|h|``, mean ``h²`` and count of the MLP
  intermediate (per expert in an MoE layer);
- :class:`Reservoir` — a seeded uniform sample of (input, output) rows of a site (refits);
- :class:`PooledMean` — the mean over windows of a site's last-real-token (or mean) vector.

:class:`~splice.calib.layer_io.LayerIO` (per-layer cosines and angles) has its own module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


# ---- what a hook sees -----------------------------------------------------------------------------
#: named hook sites of a decoder layer; any other site is a module path inside the layer
#: (``"mlp.up_proj"``), whose first input and first output are captured
SITES: dict[str, str] = {
    "layer": "the decoder layer: x the residual stream entering it [B, T, H], y leaving it",
    "attn": "the attention module: x its normed input [B, T, H], y its output [B, T, H]",
    "mlp": "the MLP (or MoE) block: x its normed input [B, T, H], y its output [B, T, H]",
    "router": "the MoE router: x its input [B*T, H], y the router logits [B*T, E]",
    "mlp_hidden": "the MLP intermediate, input of down_proj [B, T, I]; for an MoE layer, per "
    "expert, the [n, I] intermediate of the n tokens routed to it (input of its w2)",
}

Key = int | tuple[int, int]  # a layer, or (layer, expert)


@dataclass(frozen=True)
class Capture:
    """What one hooked module saw on one batch.

    ``x`` is the module's input and ``y`` its output: ``[B, T, D]``, or ``[B*T, D]`` inside an
    MoE block. ``mask`` (bool, ``x``'s leading shape) is True at real tokens. For
    ``mlp_hidden`` of an MoE layer there is one capture per expert hit in the batch: ``x`` the
    ``[n, I]`` intermediate of the ``n`` real tokens routed to ``expert``, ``y`` the ``[n, H]``
    output of its down projection before weighting, ``weight`` ``[n]`` their routing weights.
    """

    layer: int
    batch: int
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    expert: int | None = None
    weight: torch.Tensor | None = None

    @property
    def key(self) -> Key:
        """``layer``, or ``(layer, expert)`` for an expert's capture."""
        return self.layer if self.expert is None else (self.layer, self.expert)

    def rows(self, part: str = "input") -> torch.Tensor:
        """``[n, D]``: the real tokens' rows of ``x`` (``part="input"``) or ``y``."""
        t = self.x if part == "input" else self.y
        return t[self.mask]


class Collector:
    """A statistic folded in batch by batch from the captures of one hook ``site``.

    Subclasses set ``site`` (a key of :data:`SITES` or a module path inside the layer) and
    ``layers`` (None: every layer), and implement ``update`` and ``result``; ``start`` is called
    once before the first batch, ``finish_batch(b)`` once every layer has run on batch ``b``.
    ``result()`` may be read at any time: in sequential mode ``after_layer`` reads the
    statistics of the layer just run from it.
    """

    site: str = "layer"
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        """Reset; ``num_layers`` is the model's decoder layer count."""

    def update(self, capture: Capture) -> None:
        raise NotImplementedError

    def finish_batch(self, batch: int) -> None:
        """Every hooked layer has seen batch ``batch``."""

    def result(self) -> Any:
        raise NotImplementedError


def _part(part: str, who: str) -> str:
    if part not in ("input", "output"):
        raise SpliceError(f"{who}: part must be 'input' or 'output', got {part!r}")
    return part


def _acc_device(t: torch.Tensor) -> torch.device:
    """Where float64 sums live: the tensor's device, except MPS (no float64) -> CPU."""
    import torch

    return torch.device("cpu") if t.device.type == "mps" else t.device


def _add(sums: dict[Key, torch.Tensor], key: Key, value: torch.Tensor) -> None:
    if key in sums:
        sums[key] += value
    else:
        sums[key] = value.clone()


# ---- collectors -----------------------------------------------------------------------------------
@dataclass
class GramSum:
    """``xtx`` ``[D, D]`` float64: ``Σ xᵀx`` over ``tokens`` real tokens."""

    xtx: torch.Tensor
    tokens: int


@dataclass
class Gram(Collector):
    """``Σ xᵀx`` in float64 over real tokens of a site's input (or output), per layer (per
    (layer, expert) at an MoE ``mlp_hidden``); SliceGPT's PCA basis is its eigh. Holds one
    ``[D, D]`` float64 per key, on the run device (CPU for MPS)."""

    site: str = "layer"
    part: str = "input"
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        _part(self.part, "Gram")
        self._sums: dict[Key, torch.Tensor] = {}
        self._tokens: dict[Key, int] = {}

    def update(self, c: Capture) -> None:
        import torch

        r = c.rows(self.part)
        r = r.to(_acc_device(r), torch.float64)
        _add(self._sums, c.key, r.T @ r)
        self._tokens[c.key] = self._tokens.get(c.key, 0) + r.shape[0]

    def result(self) -> dict[Key, GramSum]:
        return {k: GramSum(v.clone(), self._tokens[k]) for k, v in sorted(self._sums.items())}


@dataclass
class RouterStats:
    """Per layer and expert (``[L, E]``; zero rows for layers not hooked): ``counts`` of
    top-k selections, ``mass`` the summed softmax probability, over ``tokens[l]`` real tokens."""

    counts: np.ndarray
    mass: np.ndarray
    tokens: np.ndarray
    top_k: int

    def frequency(self) -> np.ndarray:
        """``[L, E]``: the share of tokens that select each expert (rows sum to top_k)."""
        return self.counts / np.maximum(self.tokens, 1)[:, None]

    def mean_probability(self) -> np.ndarray:
        """``[L, E]``: the mean router probability of each expert (rows sum to 1)."""
        return self.mass / np.maximum(self.tokens, 1)[:, None]


@dataclass
class RouterCounts(Collector):
    """Top-k selections and probability mass per expert from Mixtral-style router logits:
    softmax over the experts in float32, top-k of it (as transformers routes) -> :class:`RouterStats`.
    ``top_k`` defaults to the model's ``num_experts_per_tok``."""

    site: str = field(default="router", init=False)
    top_k: int | None = None
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        k = self.top_k or getattr(model.config, "num_experts_per_tok", None)
        if not isinstance(k, int) or k < 1:
            raise SpliceError(
                "RouterCounts: give top_k (the model config has no num_experts_per_tok)"
            )
        self._k, self._layers = k, num_layers
        self._counts: np.ndarray | None = None
        self._mass = np.zeros(0)
        self._tokens = np.zeros(num_layers, dtype=np.int64)

    def update(self, c: Capture) -> None:
        import torch

        logits = c.rows("output").float()  # [n, E]
        n, experts = logits.shape
        if self._k > experts:
            raise SpliceError(f"RouterCounts: top_k {self._k} > {experts} experts")
        if self._counts is None:
            self._counts = np.zeros((self._layers, experts), dtype=np.int64)
            self._mass = np.zeros((self._layers, experts))
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, self._k, dim=-1).indices
        self._counts[c.layer] += torch.bincount(top.reshape(-1), minlength=experts).cpu().numpy()
        self._mass[c.layer] += probs.double().sum(0).cpu().numpy()
        self._tokens[c.layer] += n

    def result(self) -> RouterStats:
        counts = self._counts if self._counts is not None else np.zeros((self._layers, 0), int)
        mass = self._mass if self._counts is not None else np.zeros((self._layers, 0))
        return RouterStats(counts, mass, self._tokens, self._k)


@dataclass
class NeuronMoments:
    """Per neuron ``[I]`` float64: ``mean_abs`` = mean |h|, ``mean_sq`` = mean h², over
    ``count`` real tokens (for an expert: the tokens routed to it)."""

    mean_abs: torch.Tensor
    mean_sq: torch.Tensor
    count: int


@dataclass
class NeuronStats(Collector):
    """Per-neuron mean |h|, mean h² and token count of a site's input (default the MLP
    intermediate, per expert in MoE layers) -> ``{key: NeuronMoments}``. Holds 2 ``[I]``
    float64 per key."""

    site: str = "mlp_hidden"
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        self._abs: dict[Key, torch.Tensor] = {}
        self._sq: dict[Key, torch.Tensor] = {}
        self._count: dict[Key, int] = {}

    def update(self, c: Capture) -> None:
        import torch

        h = c.rows("input")
        h = h.to(_acc_device(h), torch.float64)
        _add(self._abs, c.key, h.abs().sum(0))
        _add(self._sq, c.key, (h * h).sum(0))
        self._count[c.key] = self._count.get(c.key, 0) + h.shape[0]

    def result(self) -> dict[Key, NeuronMoments]:
        return {
            k: NeuronMoments(self._abs[k] / n, self._sq[k] / n, n)
            for k, n in sorted(self._count.items())
            if n
        }


@dataclass
class Sample:
    """``x`` ``[k, Din]`` and ``y`` ``[k, Dout]``: a uniform sample of k of the ``seen`` rows."""

    x: torch.Tensor
    y: torch.Tensor
    seen: int


@dataclass
class Reservoir(Collector):
    """A seeded uniform sample (Algorithm R) of at most ``size`` (input, output) token rows of a
    site, per key -> ``{key: Sample}``, for least-squares refits. Holds ``size × (Din + Dout)``
    values per key in ``dtype``, on the run device. The draws of each key come from their own
    generator seeded by (``seed``, key), so the sample does not depend on the other hooks."""

    site: str = "mlp"
    size: int = 1024
    seed: int = 0
    layers: Sequence[int] | None = None
    dtype: str = "float32"

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        if self.size < 1:
            raise SpliceError(f"Reservoir: size must be 1 or more, got {self.size}")
        self._x: dict[Key, torch.Tensor] = {}
        self._y: dict[Key, torch.Tensor] = {}
        self._seen: dict[Key, int] = {}
        self._rng: dict[Key, np.random.Generator] = {}

    def update(self, c: Capture) -> None:
        import torch

        from splice.dtypes import to_torch

        x, y = c.rows("input"), c.rows("output")
        m, key = x.shape[0], c.key
        if m == 0:
            return
        if key not in self._x:
            dt = to_torch(self.dtype)
            self._x[key] = torch.zeros((self.size, x.shape[-1]), dtype=dt, device=x.device)
            self._y[key] = torch.zeros((self.size, y.shape[-1]), dtype=dt, device=y.device)
            layer, expert = (key, -1) if isinstance(key, int) else key
            self._rng[key] = np.random.default_rng([self.seed, layer, expert + 1])
        seen = self._seen.get(key, 0)
        pos = seen + np.arange(m)  # 0-based stream index of each row
        slot = pos.copy()
        late = pos >= self.size
        if late.any():  # row p replaces slot j ~ U{0..p} if j < size (later rows win a slot)
            j = self._rng[key].integers(0, pos[late] + 1)
            slot[late] = np.where(j < self.size, j, -1)
        keep = np.flatnonzero(slot >= 0)
        if keep.size:
            rev = keep[::-1]
            _, first = np.unique(slot[rev], return_index=True)
            rows = np.sort(rev[first])  # the last row to claim each slot
            src = torch.as_tensor(rows, device=x.device)
            dst = torch.as_tensor(slot[rows], device=x.device)
            self._x[key][dst] = x[src].to(self._x[key].dtype)
            self._y[key][dst] = y[src].to(self._y[key].dtype)
        self._seen[key] = seen + m

    def result(self) -> dict[Key, Sample]:
        out = {}
        for k in sorted(self._x):
            n = min(self.size, self._seen[k])
            out[k] = Sample(self._x[k][:n].clone(), self._y[k][:n].clone(), self._seen[k])
        return out


@dataclass
class PooledMean(Collector):
    """Mean over windows of one vector per window of a ``[B, T, D]`` site: its last real token
    (``pool="last"``) or the mean over its real tokens (``"mean"``) -> ``{layer: [D] float64}``.
    Each window's vector is formed in the model dtype, the sum over windows in float64."""

    site: str = "layer"
    part: str = "input"
    pool: str = "last"
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        _part(self.part, "PooledMean")
        if self.pool not in ("last", "mean"):
            raise SpliceError(f"PooledMean: pool must be 'last' or 'mean', got {self.pool!r}")
        self._sums: dict[Key, torch.Tensor] = {}
        self._count: dict[Key, int] = {}

    def update(self, c: Capture) -> None:
        import torch

        t = c.x if self.part == "input" else c.y
        if t.dim() != 3 or c.mask.dim() != 2:
            raise SpliceError(
                f"PooledMean: site {self.site!r} gives {list(t.shape)}, not [B, T, D] windows"
            )
        m = c.mask
        if self.pool == "last":
            last = m.shape[1] - 1 - m.flip(1).int().argmax(1)  # each window's last real token
            v = t[torch.arange(t.shape[0], device=t.device), last]
        else:
            w = m[..., None].to(t.dtype)
            v = (t * w).sum(1) / w.sum(1)
        _add(self._sums, c.key, v.to(_acc_device(v), torch.float64).sum(0))
        self._count[c.key] = self._count.get(c.key, 0) + t.shape[0]

    def result(self) -> dict[Key, torch.Tensor]:
        return {k: s / self._count[k] for k, s in sorted(self._sums.items())}
