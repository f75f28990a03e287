"""Merge and prune in one search: ``genome.prune: layers``.

The genes are the parameter-space genome's (``splice.evolve.genome``), then one **keep gene**
per layer: layer ``i`` is in the candidate when ``x[merge_dim + i] > 0.5``. At least one layer
must be kept (a candidate that keeps none fails and scores worst). Every keep gene starts at
0.75 (every layer kept: the plain merge), whatever ``search.start``; ``random_init`` draws them
uniformly like the others.

The recipe: every layer kept, exactly the plain genome's recipe; otherwise the same merge as
``slices`` over the runs of kept layers (split at the genome's layer groups), each slice with
the values its layers have in the plain recipe (``smooth``: the per-layer values of the
gradient, as a gradient over the slice). ``splice merge`` writes it as a model of the kept
layers that transformers loads. As in any sliced recipe, the embeddings take the first slice's
values and the final norm and head the last slice's: with ``layer_granularity: 0`` (one set of
values for every layer) they are the plain merge's.

``size(x)``: the candidate's parameters over the full model's (every tensor of the first
source counted, embeddings and head included), in (0, 1]; with ``search.size_weight`` w the
search maximizes ``fitness - w * size``.

In a search (:func:`show_layers`) no weight is copied: the resident module keeps every layer,
its decoder-layer list is pointed at the kept ones (their attention's ``layer_idx`` and the
config's layer count and per-layer fields set as the written model's), and the pruned recipe is
merged into that view, so the candidate scored is the model ``splice merge`` writes. Every layer
kept puts the whole list back.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError
from splice.evolve.config import GenomeSpec
from splice.evolve.genome import ParameterGenome, _check_size

if TYPE_CHECKING:
    import torch

    from splice.checkpoint import Checkpoint

#: where every keep gene starts (kept; CMA-ES's sigma0 1/6 flips one in about 7% of samples)
KEEP = 0.75


@dataclass(frozen=True)
class PrunedParameterGenome(ParameterGenome):
    """:class:`ParameterGenome`'s genes, then one keep gene per layer (the module docstring).
    ``layer_params``: each layer's parameter count; ``other_params``: the rest's."""

    layer_params: tuple[int, ...] = ()
    other_params: int = 0
    donor: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layer_params) != self.num_layers:
            raise SpliceError(
                f"genome: {len(self.layer_params)} layer sizes for {self.num_layers} layers"
            )

    # ---- shape --------------------------------------------------------------------------------
    @property
    def merge_dim(self) -> int:
        """The merge's genes (before the keep genes)."""
        return math.prod(self.shape)

    @property
    def dim(self) -> int:
        return self.merge_dim + self.num_layers

    def names(self) -> list[str]:
        return [*super().names(), *(f"keep.{i}" for i in range(self.num_layers))]

    # ---- start --------------------------------------------------------------------------------
    def start(
        self, start: float | str = 0.5, *, random_init: bool = False, seed: int = 0
    ) -> np.ndarray:
        """The merge's start, every layer kept (``random_init``: every gene uniform)."""
        if random_init:
            return np.random.default_rng(seed).uniform(0, 1, self.dim)
        return self._with_keep(super().start(start))

    def grid(self) -> list[tuple[str, np.ndarray]]:
        """The merge's grid points (where the genome has them), every layer kept."""
        grid = getattr(super(), "grid", None)
        return [(label, self._with_keep(x)) for label, x in (grid() if grid else [])]

    def corners(self) -> list[tuple[str, np.ndarray]]:
        """The merge's corners with every layer kept, and every gene at 1 but every other
        layer dropped (a recipe of slices)."""
        out = [(what, self._with_keep(x)) for what, x in super().corners()]
        alternate = (np.arange(self.num_layers) % 2 == 0).astype(float)
        out.append(
            ("every gene at 1, every other layer", np.r_[np.ones(self.merge_dim), alternate])
        )
        return out

    def keep_all(self, x: np.ndarray) -> np.ndarray:
        """``x`` with every layer kept (the full model's merge)."""
        return self._with_keep(np.asarray(x, dtype=float))

    def _with_keep(self, x: np.ndarray, keep: float = KEEP) -> np.ndarray:
        return np.r_[x[: self.merge_dim], np.full(self.num_layers, keep)]

    # ---- decoding -----------------------------------------------------------------------------
    def kept_layers(self, x: np.ndarray) -> list[int]:
        """The layers genes ``x`` keep, in order (``SpliceError`` when none)."""
        self.values(x)  # shape and finiteness
        keep = np.asarray(x, dtype=float)[self.merge_dim :]
        kept = [i for i, g in enumerate(keep) if g > 0.5]
        if not kept:
            raise SpliceError("genome: the keep genes drop every layer (keep at least one)")
        return kept

    def size(self, x: np.ndarray) -> float:
        """The candidate's parameters over the full model's."""
        return self.params(x) / (self.other_params + sum(self.layer_params))

    def params(self, x: np.ndarray) -> int:
        """The candidate's parameter count (embeddings, norms and head included)."""
        return self.other_params + sum(self.layer_params[i] for i in self.kept_layers(x))

    def recipe(self, x: np.ndarray) -> dict[str, Any]:
        """The plain recipe when every layer is kept; else its slices over the kept runs."""
        plain = super().recipe(x)
        kept = self.kept_layers(x)
        if len(kept) == self.num_layers:
            return plain
        slices = self._pruned_slices(self.values(x), kept)
        out: dict[str, Any] = {}
        for key, value in plain.items():  # the plain recipe's order, slices for models
            if key in ("models", "slices"):
                out["slices"] = slices
            else:
                out[key] = value
        return out

    def _pruned_slices(self, v: np.ndarray, kept: list[int]) -> list[dict[str, Any]]:
        spec = self.spec
        if spec.merge_method == "slerp":
            groups = self._slerp_slices(v)
        else:
            groups = [self._slice(v, g) for g in range(self.groups)]
        out = []
        if spec.smooth and self.groups > 1 and spec.merge_method != "slerp":
            per_layer = self._layer_values(v)  # [layers, models, sets, genes]
            template = groups[0]
            for a, b in runs(kept):
                slc = _in_range(template, a, b)
                for i in range(len(spec.models)):
                    params = self._params(per_layer[a:b, i], gradient=True)
                    slc["sources"][i]["parameters"] = params
                out.append(slc)
            return out
        for g, template in enumerate(groups):
            lo, hi = self._layers(g)
            for a, b in runs([i for i in kept if lo <= i < hi]):
                out.append(_in_range(template, a, b))
        return out

    def _layer_values(self, v: np.ndarray) -> np.ndarray:
        """Each layer's values in the plain smooth recipe: its gradients (the rounded values
        it writes) at ``t = i / (n - 1)``, as ``splice merge`` resolves them."""
        from splice.merge.params import setting_value

        n = self.num_layers
        out = np.empty((n, *v.shape[1:]))
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            for idx in np.ndindex(*v.shape[1:]):
                m, s, p = idx
                col = [round(float(a), 8) for a in v[:, m, s, p]]
                out[(i, *idx)] = setting_value(col, "", t)
        return out


def _in_range(template: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    """A copy of slice ``template`` over layers ``[a, b)``."""
    slc = copy.deepcopy(template)
    for src in slc["sources"]:
        src["layer_range"] = [a, b]
    return slc


def runs(kept: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of consecutive layers in ``kept`` (ascending)."""
    out: list[tuple[int, int]] = []
    for i in kept:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def param_counts(ckpt: Checkpoint) -> tuple[tuple[int, ...], int]:
    """(each layer's parameter count, every other tensor's) of ``ckpt`` (its tensors as
    stored: a tied head is the embedding, counted once)."""
    index = ckpt.layer_index
    layers = tuple(sum(ckpt.tensors[n].numel for n in index.get(i, [])) for i in range(len(index)))
    return layers, sum(t.numel for t in ckpt.tensors.values()) - sum(layers)


def pruned_genome(
    spec: GenomeSpec, models: Mapping[str, Checkpoint], num_layers: int, dtype: str, seed: int
) -> PrunedParameterGenome:
    """The ``prune: layers`` genome of ``spec`` over ``models`` (headers only)."""
    donor = spec.base_model or spec.models[0]
    layers, other = param_counts(models[donor])
    if len(layers) != num_layers:
        raise SpliceError(
            f"genome: {donor} has {len(layers)} layers, the genome's models {num_layers}"
        )
    genome = PrunedParameterGenome(spec, num_layers, dtype, seed, layers, other, donor)
    _check_size(genome.dim, "the merge's genes and one keep gene per layer")
    return genome


# ---- the in-memory view ---------------------------------------------------------------------------
@dataclass
class _Full:
    """What :func:`show_layers` changes in a module, as it was with every layer."""

    owner: Any
    attr: str
    layers: Any  # the full ModuleList
    config: dict[str, Any]  # the config's values before any view
    layer_idx: list[list[tuple[Any, Any]]]  # per layer: (submodule, its layer_idx)


_FULL: weakref.WeakKeyDictionary[Any, _Full] = weakref.WeakKeyDictionary()


def show_layers(
    module: torch.nn.Module,
    kept: Sequence[int],
    models: Mapping[str, Checkpoint],
    donor: str,
) -> torch.nn.Module:
    """Point ``module`` (built with every layer of ``models[donor]``) at its layers ``kept``,
    as the model of those layers (``splice merge``'s output of a pruned recipe) would be: the
    decoder-layer list, each kept layer's ``layer_idx`` (its KV-cache slot) and the config's
    layer count and per-layer fields. No weight is copied; every layer kept restores the
    module as it was built. Returns ``module``."""
    import torch

    from splice.layer_config import mapped_config
    from splice.layerplan import LayerRef

    spec = models[donor].arch
    full = _FULL.get(module)
    if full is None:
        container = spec.layer_prefix.split(".{i}.")[0]  # model.layers
        parent, _, attr = container.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        layers = getattr(owner, attr)
        idx = [[(m, m.layer_idx) for m in layer.modules() if hasattr(m, "layer_idx")]
               for layer in layers]  # fmt: skip
        full = _Full(owner, attr, layers, {}, idx)
        _FULL[module] = full
    n = len(full.layers)
    kept = list(kept)
    if kept != sorted(set(kept)) or not kept or kept[0] < 0 or kept[-1] >= n:
        raise SpliceError(f"layers {kept}: not ascending layers of a {n}-layer model")
    cfg = module.config
    for key, value in full.config.items():  # back to the full model first
        setattr(cfg, key, value)
    full.config.clear()
    for pairs in full.layer_idx:
        for m, i in pairs:
            m.layer_idx = i
    if len(kept) == n:
        setattr(full.owner, full.attr, full.layers)
        return module
    setattr(full.owner, full.attr, torch.nn.ModuleList([full.layers[i] for i in kept]))
    for j, i in enumerate(kept):
        for m, _ in full.layer_idx[i]:
            m.layer_idx = j
    mapped = mapped_config(models, [LayerRef(donor, i) for i in kept], donor)
    for key, value in list(vars(cfg).items()):  # lists transformers filled in per layer
        if key not in mapped and isinstance(value, (list, tuple)) and len(value) == n:
            mapped[key] = [value[i] for i in kept]
    for key, value in mapped.items():  # the layer count and every per-layer field
        if getattr(cfg, key, None) != value and (
            key == spec.num_layers_key or isinstance(value, list)
        ):
            full.config[key] = getattr(cfg, key, None)
            setattr(cfg, key, value)
    return module
