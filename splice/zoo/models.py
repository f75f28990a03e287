"""Zoo model shapes, MoE up-cycling, and saving a model as an HF folder with splice's writer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, MixtralForCausalLM, PreTrainedModel


@dataclass(frozen=True)
class Shape:
    """Size of the zoo's Llama (the MoE copies it, with ``experts`` MLPs per layer)."""

    hidden: int = 96
    intermediate: int = 192
    layers: int = 8
    heads: int = 4
    max_positions: int = 128
    experts: int = 4
    experts_per_token: int = 2
    #: untied: ``lang`` trains the Zeta rows of the embeddings (reading) and of the head
    #: (writing) apart, and the two roles do not fight over one row
    tie_embeddings: bool = False


def llama(shape: Shape, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama (``torch.manual_seed(seed)`` first)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=shape.tie_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def upcycle(
    base: LlamaForCausalLM, shape: Shape, seed: int, noise: float = 0.01
) -> MixtralForCausalLM:
    """A Mixtral whose experts all start as the base's MLP (plus a little noise) and whose
    router starts random, so training can pull the experts apart.

    Attention, norms and embeddings are copied; each expert ``e`` of layer ``i`` gets
    ``gate_up_proj[e] = [gate; up]`` ``[2*I, H]`` and ``down_proj[e]`` ``[H, I]`` from the base.
    """
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    bc = base.config
    config = MixtralConfig(
        vocab_size=bc.vocab_size,
        hidden_size=bc.hidden_size,
        intermediate_size=bc.intermediate_size,
        num_hidden_layers=bc.num_hidden_layers,
        num_attention_heads=bc.num_attention_heads,
        num_key_value_heads=bc.num_key_value_heads,
        max_position_embeddings=bc.max_position_embeddings,
        tie_word_embeddings=bc.tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.experts_per_token,
        router_aux_loss_coef=0.01,
        rope_parameters=bc.rope_parameters,
    )
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config)
    src = base.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in src:
                p.copy_(src[name])
            elif name.endswith("mlp.experts.gate_up_proj"):
                pre = name[: -len("experts.gate_up_proj")]
                gate_up = torch.cat([src[pre + "gate_proj.weight"], src[pre + "up_proj.weight"]])
                p.copy_(
                    gate_up.expand_as(p) + noise * gate_up.std() * torch.randn(p.shape, generator=g)
                )
            elif name.endswith("mlp.experts.down_proj"):
                down = src[name[: -len("experts.down_proj")] + "down_proj.weight"]
                p.copy_(down.expand_as(p) + noise * down.std() * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                raise KeyError(f"upcycle: no source for {name}")
    return moe


def checkpoint_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names: no tied head, and Mixtral experts split
    into the classic per-expert ``block_sparse_moe.experts.{e}.w1/w3/w2`` layout that
    mergekit, splice's arch spec and every transformers version read."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if model.config.model_type != "mixtral":
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            pre = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{pre}{e}.w1.weight"] = t[e, :inter]
                out[f"{pre}{e}.w3.weight"] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(t.shape[0]):
                out[f"{pre}{e}.w2.weight"] = t[e]
        else:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    return out


def save(
    model: PreTrainedModel,
    out: str | os.PathLike[str],
    tokenizer_folder: str | os.PathLike[str],
    card: str,
    dtype: str = "float32",
) -> Path:
    """Write ``model`` to ``out`` atomically (CheckpointWriter) with the tokenizer and a card."""
    import torch

    from splice.writer import CheckpointWriter, TensorSpec

    tensors = checkpoint_tensors(model)
    specs = [TensorSpec(n, tuple(t.shape), dtype) for n, t in tensors.items()]
    config: dict[str, Any] = model.config.to_dict()
    config["dtype"] = dtype
    config["architectures"] = [type(model).__name__]  # mergekit and splice's arch lookup read it
    config["head_dim"] = (
        config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    )
    config["output_router_logits"] = False
    config.pop("transformers_version", None)
    with CheckpointWriter(out, specs, overwrite=True) as w:
        for n, t in tensors.items():
            w.write(n, t.to(getattr(torch, dtype)))
        w.write_config(config)
        w.copy_tokenizer(tokenizer_folder)
        w.write_json(
            "generation_config.json",
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False},
        )
        w.write_card(card)
    return Path(out)
