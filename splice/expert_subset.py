"""Keeping some of an MoE model's experts: a plan's tasks and config for an expert subset.

A subset names, for each output layer that holds routed experts, the source experts it keeps,
in the order they are written: output expert ``j`` of layer ``i`` is source expert
``keep[i][j]``. Every MoE layer keeps the same number ``K`` (transformers' config has one expert
count). The written layer is the source layer with the dropped experts removed:

- each kept expert's tensors are renamed to its new index (a family that stores its experts
  packed gets them packed again, ``[K, ...]``, by :func:`splice.stored.pack_tasks`);
- the router tensors with one entry per expert (the spec's ``experts.per_expert``: the router's
  rows ``[E, H]``, a selection bias ``[E]``, gpt-oss's router bias, ERNIE's ``moe_statics``
  ``[1, E]`` along its last axis) keep the kept experts' entries, in the same order;
- the config's expert count is ``K``. Expert groups (DeepSeek-V3's ``n_group`` /
  ``topk_group``) stay where every layer's kept experts fill the groups equally, in group order,
  two or more each (the group score sums a group's two best); otherwise one group.

Softmax routers (Mixtral, Qwen, OLMoE, gpt-oss, ...) then route every token as the source
would with the dropped experts' logits at minus infinity: a pruned model, not an approximation
of one. Used by ``splice merge``'s ``keep_experts`` recipe key and by evolve's expert genes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from splice.arch import ArchSpec
from splice.errors import SpliceError
from splice.execute import TensorTask
from splice.text import plural

#: config keys of DeepSeek-style expert groups
GROUP_KEYS = ("n_group", "topk_group")


@dataclass(frozen=True)
class ExpertSubset:
    """The experts each MoE output layer keeps (``layers``: output layer -> source experts, in
    written order), out of ``experts`` per layer."""

    layers: Mapping[int, tuple[int, ...]]
    experts: int

    @property
    def count(self) -> int:
        """``K``, the experts every MoE layer keeps."""
        return len(next(iter(self.layers.values())))


def per_expert(spec: ArchSpec) -> dict[str, int]:
    """The family's router tensors with one entry per expert: layer-relative kind -> axis."""
    return dict(spec.experts.per_expert) if spec.experts else {}


def check_subset(
    keep: Sequence[Sequence[int] | None],
    spec: ArchSpec,
    config: Mapping[str, Any],
    moe_layers: Sequence[int],
    num_layers: int,
) -> ExpertSubset:
    """``keep`` (one entry per output layer: the kept experts, or null for a layer without
    routed experts) as an :class:`ExpertSubset`; ``SpliceError`` with every problem found."""
    experts = spec.num_experts(dict(config))
    if spec.experts is None or experts is None:
        raise SpliceError(f"keep_experts: {spec.model_type} has no routed experts")
    if not spec.experts.per_expert:
        raise SpliceError(
            f"keep_experts: {spec.model_type}'s router tensors are not described per expert yet"
        )
    if len(keep) != num_layers:
        raise SpliceError(
            f"keep_experts: {plural(len(keep), 'entry', 'entries')} for an output of "
            f"{plural(num_layers, 'layer')} "
            "(one per output layer, null where a layer has no routed experts)"
        )
    problems: list[str] = []
    layers: dict[int, tuple[int, ...]] = {}
    moe = set(moe_layers)
    for i, kept in enumerate(keep):
        if kept is None:
            if i in moe:
                problems.append(f"keep_experts[{i}]: layer {i} has routed experts; list those kept")
            continue
        if i not in moe:
            problems.append(f"keep_experts[{i}]: layer {i} has no routed experts; give null")
            continue
        bad = [e for e in kept if isinstance(e, bool) or not isinstance(e, int)]
        bad += [e for e in kept if isinstance(e, int) and not 0 <= e < experts]
        if bad:
            problems.append(f"keep_experts[{i}]: {bad[0]!r} is not an expert (0 to {experts - 1})")
        elif len(set(kept)) != len(kept):
            problems.append(f"keep_experts[{i}]: an expert is listed twice")
        elif not kept:
            problems.append(f"keep_experts[{i}]: keeps no expert")
        else:
            layers[i] = tuple(kept)
    counts = sorted({len(v) for v in layers.values()})
    if len(counts) > 1:
        problems.append(
            f"keep_experts: every MoE layer must keep the same number of experts (the config "
            f"has one count), got {', '.join(map(str, counts))}"
        )
    top_k = spec.experts_per_token(dict(config))
    if counts and top_k is not None and counts[0] < top_k:
        problems.append(
            f"keep_experts: {plural(counts[0], 'expert')} per layer, fewer than the {top_k} "
            "each token is routed to"
        )
    if problems:
        raise SpliceError("\n".join(problems))
    if not layers:
        raise SpliceError("keep_experts: the output has no layer with routed experts")
    return ExpertSubset(layers, experts)


def subset_config(
    config: Mapping[str, Any], spec: ArchSpec, subset: ExpertSubset
) -> tuple[dict[str, Any], str | None]:
    """The output config with ``K`` experts (every spelling of the count the config has) and
    its expert groups (the module docstring); returns it and a note when the groups went."""
    out = dict(config)
    keys = spec.config_keys.get("num_experts") or ["num_experts"]
    keys = [keys] if isinstance(keys, str) else list(keys)
    present = [k for k in keys if out.get(k) is not None] or keys[:1]
    for key in present:
        out[key] = subset.count
    return out, _groups(out, spec, subset)


def groups_kept(config: Mapping[str, Any], spec: ArchSpec, subset: ExpertSubset) -> bool:
    """Whether the config's expert groups still describe ``subset`` (module docstring)."""
    n_group = int(config.get("n_group") or 1)
    if n_group <= 1:
        return True
    size, k = subset.experts // n_group, subset.count
    per = k // n_group
    top_k = spec.experts_per_token(dict(config)) or 1
    if k % n_group or per < 2 or top_k > int(config.get("topk_group") or 1) * per:
        return False
    for kept in subset.layers.values():
        of = [e // size for e in kept]
        if of != sorted(of) or any(of.count(g) != per for g in range(n_group)):
            return False
    return True


def _groups(config: dict[str, Any], spec: ArchSpec, subset: ExpertSubset) -> str | None:
    if groups_kept(config, spec, subset):
        return None
    note = (
        f"expert groups dropped (n_group {config['n_group']} -> 1, topk_group "
        f"{config.get('topk_group')} -> 1): the kept experts do not fill every group equally, "
        "in group order, with 2 or more each"
    )
    config.update({k: 1 for k in GROUP_KEYS})
    return note


@dataclass(frozen=True)
class _Select:
    """compute: ``entries`` of the (computed) tensor along ``axis``."""

    inner: Any
    entries: tuple[int, ...]
    axis: int

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        full = self.inner(tensors) if self.inner is not None else tensors[0]
        index = torch.tensor(self.entries, device=full.device)
        return full.index_select(self.axis, index)


def subset_tasks(
    tasks: Sequence[TensorTask], spec: ArchSpec, subset: ExpertSubset
) -> tuple[list[TensorTask], dict[str, dict[str, str]]]:
    """``tasks`` (one per output tensor, per-expert names) for the kept experts only: each kept
    expert's tasks renamed to its new index, the dropped ones' left out, the per-expert router
    tensors reduced to the kept entries. Also returns what the dropped tasks read (model ->
    {name: why}: :attr:`splice.output.ModelPlan.removed`)."""
    axes = per_expert(spec)
    out = []
    removed: dict[str, dict[str, str]] = {}
    for task in tasks:
        p = spec.parse(task.name)
        kept = subset.layers.get(p.layer) if p.layer is not None else None
        if kept is None:
            out.append(task)
        elif p.group == "experts":
            if p.expert is None:
                raise SpliceError(f"keep_experts: {task.name} holds every expert in one tensor")
            if p.expert in kept:
                new = spec.rename(task.name, expert=kept.index(p.expert))
                out.append(replace(task, name=new))
                continue
            why = f"expert {p.expert} of output layer {p.layer} not kept (keep_experts)"
            for src in task.sources:
                removed.setdefault(src.model, {})[src.name] = why
        elif p.kind in axes:
            if task.extra:
                raise SpliceError(f"keep_experts: {task.name} is written with its scales")
            axis = axes[p.kind] % len(task.shape)
            shape = list(task.shape)
            shape[axis] = len(kept)
            out.append(
                replace(
                    task,
                    shape=tuple(shape),
                    compute=_Select(task.compute, kept, axis),
                    label=f"{task.label} (experts {', '.join(map(str, kept))})",
                )
            )
        else:
            out.append(task)
    return out, removed


def moe_layers_of(names: Iterable[str], spec: ArchSpec) -> list[int]:
    """The layers holding routed experts among tensors ``names`` (a checkpoint's, or the
    outputs of a plan's tasks), ascending."""
    return sorted({p.layer for n in names if (p := spec.parse(n)).group == "experts"})  # type: ignore[misc]
