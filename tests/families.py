"""The dense and hybrid families splice supports, as tiny random models transformers builds.

``FAMILIES`` maps a ``model_type`` to the config fields that make its tiny model exercise what
is particular to the family: sliding-window layers short enough to matter on a 12-token input,
per-layer fields (``layer_types``, ``no_rope_layers``, ``full_attn_idxs``), hybrid layers
(Qwen3-Next's linear attention, LFM2's convolutions), biases, granite's multipliers, cohere's
logit scale. :func:`build` saves one such model (float32 safetensors) with every weight
perturbed, so no two layers and no norm are alike and a wrong layer order shows in the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: sizes shared by every family
BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

#: model_type -> config fields beyond BASE
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": dict(sliding_window=3),
    "ministral": dict(sliding_window=3, layer_types=SLIDING),
    "ministral3": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=3, layer_types=SLIDING),
    "qwen3": dict(use_sliding_window=True, sliding_window=3, layer_types=SLIDING),
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "gemma": dict(tie_word_embeddings=False),
    "gemma2": dict(sliding_window=3),
    "gemma3_text": dict(sliding_window=3, layer_types=SLIDING),
    "phi": {},
    "phi3": {},
    "olmo2": {},
    "olmo3": dict(sliding_window=3),
    "granite": dict(
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=2.0,
    ),
    "cohere": dict(logit_scale=0.5, use_qk_norm=True),
    "cohere2": dict(logit_scale=0.5, sliding_window=3, layer_types=SLIDING),
    "starcoder2": dict(sliding_window=3),
    "smollm3": dict(no_rope_layer_interval=2, sliding_window=3),
    "glm": {},
    "glm4": {},
    "exaone4": dict(sliding_window=3, layer_types=SLIDING),
    "seed_oss": {},
    "apertus": {},
    "lfm2": dict(full_attn_idxs=[1, 3], tie_word_embeddings=False),
}


#: small MLA sizes (the defaults hold 1536/512-wide latent projections); MLA has as many key /
#: value heads as query heads, and one expert group (the default 8 groups need 8+ experts)
MLA: dict[str, Any] = dict(
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
    n_group=1,
    topk_group=1,
)

#: MoE families: config fields beyond :data:`SMALL` (4 experts, top-2), with a dense layer and
#: shared experts where the family has them
MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {},
    "qwen2_moe": dict(mlp_only_layers=[0]),
    "qwen3_moe": dict(mlp_only_layers=[0]),
    "olmoe": {},
    "deepseek_v3": dict(MLA, first_k_dense_replace=1, n_shared_experts=1),
    "deepseek_v2": dict(MLA, first_k_dense_replace=1, n_shared_experts=1),
    "glm4_moe": dict(first_k_dense_replace=1, n_shared_experts=1),
    "gpt_oss": {},
    "granitemoe": {},
    "ernie4_5_moe": dict(moe_layer_start_index=1, moe_num_shared_experts=1),
    "dots1": dict(first_k_dense_replace=1, n_shared_experts=1),
    # dense and MoE layers alternating (Maverick's), the MoE ones with a shared expert and
    # experts narrower than the dense MLPs; top-2, a NoPE layer, chunked attention and
    # temperature tuning that act on 12 tokens. The MoE layers are listed (moe_layers, which
    # transformers reads before interleave_moe_layer_step): splice's interval rule for the step
    # does not read that list yet, so a step of 2 refuses maps that break the alternation
    # (tests/test_llama4_text.py)
    "llama4_text": dict(
        intermediate_size=16,
        intermediate_size_mlp=64,
        moe_layers=[1, 3],
        no_rope_layers=[1, 0, 1, 1],
        attention_chunk_size=4,
        floor_scale=4,
    ),
}


def config(family: str, **overrides: Any) -> Any:
    """transformers' config object of the tiny ``family`` model (dense: :data:`FAMILIES`; MoE:
    :data:`SMALL` where the config has the field, then :data:`MOE_FAMILIES`)."""
    from transformers import AutoConfig

    if family in FAMILIES:
        return AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **overrides})
    default = AutoConfig.for_model(family)
    aliases = getattr(default, "attribute_map", {})
    fields = {k: v for k, v in SMALL.items() if hasattr(default, k) or k in aliases}
    fields.update(MOE_FAMILIES[family])
    fields.update(overrides)
    cfg = AutoConfig.for_model(family, **fields)
    n = fields["num_hidden_layers"]
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) != n:
        cfg.layer_types = cfg.layer_types[:n]
    return cfg


def build(family: str, folder: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random ``family`` model to ``folder`` (float32 safetensors); returns it.

    Every parameter gets ``0.05 * N(0, 1)`` added, so norms are not all ones and layers differ.
    """

    return _save(config(family, **overrides), folder, seed)


def _save(cfg: Any, folder: str | Path, seed: int) -> Path:
    """A random float32 model of ``cfg``, every parameter perturbed, saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


def known(family: str) -> bool:
    """Whether the installed transformers has this model type."""
    from transformers import CONFIG_MAPPING

    return family in CONFIG_MAPPING


#: more causal-LM types users meet (MoE, GPT-2-style naming, ...), shrunk generically: the
#: promise tested on them is only "a loadable output with no lost tensor, or a one-line refusal"
OTHERS = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "granitemoe",
    "dots1",
    "gpt_oss",
    "ernie4_5_moe",
    "glm4_moe",
    "llama4_text",
    "gpt2",
    "gpt_neox",
    "bloom",
    "opt",
    "stablelm",
    "nemotron",
    "helium",
    "hunyuan_v1_dense",
    "exaone",
    "arcee",
)
#: what :func:`build_any` sets where a config has the field (or an alias of it)
SMALL: dict[str, Any] = {
    **BASE,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "ffn_dim": 64,
    "n_inner": 64,
    "word_embed_proj_dim": 32,  # OPT
}


def build_any(model_type: str, folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny random model of any causal-LM type: its default config with every field of
    :data:`SMALL` it has set small (4 layers, hidden 32), saved like :func:`build`."""
    if model_type in FAMILIES:
        return build(model_type, folder, seed=seed)
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    for key, value in SMALL.items():
        if hasattr(cfg, key) or key in getattr(cfg, "attribute_map", {}):
            setattr(cfg, key, value)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: SMALL["num_hidden_layers"]]
    return _save(cfg, folder, seed)
