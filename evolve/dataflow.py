"""Data-flow space (Sakana's DFS): which source layers the residual stream passes through, in
which order, and how it is scaled before each.

The slots are every layer of every genome model, model after model, repeated ``repeats`` (r)
times: ``T = r * sum(L_m)`` slots in that order. The genes are ``[2T]``:

* ``x[:T]`` indicators: slot k is on the path when ``x[k] > 0.5``;
* ``x[T:]`` scales, **one per slot** (not per transition, as Sakana's matrix W): the stream is
  multiplied by ``low * (high / low) ** g`` before the slot's layer (``ranges.scale``, default
  [0.5, 2]: gene 0.5 is scale 1).

The path decodes into a ``layer_path`` recipe (``merge_method: passthrough``; embeddings,
final norm and head from ``base_model``, else the first model), which ``splice merge`` writes
with the scales folded into the residual writers. In a search no weight is copied:
:class:`PathModels` runs the resident sources' own layer modules in path order, each behind a
``Step`` wrapper (its scale, its own KV-cache slot). The start: the first model's layers once (the first repetition's
slots of it on, 0.75; the others off, 0.25), every scale 1.

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
    """Indicators and per-slot scales over ``repeats`` copies of every model's layers."""

    spec: GenomeSpec
    layers: tuple[int, ...]  # layers per genome model
    dtype: str = "float32"
    seed: int = 0
    slots: tuple[tuple[str, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        slots = [
            (m, i)
            for _ in range(self.spec.repeats)
            for m, n in zip(self.spec.models, self.layers, strict=True)
            for i in range(n)
        ]
        object.__setattr__(self, "slots", tuple(slots))

    @property
    def donor(self) -> str:
        """The model whose embeddings, final norm and head the path uses."""
        return self.spec.base_model or self.spec.models[0]

    @property
    def dim(self) -> int:
        return 2 * len(self.slots)

    def names(self) -> list[str]:
        n = len(self.slots)
        reps = [k // (n // self.spec.repeats) for k in range(n)]
        on = [f"on.{_label(m)}.{i}.r{r}" for (m, i), r in zip(self.slots, reps, strict=True)]
        return on + [name.replace("on.", "scale.", 1) for name in on]

    def start(
        self, start: float | str = 0.5, *, random_init: bool = False, seed: int = 0
    ) -> np.ndarray:
        """x0 ``[2T]``: the first model's layers once, every scale 1 (``random_init``: uniform)."""
        if random_init:
            return np.random.default_rng(seed).uniform(0, 1, self.dim)
        first = self.spec.models[0]
        per_rep = len(self.slots) // self.spec.repeats
        on = [ON if (m == first and k < per_rep) else OFF for k, (m, _) in enumerate(self.slots)]
        lo, hi = self.spec.range_of("scale")
        g1 = math.log(1 / lo) / math.log(hi / lo) if lo < 1 < hi else 0.5
        return np.array(on + [g1] * len(self.slots))

    def corners(self) -> list[tuple[str, np.ndarray]]:
        """Every slot on at the highest scale, and every slot on at the lowest."""
        n = len(self.slots)
        return [
            ("every gene at 1", np.ones(self.dim)),
            ("every slot on, scales at 0", np.r_[np.ones(n), np.zeros(n)]),
        ]

    def path(self, x: np.ndarray) -> list[dict[str, Any]]:
        """The ``layer_path`` steps ``[{model, layer, scale}]`` that genes ``x`` select."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise SpliceError(f"genome: expected {self.dim} genes, got {list(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise SpliceError("genome: genes must be finite")
        n = len(self.slots)
        lo, hi = self.spec.range_of("scale")
        steps = []
        for k, (m, i) in enumerate(self.slots):
            if x[k] > 0.5:
                g = float(np.clip(x[n + k], 0, 1))
                steps.append({"model": m, "layer": i, "scale": round(lo * (hi / lo) ** g, 8)})
        if not steps:
            raise SpliceError("genome: the data-flow genes put no layer on the path")
        return steps

    def recipe(self, x: np.ndarray) -> dict[str, Any]:
        """A ``layer_path`` recipe for genes ``x`` (``splice merge`` folds the scales)."""
        return {
            "merge_method": "passthrough",
            "layer_path": self.path(x),
            "base_model": self.donor,
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
    and per-layer fields (``layer_types``, ...) set as the written output's would be."""

    def __init__(
        self,
        sources: Mapping[str, Any],
        donor: str,
        options: MergeOptions,
        dtype: str,
    ) -> None:

        from splice.merge.runner import merge_into, plan
        from splice.resident import empty_model

        self.donor = donor
        self.modules: dict[str, torch.nn.Module] = {}
        self.layers: dict[str, list[torch.nn.Module]] = {}
        spec = sources[donor].arch
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
        self.shell = self.modules[donor]
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

    def build(self, steps: list[dict[str, Any]]) -> torch.nn.Module:
        """The donor module running ``steps`` (a ``layer_path``: ``{model, layer, scale}``)."""
        import torch

        layers = [
            self.Step(self.layers[s["model"]][s["layer"]], float(s.get("scale", 1.0)), j)
            for j, s in enumerate(steps)
        ]
        parent, _, attr = self.container.rpartition(".")
        owner = self.shell.get_submodule(parent) if parent else self.shell
        setattr(owner, attr, torch.nn.ModuleList(layers))
        refs = [LayerRef(s["model"], int(s["layer"])) for s in steps]
        mapped = mapped_config(self.sources, refs, self.donor)
        cfg = self.shell.config
        for key in self.per_layer[self.donor]:  # lists the config.json left to their default
            if key not in mapped and all(key in self.per_layer[r.model] for r in refs):
                mapped[key] = [self.per_layer[r.model][key][r.layer] for r in refs]
        for key, value in mapped.items():  # the layer count and every per-layer field
            if getattr(cfg, key, None) != value and (
                key == self.sources[self.donor].arch.num_layers_key or isinstance(value, list)
            ):
                setattr(cfg, key, value)
        return self.shell
