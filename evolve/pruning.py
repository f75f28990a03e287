"""Merge and prune in one search: ``genome.prune: layers | experts | layers+experts``.

The genes are the parameter-space genome's (``splice.evolve.genome``), then, with ``layers``,
one **keep gene** per layer: layer ``i`` is in the candidate when ``x[merge_dim + i] > 0.5``. At
least one layer must be kept (a candidate that keeps none fails and scores worst). Every keep
gene starts at 0.75 (every layer kept: the plain merge), whatever ``search.start``;
``random_init`` draws them uniformly like the others.

With ``experts`` (MoE models; transformers' config has one expert count, so every MoE layer
keeps the same number) come a **count gene**, then one **rank gene** per expert of each MoE
layer of the donor. Over 0.5 the count gene keeps every expert (it starts at 0.75); below, it
picks one of the counts from the top-k up to one fewer than all, spread evenly over [0, 0.5].
Each MoE layer keeps that many experts, those with the highest rank genes (ties: the lower
index), written in index order. The rank genes start at 0.5.

The recipe: every layer and expert kept, exactly the plain genome's recipe; otherwise the
same merge as ``slices`` over the runs of kept layers (split at the genome's layer groups),
each slice with the values its layers have in the plain recipe (``smooth``: the per-layer
values of the gradient, as a gradient over the slice), and ``keep_experts`` (one entry per
written layer, :mod:`splice.expert_subset`). ``splice merge`` writes it as a model of the kept
layers and experts that transformers loads. As in any sliced recipe, the embeddings take the
first slice's values and the final norm and head the last slice's: with
``layer_granularity: 0`` (one set of values for every layer) they are the plain merge's.

``size(x)``: the candidate's parameters over the full model's (every tensor of the first
source counted, embeddings and head included; a kept layer's experts and the router's
per-expert entries in proportion to the experts kept), in (0, 1]; with ``search.size_weight``
w the search maximizes ``fitness - w * size``.

In a search no weight is copied. :func:`show_layers` points the resident module's
decoder-layer list at the kept layers (their attention's ``layer_idx`` and the config's layer
count and per-layer fields set as the written model's); :func:`show_experts` views each packed
expert tensor, router and selection bias at its first ``K`` entries and sets the modules' and
config's expert counts and groups. The pruned recipe is merged into that view, so the
candidate scored is the model ``splice merge`` writes (tested on every MoE family the specs
describe). Every layer and expert kept puts the module back as it was built.
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
class ExpertGenes:
    """What ``prune: experts`` acts on: the donor's layers holding routed ``experts`` each,
    the counts below ``experts`` a candidate may keep (every count from the top-k up), and per
    layer the parameters that scale with the count (``[num_layers]``: the experts' tensors and
    the router's per-expert entries; 0 in a dense layer)."""

    layers: tuple[int, ...]
    experts: int
    counts: tuple[int, ...]
    params: tuple[int, ...]

    @property
    def dim(self) -> int:
        """The count gene, then one rank gene per expert of each MoE layer."""
        return 1 + len(self.layers) * self.experts


@dataclass(frozen=True)
class PrunedParameterGenome(ParameterGenome):
    """:class:`ParameterGenome`'s genes, then one keep gene per layer (``prune_layers``) and
    the expert genes (``moe``; the module docstring). ``layer_params``: each layer's parameter
    count; ``other_params``: the rest's."""

    layer_params: tuple[int, ...] = ()
    other_params: int = 0
    donor: str = ""
    prune_layers: bool = True
    moe: ExpertGenes | None = None

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
    def keep_dim(self) -> int:
        """The keep genes (one per layer, or none)."""
        return self.num_layers if self.prune_layers else 0

    @property
    def dim(self) -> int:
        return self.merge_dim + self.keep_dim + (self.moe.dim if self.moe else 0)

    def names(self) -> list[str]:
        out = [*super().names(), *(f"keep.{i}" for i in range(self.keep_dim))]
        if self.moe:
            out.append("experts")
            out += [f"expert.{i}.{e}" for i in self.moe.layers for e in range(self.moe.experts)]
        return out

    # ---- start --------------------------------------------------------------------------------
    def start(
        self, start: float | str = 0.5, *, random_init: bool = False, seed: int = 0
    ) -> np.ndarray:
        """The merge's start, every layer and expert kept (``random_init``: every gene
        uniform)."""
        if random_init:
            return np.random.default_rng(seed).uniform(0, 1, self.dim)
        return self._with_keep(super().start(start))

    def grid(self) -> list[tuple[str, np.ndarray]]:
        """The merge's grid points (where the genome has them), every layer kept."""
        grid = getattr(super(), "grid", None)
        return [(label, self._with_keep(x)) for label, x in (grid() if grid else [])]

    def corners(self) -> list[tuple[str, np.ndarray]]:
        """The merge's corners with every layer and expert kept; every gene at 1 but every
        other layer dropped (a recipe of slices); every gene at 1 but the fewest experts kept."""
        out = [(what, self._with_keep(x)) for what, x in super().corners()]
        ones = np.ones(self.dim)
        if self.prune_layers:
            alternate = ones.copy()
            alternate[self.merge_dim : self.merge_dim + self.keep_dim] = (
                np.arange(self.num_layers) % 2 == 0
            )
            out.append(("every gene at 1, every other layer", alternate))
        if self.moe:
            fewest = ones.copy()
            fewest[self.merge_dim + self.keep_dim] = 0.0
            out.append(("every gene at 1, the fewest experts", fewest))
        return out

    def keep_all(self, x: np.ndarray) -> np.ndarray:
        """``x`` with every layer and expert kept (the full model's merge)."""
        return self._with_keep(np.asarray(x, dtype=float), ranks=self._ranks(x))

    def _with_keep(self, x: np.ndarray, ranks: np.ndarray | None = None) -> np.ndarray:
        tail = [np.full(self.keep_dim, KEEP)]
        if self.moe:
            rest = self.moe.dim - 1
            tail += [np.full(1, KEEP), np.full(rest, 0.5) if ranks is None else ranks]
        return np.concatenate([x[: self.merge_dim], *tail])

    def _ranks(self, x: np.ndarray) -> np.ndarray | None:
        if not self.moe or len(x) != self.dim:
            return None
        return np.asarray(x, dtype=float)[self.merge_dim + self.keep_dim + 1 :]

    # ---- decoding -----------------------------------------------------------------------------
    def kept_layers(self, x: np.ndarray) -> list[int]:
        """The layers genes ``x`` keep, in order (``SpliceError`` when none)."""
        self.values(x)  # shape and finiteness
        if not self.prune_layers:
            return list(range(self.num_layers))
        keep = np.asarray(x, dtype=float)[self.merge_dim : self.merge_dim + self.keep_dim]
        kept = [i for i, g in enumerate(keep) if g > 0.5]
        if not kept:
            raise SpliceError("genome: the keep genes drop every layer (keep at least one)")
        return kept

    def expert_count(self, x: np.ndarray) -> int | None:
        """The experts every MoE layer keeps: all of them when the count gene is over 0.5,
        else one of the fewer counts, spread evenly over [0, 0.5] (None: no expert genes)."""
        if not self.moe:
            return None
        self.values(x)
        g = float(np.clip(x[self.merge_dim + self.keep_dim], 0, 1))
        counts = self.moe.counts
        if g > 0.5 or not counts:
            return self.moe.experts
        return counts[min(int(g / 0.5 * len(counts)), len(counts) - 1)]

    def kept_experts(self, x: np.ndarray) -> dict[int, tuple[int, ...]] | None:
        """Per MoE layer (source index), the experts kept: the count's highest rank genes (ties:
        the lower index), in index order; None when every expert is kept."""
        k = self.expert_count(x)
        if self.moe is None or k is None or k == self.moe.experts:
            return None
        ranks = np.clip(self._ranks(x), 0, 1).reshape(len(self.moe.layers), self.moe.experts)  # type: ignore[arg-type]
        out = {}
        for layer, r in zip(self.moe.layers, ranks, strict=True):
            best = np.argsort(-r, kind="stable")[:k]
            out[layer] = tuple(sorted(int(e) for e in best))
        return out

    def size(self, x: np.ndarray) -> float:
        """The candidate's parameters over the full model's."""
        return self.params(x) / (self.other_params + sum(self.layer_params))

    def params(self, x: np.ndarray) -> int:
        """The candidate's parameter count (embeddings, norms and head included)."""
        kept = self.kept_layers(x)
        total = self.other_params + sum(self.layer_params[i] for i in kept)
        k = self.expert_count(x)
        if self.moe is not None and k is not None:
            dropped = sum(self.moe.params[i] for i in kept) * (self.moe.experts - k)
            total -= dropped // self.moe.experts
        return total

    def recipe(self, x: np.ndarray) -> dict[str, Any]:
        """The plain recipe when every layer and expert is kept; else its slices over the kept
        runs of layers, and ``keep_experts`` (one entry per written layer)."""
        plain = super().recipe(x)
        kept = self.kept_layers(x)
        out: dict[str, Any] = plain
        if len(kept) != self.num_layers:
            slices = self._pruned_slices(self.values(x), kept)
            out = {}
            for key, value in plain.items():  # the plain recipe's order, slices for models
                if key in ("models", "slices"):
                    out["slices"] = slices
                else:
                    out[key] = value
        experts = self.kept_experts(x)
        if experts is not None:
            out["keep_experts"] = [list(experts[i]) if i in experts else None for i in kept]
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


def expert_genes(ckpt: Checkpoint, ref: str) -> ExpertGenes:
    """The expert genes' layout over model ``ckpt`` (named ``ref`` in errors): its MoE layers,
    expert count, the counts a candidate may keep and what each layer's experts weigh."""
    from splice.expert_subset import moe_layers_of, per_expert

    spec = ckpt.arch
    experts = spec.num_experts(ckpt.config)
    if spec.experts is None or not experts:
        raise SpliceError(f"genome: prune experts: {ref} has no routed experts")
    routed = per_expert(spec)
    if not routed:
        raise SpliceError(
            f"genome: prune experts: {spec.model_type}'s router is not described per expert yet"
        )
    top_k = spec.experts_per_token(ckpt.config) or 1
    counts = tuple(range(max(top_k, 1), experts))
    if not counts:
        raise SpliceError(
            f"genome: prune experts: {ref} routes every token to all its {experts} experts; "
            "none can go"
        )
    index = ckpt.layer_index
    params = [
        sum(ckpt.tensors[n].numel for n in index[i]
            if (p := spec.parse(n)).group == "experts" or p.kind in routed)
        for i in range(len(index))
    ]  # fmt: skip
    layers = tuple(moe_layers_of(ckpt.tensors, spec))
    return ExpertGenes(layers, experts, counts, tuple(params))


def pruned_genome(
    spec: GenomeSpec, models: Mapping[str, Checkpoint], num_layers: int, dtype: str, seed: int
) -> PrunedParameterGenome:
    """The ``prune: layers | experts | layers+experts`` genome of ``spec`` over ``models``
    (headers only)."""
    donor = spec.base_model or spec.models[0]
    layers, other = param_counts(models[donor])
    if len(layers) != num_layers:
        raise SpliceError(
            f"genome: {donor} has {len(layers)} layers, the genome's models {num_layers}"
        )
    what = (spec.prune or "").split("+")
    moe = expert_genes(models[donor], donor) if "experts" in what else None
    genome = PrunedParameterGenome(
        spec, num_layers, dtype, seed, layers, other, donor, "layers" in what, moe
    )
    parts = ["the merge's genes"]
    if "layers" in what:
        parts.append("one keep gene per layer")
    if moe:
        parts.append("one rank gene per expert of each MoE layer")
    _check_size(genome.dim, ", ".join(parts))
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


#: module attributes transformers' MoE modules keep the expert count in
COUNT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")
#: module attributes of DeepSeek-style expert groups -> their config key
GROUP_ATTRS = {"n_group": "n_group", "num_group": "n_group", "topk_group": "topk_group"}


@dataclass
class _AllExperts:
    """What :func:`show_experts` changes in a module, as it was with every expert."""

    tensors: dict[tuple[int, str], tuple[Any, str, Any]]  # (owner, attr, its full tensor)
    attrs: list[tuple[Any, str, Any]]  # (module, attribute, value with every expert)
    config: dict[str, Any]


_ALL: weakref.WeakKeyDictionary[Any, _AllExperts] = weakref.WeakKeyDictionary()


def _tensor(owner: Any, attr: str) -> Any:
    return owner._parameters[attr].data if attr in owner._parameters else owner._buffers[attr]


def _set_tensor(owner: Any, attr: str, tensor: Any) -> None:
    if attr in owner._parameters:
        owner._parameters[attr].data = tensor
    else:
        owner._buffers[attr] = tensor


def show_experts(module: torch.nn.Module, plan: Any) -> torch.nn.Module:
    """Point ``module`` (built with every expert) at the experts ``plan`` (a
    :class:`~splice.merge.planner.MergePlan`, after :func:`show_layers` for its layers) keeps,
    as the model ``splice merge`` writes from its recipe would be: each per-expert tensor
    (packed experts ``[E, ...]``, the router's rows and selection biases) viewed at its first
    ``K`` entries (the plan writes the kept experts there), the modules' expert counts and
    expert groups and the config's as the written config's. No weight is copied; a plan that
    keeps every expert restores the module as it was built. Returns ``module``."""
    from splice.arch import ArchSpec
    from splice.execute import target_names
    from splice.expert_subset import GROUP_KEYS, per_expert
    from splice.stored import pack_tasks

    full = _ALL.get(module)
    if full is None:
        full = _ALL[module] = _AllExperts({}, [], {})
    for owner, attr, tensor in full.tensors.values():  # back to every expert first
        _set_tensor(owner, attr, tensor)
    for owner, name, value in reversed(full.attrs):
        setattr(owner, name, value)
    full.attrs.clear()
    cfg = module.config
    for key, value in full.config.items():
        setattr(cfg, key, value)
    full.config.clear()
    if plan.recipe.keep_experts is None:
        return module
    spec = ArchSpec.load(plan.config["model_type"])
    assert spec.experts is not None
    tasks = pack_tasks(plan.tasks, spec, plan.models) if spec.experts.stored else plan.tasks
    axes = per_expert(spec)
    count_key = spec.config_key("num_experts", plan.config)
    experts, k = int(getattr(cfg, count_key)), int(plan.config[count_key])
    where = target_names(tasks, module.state_dict(keep_vars=True), spec, module)
    owners: dict[int, Any] = {}
    for t in tasks:
        parsed = spec.parse(t.name)
        if parsed.group == "experts":
            axis = 0
        elif parsed.kind in axes:
            axis = axes[parsed.kind] % len(t.shape)
        else:
            continue
        name = where[t.name][0] if t.name in where else ""
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if name else None
        key = (id(owner), attr)
        if owner is not None and key not in full.tensors:
            full.tensors[key] = (owner, attr, _tensor(owner, attr))
        tensor = full.tensors[key][2] if owner is not None else None
        if tensor is None or tensor.shape[axis] != experts:
            raise SpliceError(
                f"evolve: prune experts needs the model's experts in one tensor per layer "
                f"(transformers >= 5); {t.name} is not"
            )
        _set_tensor(owner, attr, tensor.narrow(axis, 0, k))
        owners[id(owner)] = owner
        parent = module.get_submodule(owner_name.rpartition(".")[0])
        owners[id(parent)] = parent
    groups = {  # the expert groups the written config has, where they differ
        key: plan.config[key]
        for key in GROUP_KEYS
        if plan.config.get(key) is not None and plan.config[key] != getattr(cfg, key, None)
    }
    for m in [module, *owners.values()]:
        changes = {a: k for a in COUNT_ATTRS if getattr(m, a, None) == experts}
        changes |= {a: groups[c] for a, c in GROUP_ATTRS.items() if hasattr(m, a) and c in groups}
        for attr, value in changes.items():
            if getattr(m, attr) != value:
                full.attrs.append((m, attr, getattr(m, attr)))
                setattr(m, attr, value)
    for key in [count_key, *(g for g in GROUP_KEYS if hasattr(cfg, g))]:
        want = plan.config.get(key)
        if want is not None and getattr(cfg, key, None) != want:
            full.config[key] = getattr(cfg, key, None)
            setattr(cfg, key, want)
    return module
