"""The output layouts of ``merge_method: moe`` and mergekit-moe's choice among them.

mergekit-moe 0.1.5 writes four layouts, tried in this order (its ``ALL_OUTPUT_ARCHITECTURES``):

========== ============== ===================== ================================================
name       model_type     dense inputs          shared experts
========== ============== ===================== ================================================
Mixtral    ``mixtral``    llama, mistral        none
DeepSeek   ``deepseek``   llama, mistral        at most one, without prompts (always on)
Qwen MoE   ``qwen2_moe``  llama, mistral, qwen2 exactly one, gated by ``shared_expert_gate``,
                                                whose row comes from its prompts (``random``: drawn)
Qwen3 MoE  ``qwen3_moe``  qwen3                 none
========== ============== ===================== ================================================

A recipe's ``architecture`` keeps the layouts whose name starts with it, case-insensitively, as
mergekit does (``qwen`` keeps Qwen MoE and Qwen3 MoE; ``deepseek``, ``mixtral``); splice also
takes the output's ``model_type`` (``qwen2_moe``, ``qwen3_moe``). Of those left, the first that
takes the base model's type and the shared experts is written (mergekit prefers Mixtral, which
is first anyway): a llama base without shared experts gives Mixtral, with one unprompted
shared expert DeepSeek, with a prompted one Qwen2-MoE; a qwen2 base needs one shared expert;
a qwen3 base gives Qwen3-MoE. splice goes beyond mergekit only where mergekit refuses: the
experts may be of another dense type than the base (mergekit wants one type for all; splice
wants the same sizes and a gate / up / down MLP), and ``uniform_random`` draws a Qwen2-MoE
shared gate as ``random`` does (mergekit wants prompts for it).

DeepSeek is DeepSeek-MoE (``deepseek-ai/deepseek-moe-16b-base``): Llama attention, softmax
top-k routing over ``mlp.experts.{e}``, ungated ``mlp.shared_experts``. transformers has no model
class for it (its ``deepseek_v2`` / ``v3`` have multi-head latent attention, which cannot hold
Llama's), so the config names DeepSeek's own code (``auto_map``) as mergekit's does, and splice
writes it only with ``--no-verify``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: the dense MLP every expert is made of (layer-relative kinds of llama, mistral, qwen2, qwen3)
DENSE_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
DOWN = "mlp.down_proj.weight"  # the residual writer ``residual_scale`` multiplies
RANDOM_GATES = ("random", "uniform_random")

DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base"


@dataclass(frozen=True)
class Layout:
    """One output layout: its names (layer-relative, after ``model.layers.{i}.``) and the
    dense types and shared experts it takes."""

    name: str  #: mergekit-moe's name, which a recipe's ``architecture`` prefixes
    model_type: str
    architecture: str
    inputs: tuple[str, ...]  #: dense model types (mergekit's list)
    router: str
    expert: str  #: prefix of expert ``{e}``
    parts: dict[str, str] = field(default_factory=dict)  #: dense MLP kind -> expert tensor
    max_shared: int = 0
    min_shared: int = 0
    shared: str | None = None  #: prefix of the shared expert
    shared_gate: str | None = None  #: its gate's weight, ``[1, hidden]``
    shared_prompts: str = "no"  #: "no" (refused) | "needed" (unless random) | "either"

    def expert_name(self, layer: int, e: int, dense_kind: str) -> str:
        return f"model.layers.{layer}.{self.expert.format(e=e)}{self.parts[dense_kind]}"

    def shared_name(self, layer: int, dense_kind: str) -> str:
        assert self.shared is not None
        return f"model.layers.{layer}.{self.shared}{self.parts[dense_kind]}"


_SAME = {k: k.removeprefix("mlp.") for k in DENSE_MLP}

MIXTRAL = Layout(
    "Mixtral",
    "mixtral",
    "MixtralForCausalLM",
    ("llama", "mistral"),
    router="block_sparse_moe.gate.weight",
    expert="block_sparse_moe.experts.{e}.",
    parts={
        "mlp.gate_proj.weight": "w1.weight",
        "mlp.up_proj.weight": "w3.weight",
        "mlp.down_proj.weight": "w2.weight",
    },
)
DEEPSEEK = Layout(
    "DeepSeek MoE",
    "deepseek",
    "DeepseekForCausalLM",
    ("llama", "mistral"),
    router="mlp.gate.weight",
    expert="mlp.experts.{e}.",
    parts=_SAME,
    max_shared=1,
    shared="mlp.shared_experts.",
)
QWEN2 = Layout(
    "Qwen MoE",
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    ("llama", "mistral", "qwen2"),
    router="mlp.gate.weight",
    expert="mlp.experts.{e}.",
    parts=_SAME,
    max_shared=1,
    min_shared=1,
    shared="mlp.shared_expert.",
    shared_gate="mlp.shared_expert_gate.weight",
    shared_prompts="needed",
)
QWEN3 = Layout(
    "Qwen3 MoE",
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    ("qwen3",),
    router="mlp.gate.weight",
    expert="mlp.experts.{e}.",
    parts=_SAME,
)
#: mergekit-moe's order, which decides between layouts that all fit
LAYOUTS = (MIXTRAL, DEEPSEEK, QWEN2, QWEN3)


def _refusal(layout: Layout, base_type: str, shared: Sequence[Any], gate_mode: str) -> str | None:
    """Why ``layout`` does not take this recipe (mergekit's ``supports_config``), or None."""
    if base_type not in layout.inputs:
        return f"takes {' / '.join(layout.inputs)} models, not {base_type}"
    n = len(shared)
    if not layout.min_shared <= n <= layout.max_shared:
        if layout.max_shared == 0:
            return "has no shared experts"
        if layout.min_shared == layout.max_shared:
            return f"needs exactly {layout.max_shared} shared expert"
        return f"takes at most {layout.max_shared} shared expert"
    prompted = any(e.positive_prompts or e.negative_prompts for e in shared)
    if layout.shared_prompts == "no" and prompted:
        return "cannot gate a shared expert (it has prompts)"
    if (
        layout.shared_prompts == "needed"
        and gate_mode not in RANDOM_GATES
        and not all(e.positive_prompts for e in shared)
    ):
        return "needs positive_prompts on the shared expert for its gate"
    return None


def choose(
    architecture: str | None, base_type: str, shared: Sequence[Any], gate_mode: str
) -> tuple[Layout | None, str | None]:
    """The layout mergekit-moe would write (see the module docstring), or ``(None, why)``."""
    wanted = (architecture or "").lower()
    candidates = [
        lay for lay in LAYOUTS if lay.name.lower().startswith(wanted) or lay.model_type == wanted
    ]
    if not candidates:
        names = ", ".join(f"{lay.name} ({lay.model_type})" for lay in LAYOUTS)
        return (
            None,
            f"moe: architecture {architecture!r} names no output layout; choose from {names}",
        )
    why = []
    for lay in candidates:
        refusal = _refusal(lay, base_type, shared, gate_mode)
        if refusal is None:
            return lay, None
        why.append(f"{lay.name} {refusal}")
    what = f"no {architecture!r} layout" if architecture else "no output layout"
    n = len(shared)
    return None, (
        f"moe: {what} fits a {base_type} base model with {n} shared expert{'s' * (n != 1)}: "
        + "; ".join(why)
    )


# ---- configs --------------------------------------------------------------------------------
_LLAMA_ONLY = ("mlp_bias", "attention_bias", "pretraining_tp")


def config_for(
    layout: Layout,
    base: Mapping[str, Any],
    *,
    num_experts: int,
    per_token: int,
    num_shared: int,
    num_layers: int,
) -> dict[str, Any]:
    """The output's ``config.json``: the base model's, with the layout's MoE fields (those
    mergekit-moe sets; each expert and shared expert is one whole dense MLP)."""
    cfg = dict(base, model_type=layout.model_type, architectures=[layout.architecture])
    inter = base["intermediate_size"]
    if layout is MIXTRAL:
        for key in _LLAMA_ONLY:
            cfg.pop(key, None)
        cfg.update(num_local_experts=num_experts, num_experts_per_tok=per_token)
    elif layout is QWEN2:
        for key in _LLAMA_ONLY:
            cfg.pop(key, None)
        cfg.update(
            num_experts=num_experts,
            num_experts_per_tok=per_token,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            moe_intermediate_size=inter,
            shared_expert_intermediate_size=inter,
            mlp_only_layers=[],
            qkv_bias=True,
        )
        if base.get("model_type") != "qwen2":  # Llama / Mistral attention in Qwen2-MoE's terms
            window = base.get("sliding_window")
            cfg["use_sliding_window"] = bool(window)
            if window:  # Mistral: every layer
                cfg["layer_types"] = ["sliding_attention"] * num_layers
                cfg["max_window_layers"] = num_layers
            else:
                cfg.pop("layer_types", None)
    elif layout is QWEN3:  # it slides the window over every layer or none (layout_problems)
        cfg.pop("layer_types", None)
        cfg["use_sliding_window"] = bool(_sliding_layers(base, num_layers))
        cfg.update(
            num_experts=num_experts,
            num_experts_per_tok=per_token,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            moe_intermediate_size=inter,
            mlp_only_layers=[],
        )
    elif layout is DEEPSEEK:
        cfg.update(
            n_routed_experts=num_experts,
            n_shared_experts=num_shared or None,
            num_experts_per_tok=per_token,
            first_k_dense_replace=0,
            moe_layer_freq=1,
            scoring_func="softmax",
            norm_topk_prob=True,
            moe_intermediate_size=inter,
            auto_map={
                "AutoConfig": f"{DEEPSEEK_CODE}--configuration_deepseek.DeepseekConfig",
                "AutoModel": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekModel",
                "AutoModelForCausalLM": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekForCausalLM",
            },
        )
        if "dtype" in cfg and "torch_dtype" not in cfg:  # the transformers 4 its code runs on
            cfg["torch_dtype"] = cfg["dtype"]
        rope = base.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rope:  # DeepSeek's code reads these
            cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {"type": rope["rope_type"], "factor": rope.get("factor")}
    return cfg


def layout_problems(
    layout: Layout, base: Mapping[str, Any], num_layers: int
) -> tuple[list[str], list[str]]:
    """``(problems, warnings)``: what of the base model's attention the layout cannot express
    (refused), and what it drops (a warning, where mergekit drops it too)."""
    out: list[str] = []
    warn: list[str] = []
    if layout is QWEN3:
        sliding = _sliding_layers(base, num_layers)
        if sliding and len(sliding) != num_layers:
            out.append(
                "moe: Qwen3-MoE slides its attention window over every layer or none; the base "
                f"model slides it over layers {', '.join(map(str, sliding))} of {num_layers}"
            )
    if layout is not DEEPSEEK:
        return out, warn
    heads, hidden = base.get("num_attention_heads"), base.get("hidden_size")
    head_dim = base.get("head_dim")
    if head_dim and heads and hidden and head_dim * heads != hidden:
        out.append(
            f"moe: DeepSeek-MoE's attention has head_dim = hidden_size / heads "
            f"({hidden // heads}); the base model's is {head_dim}"
        )
    rope = base.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default", "linear", "dynamic"):
        out.append(
            f"moe: DeepSeek-MoE's model code has no {rope['rope_type']!r} RoPE scaling "
            "(only linear and dynamic)"
        )
    if base.get("sliding_window"):
        warn.append(
            f"moe: DeepSeek-MoE's attention has no sliding window: the output attends to the "
            f"whole context, the base model to {base['sliding_window']} tokens"
        )
    return out, warn


def _sliding_layers(base: Mapping[str, Any], num_layers: int) -> list[int]:
    """The layers a Qwen2 / Qwen3 config slides its attention window over."""
    if not base.get("use_sliding_window") or not base.get("sliding_window"):
        return []
    types = base.get("layer_types") or [
        "sliding_attention" if i >= base.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    return [i for i, t in enumerate(types) if t == "sliding_attention"]
