"""Genomes: a point x in [0, 1]^d <-> a merge recipe that ``splice merge`` runs.

Parameter space (``space: parameter``, mergekit-evolve's genome): the genes form an array
``[groups, models, sets, genes]``:

* ``groups``: ``num_layers / layer_granularity`` consecutive layer groups (1 when 0);
* ``models``: the genome's models, in order;
* ``sets``: one per ``filters`` entry, plus one for every other tensor;
* ``genes``: the method's per-model parameters (``weight``; ``weight, density``; slerp: one
  score per model).

Gene ``g`` decodes to ``low + g * (high - low)`` of its parameter's range
(:meth:`GenomeSpec.range_of`). Groups become slices (``smooth: false``) or a gradient over the
layers (``smooth: true``); sets become ``{filter, value}`` conditions. Slerp, as in
mergekit-evolve: per group the two models with the highest scores are merged, the first as the
base, ``t = softmax(scores)[1]``.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError
from splice.evolve.config import MAX_GENES, EvolveConfig, GenomeSpec
from splice.registry import Registry

if TYPE_CHECKING:
    from splice.checkpoint import Checkpoint
    from splice.merge.runner import MergeOptions

#: genome spaces by name (``genome.space``)
GENOMES: Registry[type] = Registry("genome space")


@GENOMES.register("parameter")
@dataclass(frozen=True)
class ParameterGenome:
    """mergekit-evolve's parameter-space genome over ``num_layers`` layers (see the module
    docstring); ``dtype`` and ``seed`` go into every recipe."""

    spec: GenomeSpec
    num_layers: int
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        g = self.spec.layer_granularity
        if g > 0 and self.num_layers % g:
            raise SpliceError(
                f"genome: layer_granularity {g} does not divide the models' {self.num_layers} "
                "layers"
            )

    # ---- shape --------------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        g = self.spec.layer_granularity
        return self.num_layers // g if g > 0 else 1

    @property
    def sets(self) -> int:
        return len(self.spec.filters or []) + 1

    @property
    def genes(self) -> tuple[str, ...]:
        return self.spec.genes

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``[groups, models, sets, genes]``."""
        return (self.groups, len(self.spec.models), self.sets, len(self.genes))

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def names(self) -> list[str]:
        """One label per gene, in x's order: ``math.weight.self_attn.g0``."""
        labels = [_label(m) for m in self.spec.models]
        filters = [*(self.spec.filters or []), "rest"]
        out = []
        for g in range(self.groups):
            for m in labels:
                for s in range(self.sets):
                    for gene in self.genes:
                        f = f".{filters[s]}" if self.sets > 1 else ""
                        out.append(f"{m}.{gene}{f}.g{g}")
        return out

    # ---- start --------------------------------------------------------------------------------
    def start(
        self, start: float | str = 0.5, *, random_init: bool = False, seed: int = 0
    ) -> np.ndarray:
        """x0 ``[d]``: every gene at ``start``, mergekit-evolve's start (``"mergekit"``: weights
        1/n, densities 1), or uniform in [0, 1] (``random_init``, seeded)."""
        if random_init:
            return np.random.default_rng(seed).uniform(0, 1, self.dim)
        if start != "mergekit":
            return np.full(self.dim, float(start))
        values = np.zeros(self.shape)
        values[..., 0] = 1 / len(self.spec.models)
        values[..., 1:] = 1.0
        genes = np.empty(self.shape)
        for p, gene in enumerate(self.genes):
            lo, hi = self.spec.range_of(gene)
            genes[..., p] = (values[..., p] - lo) / (hi - lo)
        return np.clip(genes, 0, 1).reshape(-1)

    def grid(self) -> list[tuple[str, np.ndarray]]:
        """A few obvious points of the space, (label, genes ``[d]``), every layer group and
        tensor set alike: weights in {0.5, 0.8, 1.0} (methods with a density: {0.5, 1.0}, each
        with densities {0.5, 0.7, 1.0}) per model for two models, equal for more; slerp: t at
        0.27, 0.5 and 0.73 (softmax of scores 0 and 1). Points outside the genes' ranges are
        clipped into them; duplicates are left out, and so are weights whose ratios another
        point has where the merge normalizes them (the same merge)."""
        spec, n = self.spec, len(self.spec.models)
        labels = [_label(m) for m in spec.models]
        if spec.merge_method == "slerp":
            rows = [
                ("slerp t 0.27", [[1.0] + [0.0] * (n - 1)]),
                ("slerp t 0.5", [[1.0] * n]),
                ("slerp t 0.73", [[0.0, 1.0] + [0.0] * (n - 2)]),
            ]
            points = [(label, np.array(v[0], dtype=float).reshape(1, n, 1, 1)) for label, v in rows]
        else:
            dense = len(self.genes) > 1
            ws = (0.5, 1.0) if dense else (0.5, 0.8, 1.0)
            combos = list(itertools.product(ws, repeat=2)) if n == 2 else [(w,) * n for w in ws]
            if spec.normalize_flag():  # normalized weights: only their ratios make a merge
                ratios = {tuple(w / sum(c) for w in c): c for c in reversed(combos)}
                combos = [c for c in combos if c in ratios.values()]
            points = []
            for weights in combos:
                for d in (0.5, 0.7, 1.0) if dense else (None,):
                    label = f"{spec.merge_method} " + " ".join(
                        f"{m} {w:g}" for m, w in zip(labels, weights, strict=True)
                    )
                    values = [[w] + ([d] if dense else []) for w in weights]
                    points.append((label + (f" density {d:g}" if dense else ""), values))
            k = len(self.genes)
            points = [(label, np.array(v, dtype=float).reshape(1, n, 1, k)) for label, v in points]
        out: list[tuple[str, np.ndarray]] = []
        seen: set[bytes] = set()
        for label, v in points:
            values = np.broadcast_to(v, self.shape)  # every group and set alike
            x = np.empty(self.shape)
            for p, gene in enumerate(self.genes):
                lo, hi = self.spec.range_of(gene)
                x[..., p] = (values[..., p] - lo) / (hi - lo)
            x = np.clip(x, 0, 1).reshape(-1)
            if x.tobytes() not in seen:
                seen.add(x.tobytes())
                out.append((label, x))
        return out

    def corners(self) -> list[tuple[str, np.ndarray]]:
        """Points whose recipes must plan for the genome's bounds to be usable: every gene at 1,
        and every gene at 0 but the weights (all-zero weights are one point, not the bounds:
        met in a search, they score worst)."""
        low = np.zeros(self.shape)
        if self.spec.merge_method != "slerp":
            low[..., 0] = 1.0
        return [("every gene at 1", np.ones(self.dim)), ("genes at 0", low.reshape(-1))]

    # ---- decoding -----------------------------------------------------------------------------
    def values(self, x: np.ndarray) -> np.ndarray:
        """Parameter values ``[groups, models, sets, genes]`` for genes ``x`` ``[d]``."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise SpliceError(f"genome: expected {self.dim} genes, got {list(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise SpliceError("genome: genes must be finite")
        genes = np.clip(x[: math.prod(self.shape)], 0, 1).reshape(self.shape)  # the merge's
        out = np.empty(self.shape)
        for p, gene in enumerate(self.genes):
            lo, hi = self.spec.range_of(gene)
            out[..., p] = lo + genes[..., p] * (hi - lo)
        return out

    def recipe(self, x: np.ndarray) -> dict[str, Any]:
        """The recipe (a dict of ``splice merge``'s schema) that genes ``x`` stand for."""
        spec = self.spec
        v = self.values(x)
        top: dict[str, Any] = {"merge_method": spec.merge_method}
        if spec.merge_method == "slerp":
            top["slices"] = self._slerp_slices(v)
        elif spec.smooth or self.groups == 1:
            top["models"] = [
                {"model": m, "parameters": self._params(v[:, i], gradient=spec.smooth)}
                for i, m in enumerate(spec.models)
            ]
        else:
            top["slices"] = [self._slice(v, g) for g in range(self.groups)]
        if spec.merge_method != "linear" and spec.base_model:
            top["base_model"] = spec.base_model
        params: dict[str, Any] = {}
        if spec.merge_method != "slerp":
            params["normalize"] = spec.normalize_flag()
        params.update(spec.parameters)
        if params:
            top["parameters"] = params
        top["dtype"] = self.dtype
        if spec.merge_method in ("dare_ties", "della"):
            top["seed"] = self.seed
        if spec.tokenizer_source:
            top["tokenizer_source"] = spec.tokenizer_source
        return top

    def _params(self, v: np.ndarray, *, gradient: bool) -> dict[str, Any]:
        """One model's parameters from its values ``[groups, sets, genes]``."""
        filters: list[str | None] = [*(self.spec.filters or []), None]
        out: dict[str, Any] = {}
        for p, gene in enumerate(self.genes):

            def value(s: int, p: int = p) -> Any:
                col = [round(float(a), 8) for a in v[:, s, p]]
                return col if gradient and len(col) > 1 else col[0]

            if self.sets == 1:
                out[gene] = value(0)
            else:
                out[gene] = [
                    {"filter": f, "value": value(s)} if f else {"value": value(s)}
                    for s, f in enumerate(filters)
                ]
        return out

    def _layers(self, g: int) -> list[int]:
        step = self.num_layers // self.groups
        return [g * step, (g + 1) * step]

    def _slice(self, v: np.ndarray, g: int) -> dict[str, Any]:
        spec = self.spec
        sources = [
            {
                "model": m,
                "layer_range": self._layers(g),
                "parameters": self._params(v[g : g + 1, i], gradient=False),
            }
            for i, m in enumerate(spec.models)
        ]
        if spec.merge_method != "linear" and spec.base_model and spec.base_model not in spec.models:
            sources.append({"model": spec.base_model, "layer_range": self._layers(g)})
        return {"sources": sources}

    def _slerp_slices(self, v: np.ndarray) -> list[dict[str, Any]]:
        slices = []
        for g in range(self.groups):
            scores = v[g, :, 0, 0]
            first, second = np.argsort(-scores, kind="stable")[:2]
            t = 1 / (1 + math.exp(scores[first] - scores[second]))  # softmax(...)[1]
            slices.append(
                {
                    "sources": [
                        {"model": self.spec.models[int(k)], "layer_range": self._layers(g)}
                        for k in (first, second)
                    ],
                    "base_model": self.spec.models[int(first)],
                    "parameters": {"t": round(t, 8)},
                }
            )
        return slices


#: what every genome space provides: ``dim``, ``names()``, ``start(...)``, ``corners()``,
#: ``recipe(x)``
Genome = Any


def _label(ref: str) -> str:
    return os.path.basename(os.path.normpath(ref)) or ref


def build_genome(config: EvolveConfig, models: Mapping[str, Checkpoint]) -> Genome:
    """The genome of ``config`` over the opened source ``models`` (headers only)."""
    spec = config.genome
    cls = GENOMES.get(spec.space)
    if spec.space == "dataflow":
        layers = tuple(models[m].num_layers for m in spec.models)
        genome = cls(spec, layers, config.dtype, config.search.seed)
        _check_size(genome.dim, genome.layout())
        return genome
    n = models[spec.models[0]].num_layers
    groups = n // spec.layer_granularity if spec.layer_granularity else 1
    sets = len(spec.filters or []) + 1
    _check_size(
        groups * len(spec.models) * sets * len(spec.genes), "layer groups x models x sets x genes"
    )
    if spec.prune:  # the merge's genes, then one keep gene per layer
        from splice.evolve.pruning import pruned_genome

        return pruned_genome(spec, models, n, config.dtype, config.search.seed)
    return cls(spec, n, config.dtype, config.search.seed)


def _check_size(dim: int, what: str) -> None:
    if dim > MAX_GENES:
        raise SpliceError(
            f"genome: {dim:,} genes ({what}), more than CMA-ES can search here "
            f"({MAX_GENES:,}: its covariance is genes² numbers); use fewer repeats (or per_slot "
            "scales), a coarser layer_granularity or fewer filters"
        )


def check_genome(
    genome: Genome,
    models: Mapping[str, Checkpoint],
    options: MergeOptions,
    x0: np.ndarray | None = None,
) -> None:
    """Plan the recipes of the start and the bounds' corners against ``models`` (no tensor is
    read): a one-line ``SpliceError`` (the first problem, the others counted) if one cannot
    run; the start is planned first, so sources that cannot be merged at all say so."""
    import warnings

    from splice.errors import SpliceWarning
    from splice.merge.runner import plan

    points = ([("the start", x0)] if x0 is not None else []) + genome.corners()
    for what, x in points:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SpliceWarning)
                plan(genome.recipe(x), options, models)
        except SpliceError as e:
            lines = str(e).splitlines() or ["cannot be planned"]
            more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
            raise SpliceError(
                f"genome: {what} decodes to a recipe that cannot run: {lines[0]}{more}"
            ) from None
