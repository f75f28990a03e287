"""Data-flow space (Sakana's DFS): which source layers the residual stream passes through, in
which order, and how it is scaled before each.

The slots are every layer of every genome model, model after model, repeated ``repeats``
(Sakana's r) times: ``T = r * M`` slots in that order, ``M = sum(L_m)`` the models' layers. The
genes are, in this order:

* ``x[:T]`` indicators (Sakana's I): slot k is on the path when ``x[k] > 0.5``;
* the scales (``genome.scales``); a scale gene ``g`` is the factor ``low * (high / low) ** g``
  (``ranges.scale``, default [0.5, 2]: gene 0.5 is scale 1) the stream is multiplied by before
  a layer:

  - ``per_slot`` (the default): ``T`` genes, one per slot;
  - ``per_transition`` (Sakana's W): ``(M + 1) * M`` genes, the matrix ``W[p, j]`` row after
    row: the input of layer ``j`` is scaled by ``W[p, j]`` when the layer before it on the path
    is ``p``; row 0 is the embeddings (the first layer of a path), row ``1 + i`` layer ``i``.
    A layer is numbered by its place among the ``M`` layers (model after model), so a layer
    met in two repetitions shares its row and column;

* with ``donor: gene``: one gene per model; the highest picks the donor (the first on a tie).

The donor gives the embeddings, final norm and head: ``base_model`` (``donor: MODEL`` is the
same), else the first model, or the donor gene's pick. The path decodes into a ``layer_path``
recipe (``merge_method: passthrough``, ``base_model`` the donor, each step's ``scale`` its slot's
or its transition's), which ``splice merge`` writes with the scales folded into the residual
writers. In a search no weight is copied: :class:`PathModels` runs the resident sources' own
layer modules in path order, each behind a ``Step`` wrapper (its scale, its own KV-cache slot),
in the donor's module. The start: the first model's layers once (the first repetition's slots
of it on, 0.75; the others off, 0.25), every scale 1, the first model the donor.

Only models of one family and hidden size can share a path: :func:`splice.evolve.genome.
check_genome` plans the start and every-slot-on corners (each donor) before a search, and the
planner refuses an architecture or hidden-size mismatch.

Both in sequence (Sakana's PS + DFS): name a finished parameter-space run folder as a model;
``splice.evolve.search.with_winners`` merges its ``best.yml`` once into ``RUN/winner`` and the
data-flow search uses that folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError
from splice.evolve.config import GenomeSpec
from splice.evolve.genome import GENOMES, _label
from splice.layer_config import mapped_config
from splice.layerplan import LayerRef

if TYPE_CHECKING:
    import torch

    from splice.checkpoint import Checkpoint
    from splice.merge.runner import MergeOptions

ON, OFF = 0.75, 0.25


@GENOMES.register("dataflow")
@dataclass(frozen=True)
class DataFlowGenome:
    """Indicators over ``repeats`` copies of every model's layers, scales per slot or per
    transition (Sakana's W), and, with ``donor: gene``, one donor gene per model."""

    spec: GenomeSpec
    layers: tuple[int, ...]  # layers per genome model
    dtype: str = "float32"
    seed: int = 0
    slots: tuple[tuple[str, int], ...] = field(init=False)
    #: the M distinct layers (W's rows after the embeddings' row, and its columns)
    ids: tuple[tuple[str, int], ...] = field(init=False)
    _col: dict[tuple[str, int], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = [(m, i) for m, n in zip(self.spec.models, self.layers, strict=True) for i in range(n)]
        object.__setattr__(self, "ids", tuple(ids))
        object.__setattr__(self, "slots", tuple(ids) * self.spec.repeats)
        object.__setattr__(self, "_col", {ref: j for j, ref in enumerate(ids)})

    # ---- shape --------------------------------------------------------------------------------
    @property
    def transitions(self) -> bool:
        """Whether the scales are Sakana's W (per transition) rather than one per slot."""
        return self.spec.scales == "per_transition"

    @property
    def num_scales(self) -> int:
        """``T`` per slot, ``(M + 1) * M`` per transition."""
        m = len(self.ids)
        return (m + 1) * m if self.transitions else len(self.slots)

    @property
    def donors(self) -> tuple[str, ...]:
        """The models a donor gene picks from (``donor: gene``), else the fixed donor."""
        return tuple(self.spec.models) if self.spec.donor == "gene" else (self.fixed_donor,)

    @property
    def fixed_donor(self) -> str:
        return self.spec.base_model or self.spec.models[0]

    @property
    def donor(self) -> str | None:
        """The model whose embeddings, final norm and head every path uses; ``None`` with
        ``donor: gene`` (each candidate's is its recipe's ``base_model``)."""
        return None if self.spec.donor == "gene" else self.fixed_donor

    @property
    def dim(self) -> int:
        donor_genes = len(self.donors) if self.spec.donor == "gene" else 0
        return len(self.slots) + self.num_scales + donor_genes

    def layout(self) -> str:
        """The genes in words (for the size check's message)."""
        m = len(self.ids)
        what = f"{self.spec.repeats} repeats of {m} layers, "
        if self.transitions:
            what += f"an indicator each, and a {m + 1}x{m} scale matrix"
        else:
            what += "two genes each"
        return what + (f", and {len(self.donors)} donor genes" if self.spec.donor == "gene" else "")

    def names(self) -> list[str]:
        per_rep = len(self.ids)
        on = [f"on.{_label(m)}.{i}.r{k // per_rep}" for k, (m, i) in enumerate(self.slots)]
        if self.transitions:
            rows = ["embed"] + [f"{_label(m)}.{i}" for m, i in self.ids]
            scales = [f"W.{p}>{_label(m)}.{i}" for p in rows for m, i in self.ids]
        else:
            scales = [name.replace("on.", "scale.", 1) for name in on]
        donors = [f"donor.{_label(m)}" for m in self.donors] if self.spec.donor == "gene" else []
        return on + scales + donors

    # ---- start --------------------------------------------------------------------------------
    def start(
        self, start: float | str = 0.5, *, random_init: bool = False, seed: int = 0
    ) -> np.ndarray:
        """x0: the first model's layers once, every scale 1, the donor the first model
        (``random_init``: uniform)."""
        if random_init:
            return np.random.default_rng(seed).uniform(0, 1, self.dim)
        return self._point(self.spec.models[0], self.donors[0])

    def _point(self, model: str, donor: str) -> np.ndarray:
        """``model``'s layers once (the first repetition's slots), every scale 1, ``donor``."""
        per_rep = len(self.ids)
        on = [ON if (m == model and k < per_rep) else OFF for k, (m, _) in enumerate(self.slots)]
        lo, hi = self.spec.range_of("scale")
        g1 = math.log(1 / lo) / math.log(hi / lo) if lo < 1 < hi else 0.5
        donors = [ON if d == donor else OFF for d in self.donors]
        return np.array(on + [g1] * self.num_scales + (donors if self.spec.donor == "gene" else []))

    def grid(self) -> list[tuple[str, np.ndarray]]:
        """Each model's layers once, every scale 1, with each donor (``search.grid``'s
        generation 0: a donor that reads the task and a model's layers that solve it may come
        from different models)."""
        return [
            (f"{_label(m)} layers, donor {_label(d)}", self._point(m, d))
            for d in self.donors
            for m in self.spec.models
        ]

    def corners(self) -> list[tuple[str, np.ndarray]]:
        """Every slot on at the highest scale, every slot on at the lowest, and every slot on
        with each other donor (``donor: gene``)."""
        n, s = len(self.slots), self.num_scales
        out = [
            ("every gene at 1", np.ones(self.dim)),
            ("every slot on, scales at 0", np.r_[np.ones(n), np.zeros(self.dim - n)]),
        ]
        if self.spec.donor == "gene":
            for k, d in enumerate(self.donors[1:], start=1):
                x = np.r_[np.ones(n), np.zeros(self.dim - n)]
                x[n + s + k] = 1.0
                out.append((f"every slot on, donor {_label(d)}", x))
        return out

    # ---- decoding -----------------------------------------------------------------------------
    def _genes(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise SpliceError(f"genome: expected {self.dim} genes, got {list(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise SpliceError("genome: genes must be finite")
        return x

    def scale_gene(self, prev: tuple[str, int] | None, layer: tuple[str, int]) -> int:
        """Per transition: the index in x of ``W[prev, layer]`` (``prev`` ``None``: the
        embeddings, row 0; layer ``(model, i)``: row ``1 + id``; column ``id``; a layer's id
        is its place among every model's layers, model after model)."""
        col = self._col
        row = 0 if prev is None else 1 + col[prev]
        return len(self.slots) + row * len(self.ids) + col[layer]

    def path(self, x: np.ndarray) -> list[dict[str, Any]]:
        """The ``layer_path`` steps ``[{model, layer, scale}]`` that genes ``x`` select."""
        x = self._genes(x)
        n = len(self.slots)
        lo, hi = self.spec.range_of("scale")
        steps: list[dict[str, Any]] = []
        prev: tuple[str, int] | None = None
        for k, (m, i) in enumerate(self.slots):
            if x[k] > 0.5:
                gene = self.scale_gene(prev, (m, i)) if self.transitions else n + k
                g = float(np.clip(x[gene], 0, 1))
                steps.append({"model": m, "layer": i, "scale": round(lo * (hi / lo) ** g, 8)})
                prev = (m, i)
        if not steps:
            raise SpliceError("genome: the data-flow genes put no layer on the path")
        return steps

    def donor_of(self, x: np.ndarray) -> str:
        """The donor genes ``x`` pick (the highest donor gene; the first on a tie)."""
        if self.spec.donor != "gene":
            return self.fixed_donor
        x = self._genes(x)
        return self.donors[int(np.argmax(x[len(self.slots) + self.num_scales :]))]

    def recipe(self, x: np.ndarray) -> dict[str, Any]:
        """A ``layer_path`` recipe for genes ``x`` (``splice merge`` folds the scales)."""
        return {
            "merge_method": "passthrough",
            "layer_path": self.path(x),
            "base_model": self.donor_of(x),
            "dtype": self.dtype,
        }


def dataflow_genome(spec: GenomeSpec, models: Mapping[str, Checkpoint], dtype: str, seed: int):
    return DataFlowGenome(spec, tuple(models[m].num_layers for m in spec.models), dtype, seed)


# ---- the in-memory path model -------------------------------------------------------------------
def _step_class() -> type:
    import torch

    class Step(torch.nn.Module):
        """Position ``index`` of a path: a shared decoder layer run on the stream times
        ``scale``, its attention using cache slot ``index`` (a layer met twice on a path would
        otherwise write its KV cache twice). No weight is copied."""

        def __init__(self, layer: torch.nn.Module, scale: float, index: int) -> None:
            super().__init__()
            self.layer, self.scale, self.index = layer, scale, index
            if hasattr(layer, "attention_type"):
                self.attention_type = layer.attention_type
            self._slots = [m for m in layer.modules() if hasattr(m, "layer_idx")]

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            for m in self._slots:
                m.layer_idx = self.index
            if self.scale != 1.0:
                hidden_states = hidden_states * self.scale
            return self.layer(hidden_states, *args, **kwargs)

    return Step


class PathModels:
    """Every source as a live module (loaded once from the resident sources); :meth:`build`
    returns the donor's module with its decoder layers replaced by the path's (shared modules,
    each behind a ``Step``: its scale and its own KV-cache slot) and its config's layer count
    and per-layer fields (``layer_types``, ...) set as the written output's would be.

    ``donor`` is the default donor; ``None`` (a donor gene) makes every :meth:`build` name its
    own (the recipe's ``base_model``)."""

    def __init__(
        self,
        sources: Mapping[str, Any],
        donor: str | None,
        options: MergeOptions,
        dtype: str,
    ) -> None:

        from splice.merge.runner import merge_into, plan
        from splice.resident import empty_model

        self.donor = donor
        self.modules: dict[str, torch.nn.Module] = {}
        self.layers: dict[str, list[torch.nn.Module]] = {}
        spec = sources[donor if donor is not None else next(iter(sources))].arch
        self.container = spec.layer_prefix.split(".{i}.")[0]  # model.layers
        for ref, ckpt in sources.items():
            recipe = {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": ref, "layer_range": [0, ckpt.num_layers]}]}],
                "dtype": dtype,
            }
            p = plan(recipe, options, {ref: ckpt})
            module = empty_model(p.config, device=options.device, dtype=dtype)
            merge_into(module, p, {ref: ckpt}, options)
            self.modules[ref] = module
            self.layers[ref] = list(module.get_submodule(self.container))
        self.sources = dict(sources)
        self.shell = self.modules[donor] if donor is not None else None
        self.Step = _step_class()
        #: each source's per-layer config lists as transformers filled them in (a config.json
        #: may leave ``layer_types`` to its default), before :meth:`build` changes the donor's
        self.per_layer = {
            ref: {
                k: list(v)
                for k, v in vars(m.config).items()
                if isinstance(v, (list, tuple)) and len(v) == sources[ref].num_layers
            }
            for ref, m in self.modules.items()
        }

    def build(self, steps: list[dict[str, Any]], donor: str | None = None) -> torch.nn.Module:
        """The donor module running ``steps`` (a ``layer_path``: ``{model, layer, scale}``,
        each step's ``scale`` multiplying the stream before its layer: its slot's or its
        transition's); ``donor``: whose embeddings, final norm and head (default: the
        constructor's)."""
        import torch

        donor = donor if donor is not None else self.donor
        if donor is None:
            raise SpliceError(
                "data-flow: this path model has no fixed donor (donor: gene); build each path "
                "with its recipe's base_model as the donor"
            )
        if donor not in self.modules:
            raise SpliceError(f"data-flow: the donor {donor} is not one of the sources")
        self.shell = shell = self.modules[donor]
        layers = [
            self.Step(self.layers[s["model"]][s["layer"]], float(s.get("scale", 1.0)), j)
            for j, s in enumerate(steps)
        ]
        parent, _, attr = self.container.rpartition(".")
        owner = shell.get_submodule(parent) if parent else shell
        setattr(owner, attr, torch.nn.ModuleList(layers))
        refs = [LayerRef(s["model"], int(s["layer"])) for s in steps]
        mapped = mapped_config(self.sources, refs, donor)
        cfg = shell.config
        for key in self.per_layer[donor]:  # lists the config.json left to their default
            if key not in mapped and all(key in self.per_layer[r.model] for r in refs):
                mapped[key] = [self.per_layer[r.model][key][r.layer] for r in refs]
        for key, value in mapped.items():  # the layer count and every per-layer field
            if getattr(cfg, key, None) != value and (
                key == self.sources[donor].arch.num_layers_key or isinstance(value, list)
            ):
                setattr(cfg, key, value)
        return shell
