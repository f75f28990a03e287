"""How each MoE family routes, for ``splice collapse``: the routing weights ``g_e(x)`` of every
expert on every calibration row, exactly as transformers' router of the family computes them,
and what a written router of fewer experts does.

A family's :class:`Family` entry names its router tensors (the router weight, a selection bias,
shared experts and Qwen's sigmoid shared-expert gate) and how it routes:

- ``score``: ``softmax`` of the router logits (Mixtral, Qwen, OLMoE, DeepSeek-V2, ERNIE) or
  ``sigmoid`` (DeepSeek-V3, GLM-4-MoE, dots1);
- the top-k choice: on the scores, or on ``scores + bias`` (``e_score_correction_bias`` of
  DeepSeek-V3 / GLM-4-MoE / dots1, ERNIE's ``moe_statics``), among the ``topk_group`` best of
  ``n_group`` expert groups (DeepSeek-V2's ``group_limited_greedy``: a group's best score;
  DeepSeek-V3: the sum of its two best);
- the weights: the chosen scores (never the bias), renormalised to sum to 1 (always for Mixtral;
  ``norm_topk_prob`` for Qwen, OLMoE and the DeepSeek-V3 kind; ERNIE divides by the sum clamped
  at ``moe_norm_min``; DeepSeek-V2 never), times ``routed_scaling_factor`` (DeepSeek, GLM,
  dots1).

So the routed mass ``Σ_e g_e(x)`` of a token is 1 for Mixtral, ``routed_scaling_factor`` where the
weights are renormalised, and a token-dependent number below 1 otherwise (Qwen/OLMoE with
``norm_topk_prob: false``, DeepSeek-V2 unless every expert is chosen): :meth:`Routing.constant_mass`.

gpt-oss adds a bias to its router's logits (``router_bias``: it moves both the choice and the
weights) and softmaxes the top-k logits, which is the renormalised top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch

    from splice.checkpoint import Checkpoint


@dataclass(frozen=True)
class Family:
    """One family's router: tensors (layer-relative kinds) and rules (see the module docstring).

    ``norm``: ``always`` | ``config`` (``norm_topk_prob``) | ``never`` | ``clamp`` (ERNIE);
    ``groups``: None, ``max`` (DeepSeek-V2, only with ``topk_method: group_limited_greedy``) or
    ``top2`` (a group scores by its two best: every group needs 2 experts or more);
    ``width_key``: the config key of an expert's width; ``shared_count_key``: where the shared
    experts' width is that width times a count (DeepSeek's ``n_shared_experts``, ERNIE's
    ``moe_num_shared_experts``), the count's key."""

    router: str
    score: str = "softmax"
    norm: str = "config"
    scale_key: str | None = None
    groups: str | None = None
    bias: str | None = None
    shared: str | None = None
    shared_gate: str | None = None
    width_key: str = "moe_intermediate_size"
    shared_count_key: str | None = None
    router_bias: str | None = None  # added to the router's logits (gpt-oss)

    @property
    def min_per_group(self) -> int:
        """Experts each group must hold for the family's router to run."""
        return 2 if self.groups == "top2" else 1


_DEEPSEEK3 = dict(
    router="mlp.gate.weight",
    score="sigmoid",
    scale_key="routed_scaling_factor",
    groups="top2",
    bias="mlp.gate.e_score_correction_bias",
    shared="mlp.shared_experts.",
    shared_count_key="n_shared_experts",
)
_QWEN_SHARED = dict(
    router="mlp.gate.weight",
    shared="mlp.shared_expert.",
    shared_gate="mlp.shared_expert_gate.weight",
)

#: model_type -> its router
FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        router="block_sparse_moe.gate.weight", norm="always", width_key="intermediate_size"
    ),
    "qwen2_moe": Family(**_QWEN_SHARED),  # type: ignore[arg-type]
    "qwen3_next": Family(**_QWEN_SHARED),  # type: ignore[arg-type]
    "qwen3_moe": Family(router="mlp.gate.weight"),
    "olmoe": Family(router="mlp.gate.weight", width_key="intermediate_size"),
    "deepseek_v2": Family(
        router="mlp.gate.weight",
        norm="never",
        scale_key="routed_scaling_factor",
        groups="max",
        shared="mlp.shared_experts.",
        shared_count_key="n_shared_experts",
    ),
    "deepseek_v3": Family(**_DEEPSEEK3),  # type: ignore[arg-type]
    "glm4_moe": Family(**_DEEPSEEK3),  # type: ignore[arg-type]
    "dots1": Family(**_DEEPSEEK3),  # type: ignore[arg-type]
    "ernie4_5_moe": Family(
        router="mlp.gate.weight",
        norm="clamp",
        bias="mlp.moe_statics.e_score_correction_bias",
        shared="mlp.shared_experts.",
        shared_count_key="moe_num_shared_experts",
    ),
    # experts stored packed on disk (splice.stored), read and written per expert
    "granitemoe": Family(
        router="block_sparse_moe.router.layer.weight", norm="always", width_key="intermediate_size"
    ),
    "gpt_oss": Family(
        router="mlp.router.weight",
        norm="always",  # the softmax of the top-k logits: the renormalised top-k
        width_key="intermediate_size",
        router_bias="mlp.router.bias",
    ),
}


def full_config(ckpt: Checkpoint) -> Any:
    """transformers' config object of ``ckpt`` (every default filled in: ``config.json`` written
    by transformers 5 holds only the fields that differ from the class's defaults)."""
    from transformers import AutoConfig

    data = dict(ckpt.config)
    return AutoConfig.for_model(data.pop("model_type"), **data)


@dataclass(frozen=True)
class Routing:
    """The routing rule of one model (every MoE layer alike): ``route`` of router logits
    ``[n, E]`` and the per-expert selection ``bias`` ``[E]`` gives the weights ``[n, E]``
    (zero where an expert is not chosen). ``experts`` is ``E``."""

    experts: int
    top_k: int
    score: str = "softmax"
    normalize: str = "sum"  # sum | clamp | none
    norm_min: float = 0.0
    scale: float = 1.0
    groups: str | None = None
    n_group: int = 1
    topk_group: int = 1

    @classmethod
    def of(cls, ckpt: Checkpoint, family: Family, cfg: Any | None = None) -> Routing:
        """The routing of ``ckpt`` (``cfg``: its :func:`full_config`)."""
        cfg = cfg if cfg is not None else full_config(ckpt)
        experts = ckpt.arch.num_experts(ckpt.config) or 0
        if not experts and ckpt.arch.config_key("num_experts", ckpt.config):
            experts = int(getattr(cfg, ckpt.arch.config_key("num_experts", ckpt.config), 0) or 0)
        key = ckpt.arch.config_key("experts_per_token", ckpt.config) or "num_experts_per_tok"
        top_k = int(ckpt.config.get(key) or getattr(cfg, key))
        if family.norm == "always":
            normalize = "sum"
        elif family.norm == "clamp":
            normalize = "clamp"
        elif family.norm == "config":
            normalize = "sum" if getattr(cfg, "norm_topk_prob", False) else "none"
        else:
            normalize = "none"
        groups = family.groups
        if groups == "max" and getattr(cfg, "topk_method", "greedy") != "group_limited_greedy":
            groups = None
        n_group = int(getattr(cfg, "n_group", None) or 1) if groups else 1
        topk_group = int(getattr(cfg, "topk_group", None) or 1) if groups else 1
        scale = float(getattr(cfg, family.scale_key, 1.0) or 1.0) if family.scale_key else 1.0
        return cls(
            experts=experts,
            top_k=top_k,
            score=family.score,
            normalize=normalize,
            norm_min=float(getattr(cfg, "moe_norm_min", 0.0) or 0.0),
            scale=scale,
            groups=groups,
            n_group=n_group,
            topk_group=topk_group,
        )

    # ---- the weights -------------------------------------------------------------------------
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n, E]``: softmax or sigmoid of the router logits (what ``frequency`` weights by)."""
        import torch

        return torch.softmax(logits, -1) if self.score == "softmax" else torch.sigmoid(logits)

    def route(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, E]``: each token's routing weight of each expert (see the module docstring)."""
        import torch

        scores = self.scores(logits)
        n, count = scores.shape
        choice = scores if bias is None else scores + bias.reshape(1, -1).to(scores.dtype)
        if self.groups and self.n_group > 1:
            size = count // self.n_group
            grouped = choice.reshape(n, self.n_group, size)
            if self.groups == "max":
                group_scores = grouped.max(-1).values
            else:
                group_scores = grouped.topk(min(2, size), dim=-1).values.sum(-1)
            best = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)
            keep = keep.repeat_interleave(size, dim=1)
            if self.groups == "max":  # DeepSeek-V2 zeroes the scores outside the groups
                scores = scores.masked_fill(~keep, 0.0)
                choice = scores
            else:
                choice = choice.masked_fill(~keep, -math.inf)
        top = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, top)
        if self.normalize == "sum":
            w = w / w.sum(-1, keepdim=True).clamp(min=1e-300)
        elif self.normalize == "clamp":
            w = w / w.sum(-1, keepdim=True).clamp(min=max(self.norm_min, 1e-300))
        return torch.zeros_like(scores).scatter(1, top, w * self.scale)

    def constant_mass(self) -> float | None:
        """``Σ_e g_e(x)`` when it is the same for every token (renormalised weights, or every
        expert chosen by a softmax), else None: then only calibration can measure it."""
        if self.normalize in ("sum", "clamp"):
            return self.scale
        chosen_all = self.top_k == self.experts and (not self.groups or self.n_group == 1)
        if self.score == "softmax" and chosen_all:
            return self.scale
        return None

    def mass_rule(self) -> str:
        """Why the mass is not constant, in words (for refusals and the report)."""
        if self.constant_mass() is not None:
            return f"the top-{self.top_k} weights sum to {self.scale:g}"
        if self.score == "sigmoid":
            return f"top-{self.top_k} sigmoid scores are not renormalised (norm_topk_prob false)"
        return (
            f"the top-{self.top_k} of {self.experts} softmax probabilities are not renormalised "
            "(norm_topk_prob false)"
        )

    # ---- a router of other experts -----------------------------------------------------------
    def for_experts(
        self, groups: list[list[int]], top_k: int, family: Family
    ) -> tuple[Routing, str | None]:
        """The routing of ``len(groups)`` output experts, output expert ``j`` made of source
        experts ``groups[j]`` (a kept expert: one member): the expert groups stay where every
        output expert's members lie in one source group, the groups stay in order and equally
        filled and the family's router still runs; else one group (``n_group`` /
        ``topk_group`` 1). Returns the routing and a note when the groups changed."""
        k = len(groups)
        out = replace(self, experts=k, top_k=top_k)
        if k < family.min_per_group:
            raise SpliceError(
                f"--keep-experts {k}: the router sums the best {family.min_per_group} scores of "
                f"each expert group, so it needs at least {family.min_per_group} experts"
            )
        if not self.groups or self.n_group == 1:
            return replace(out, n_group=1, topk_group=1) if self.groups else out, None
        size = self.experts // self.n_group
        of = []
        for members in groups:
            gs = {e // size for e in members}
            of.append(gs.pop() if len(gs) == 1 else None)
        per = k // self.n_group
        kept = (
            None not in of
            and k % self.n_group == 0
            and of == sorted(of)  # type: ignore[type-var]
            and all(of.count(g) == per for g in range(self.n_group))
            and per >= family.min_per_group
            and top_k <= self.topk_group * per
        )
        if kept:
            return out, None
        note = (
            f"expert groups dropped (n_group {self.n_group} -> 1, topk_group "
            f"{self.topk_group} -> 1): the {k} output experts do not fill the {self.n_group} "
            f"groups equally with {family.min_per_group} or more each"
        )
        return replace(out, n_group=1, topk_group=1), note

    def always_on(self, count: int) -> Routing:
        """The routing of ``count`` experts every token chooses (a zero router and bias)."""
        return replace(self, experts=count, top_k=count, n_group=1, topk_group=1)

    def weight_always_on(self, count: int) -> float:
        """The weight each of ``count`` always-chosen experts gets from a zero router: ``1/count``
        of the softmax (``0.5`` of a sigmoid unless renormalised), times the scale."""
        import torch

        routing = self.always_on(count)
        zeros = torch.zeros((1, count), dtype=torch.float64)
        return float(routing.route(zeros, torch.zeros(count, dtype=torch.float64))[0, 0])

    def config_fields(self) -> dict[str, Any]:
        """The group fields to write (only for a family with groups)."""
        return {"n_group": self.n_group, "topk_group": self.topk_group} if self.groups else {}


# ---- the parts of an MoE block beside its routed experts ----------------------------------------
@dataclass
class Shared:
    """A layer's shared experts (one MLP, float64, optional biases) and Qwen's sigmoid gate
    ``[1, H]``: :meth:`output` is what they add to the block's output."""

    gate: torch.Tensor  # [S, H]
    up: torch.Tensor
    down: torch.Tensor  # [H, S]
    biases: dict[str, torch.Tensor]
    sigmoid_gate: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.gate.shape[0])

    def ungated(self, x: torch.Tensor, act: Any) -> torch.Tensor:
        b = self.biases
        g = x @ self.gate.T + b.get("gate", 0)
        u = x @ self.up.T + b.get("up", 0)
        return act(g, u) @ self.down.T + b.get("down", 0)

    def gate_values(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[n, 1]``: the sigmoid gate on each row (None without one)."""
        import torch

        return None if self.sigmoid_gate is None else torch.sigmoid(x @ self.sigmoid_gate.T)

    def output(self, x: torch.Tensor, act: Any) -> torch.Tensor:
        out = self.ungated(x, act)
        g = self.gate_values(x)
        return out if g is None else out * g


def shared_kinds(ckpt: Checkpoint, family: Family, layer: int) -> dict[str, str]:
    """``{"gate"|"up"|"down" [+ "_bias"]: layer-relative kind}`` of the shared experts stored
    in ``layer`` (empty: none)."""
    spec = ckpt.arch
    prefix = spec.experts.shared[0] if spec.experts and spec.experts.shared else family.shared
    if prefix is None:
        return {}
    out = {}
    for part in ("gate", "up", "down"):
        for suffix, key in (("weight", part), ("bias", f"{part}_bias")):
            kind = f"{prefix}{part}_proj.{suffix}"
            if ckpt.arch.layer_name(layer, kind) in ckpt.tensors:
                out[key] = kind
    return out if {"gate", "up", "down"} <= set(out) else {}


def load_shared(ckpt: Checkpoint, family: Family, layer: int) -> Shared | None:
    """The shared experts of ``layer`` (None: it has none)."""
    kinds = shared_kinds(ckpt, family, layer)
    if not kinds:
        return None

    def load(kind: str) -> torch.Tensor:
        return ckpt.load(ckpt.arch.layer_name(layer, kind), dtype="float64")

    gate = None
    if family.shared_gate and ckpt.arch.layer_name(layer, family.shared_gate) in ckpt.tensors:
        gate = load(family.shared_gate)
    return Shared(
        load(kinds["gate"]),
        load(kinds["up"]),
        load(kinds["down"]),
        {p: load(kinds[f"{p}_bias"]) for p in ("gate", "up", "down") if f"{p}_bias" in kinds},
        gate,
    )
