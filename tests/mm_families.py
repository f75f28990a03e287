"""The multimodal families splice acts on, as tiny random vision-language models transformers
builds (``…ForConditionalGeneration``): a 4-layer language model with its family's particulars
(:data:`families.FAMILIES`), a 2-layer vision tower and the projector, saved the way
transformers saves them. :func:`build_mm` saves one with every weight perturbed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from families import BASE, FAMILIES

#: multimodal model_type -> (text family whose tiny fields it takes, config class, extra fields)
VISION_CLIP = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
)
_VISION_QWEN = dict(
    depth=2,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    out_hidden_size=BASE["hidden_size"],
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
)

#: Qwen3-VL's interleaved multimodal RoPE and vision tower (one deepstack merger); Qwen-VL's
#: special tokens
_MROPE3 = {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True}
_VISION_QWEN3 = {**_VISION_QWEN, "deepstack_visual_indexes": [0], "num_position_embeddings": 16}
_QWEN_TOKENS = dict(
    image_token_id=95, video_token_id=94, vision_start_token_id=93, vision_end_token_id=92
)

#: Gemma 4's vision and audio towers and special tokens (tests/test_gemma4.py builds with them)
GEMMA4_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=4,
    pooling_kernel_size=2,
    position_embedding_size=64,
)
GEMMA4_AUDIO = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    subsampling_conv_channels=[4, 4],
    output_proj_dims=24,
    conv_kernel_size=3,
)
GEMMA4_TOKENS = dict(
    image_token_id=95,
    boi_token_id=93,
    eoi_token_id=94,
    video_token_id=92,
    audio_token_id=91,
    boa_token_id=90,
    eoa_token_index=89,
)

MM_FAMILIES: dict[str, dict[str, Any]] = {
    "gemma3": dict(
        text="gemma3_text",
        vision_config=VISION_CLIP,
        extra=dict(
            mm_tokens_per_image=4, boi_token_index=93, eoi_token_index=94, image_token_index=95
        ),
    ),
    "mistral3": dict(
        text="mistral",
        vision_config={**VISION_CLIP, "head_dim": 8},
        extra=dict(image_token_index=95, spatial_merge_size=2),
    ),
    "qwen2_5_vl": dict(
        text="qwen2",
        text_extra=dict(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config={**_VISION_QWEN, "fullatt_block_indexes": [1], "window_size": 16},
        extra=_QWEN_TOKENS,
    ),
    "qwen3_vl": dict(
        text="qwen3",
        text_extra=dict(rope_scaling=_MROPE3),
        vision_config=_VISION_QWEN3,
        extra=_QWEN_TOKENS,
    ),
    "qwen3_vl_moe": dict(
        text="qwen3_moe",
        text_extra=dict(
            moe_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            rope_scaling=_MROPE3,
        ),
        vision_config=_VISION_QWEN3,
        extra=_QWEN_TOKENS,
    ),
    "gemma4": dict(  # E2B/E4B-like: per-layer input embeddings, KV-shared double-wide layers
        text="gemma4_text",
        text_extra=dict(
            global_head_dim=16,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"] * 2,
            final_logit_softcapping=30.0,
            vocab_size_per_layer_input=BASE["vocab_size"],
            hidden_size_per_layer_input=4,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
        ),
        vision_config=GEMMA4_VISION,
        extra=dict(audio_config=GEMMA4_AUDIO, **GEMMA4_TOKENS),
    ),
    "llama4": dict(
        text="llama4_text",
        text_extra=dict(
            intermediate_size=16,
            intermediate_size_mlp=64,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=64,  # the pixel-shuffled width: hidden_size / ratio**2
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
        ),
        extra=dict(image_token_index=95, boi_token_index=93, eoi_token_index=94),
    ),
}


def mm_config(model_type: str, *, tied: bool = False, **text: Any) -> Any:
    """transformers' config object of the tiny ``model_type`` vision-language model."""
    from transformers import AutoConfig

    fam = MM_FAMILIES[model_type]
    fields = {**BASE, **FAMILIES.get(fam["text"], {}), **fam.get("text_extra", {}), **text}
    fields["tie_word_embeddings"] = tied
    fields.pop("layer_types", None) if fam["text"] in ("qwen2", "qwen3") else None
    fields.pop("use_sliding_window", None)
    if fam["text"] == "mistral":
        fields["model_type"] = "mistral"
    return AutoConfig.for_model(
        model_type,
        text_config=fields,
        vision_config=dict(fam["vision_config"]),
        tie_word_embeddings=tied,
        **fam["extra"],
    )


def build_mm(
    model_type: str, folder: str | Path, *, seed: int = 0, tied: bool = False, **text: Any
) -> Path:
    """Save a tiny random ``model_type`` vision-language model to ``folder`` (float32
    safetensors, every parameter perturbed by ``0.05 * N(0, 1)``); returns the folder."""
    import torch
    from transformers import AutoModelForImageTextToText

    cfg = mm_config(model_type, tied=tied, **text)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = Path(folder)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "preprocessor_config.json").write_text('{"image_processor_type": "tiny"}')
    return folder


#: vision fields an image forward needs beyond :data:`MM_FAMILIES`' (which only have to load):
#: Llama 4's vision adapter reads the pixel-shuffled patches (4 x hidden_size wide) through a
#: layer as wide as the encoder's MLP, so that MLP is 4 x hidden_size here
