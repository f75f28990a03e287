"""Architecture specs: every tensor of every supported model is named and placed."""

from __future__ import annotations

import json

import pytest
from conftest import ARCHS

from splice import ArchSpec, SpliceError, open_checkpoint


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_tensor_is_classified(tiny_models, model_type):
    ckpt = open_checkpoint(tiny_models[model_type])
    spec = ckpt.arch
    assert spec.model_type == model_type and not spec.inferred
    for name in ckpt:
        t = spec.parse(name)
        assert t.group != "other", name
        if t.layer is not None:
            assert spec.layer_of(name) == t.layer
            assert spec.layer_name(t.layer, t.kind, t.expert) == name
    kinds = {spec.parse(n).kind for n in ckpt if spec.layer_of(n) == 0}
    assert set(spec.required_layer_kinds()) <= kinds


def test_rename_moves_layers_and_experts():
    spec = ArchSpec.load("mixtral")
    name = "model.layers.3.block_sparse_moe.experts.2.w1.weight"
    assert spec.rename(name, layer=7) == "model.layers.7.block_sparse_moe.experts.2.w1.weight"
    assert spec.rename(name, expert=0) == "model.layers.3.block_sparse_moe.experts.0.w1.weight"
    t = spec.parse(name)
    assert (t.group, t.layer, t.expert, t.kind) == ("experts", 3, 2, "w1.weight")
    assert spec.rename("model.embed_tokens.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError):
        spec.rename("model.embed_tokens.weight", layer=1)
    llama = ArchSpec.load("llama")
    assert llama.rename("model.layers.10.mlp.up_proj.weight", layer=2) == (
        "model.layers.2.mlp.up_proj.weight"
    )
    assert llama.parse("model.layers.10.mlp.up_proj.weight").group == "mlp"
    assert llama.parse("model.layers.1.self_attn.q_proj.bias").group == "attention"
    assert ArchSpec.load("qwen2").parse("model.layers.0.self_attn.k_proj.bias").group == "attention"


def test_config_with_experts():
    spec = ArchSpec.load("mixtral")
    out = spec.config_with_experts({"num_local_experts": 8, "num_experts_per_tok": 2}, 4, 1)
    assert out == {"num_local_experts": 4, "num_experts_per_tok": 1}


def test_unknown_architecture_is_inferred_with_warning(tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "brandnew"
    (folder / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(folder)
    with pytest.warns(UserWarning, match="brandnew"):
        spec = ckpt.arch
    assert spec.inferred and spec.layer_prefix == "model.layers.{i}."
    assert spec.parse("model.layers.2.self_attn.q_proj.weight").group == "attention"
    assert spec.parse("model.layers.2.mlp.down_proj.weight").group == "mlp"
    assert spec.parse("model.layers.2.input_layernorm.weight").group == "norms"
    assert spec.embed == "model.embed_tokens.weight"
    assert ckpt.num_layers == 4


def test_no_layer_pattern_is_an_error():
    with pytest.raises(SpliceError, match="unknown architecture 'x'"):
        ArchSpec.infer("x", ["encoder.weight", "decoder.bias"])


# ---- residual-stream roles, checked by the one property they must give -------------------------
@pytest.mark.parametrize("model_type", ARCHS)
def test_roles_rotate_the_residual_stream_without_changing_logits(
    tiny_models, tmp_path, model_type
):
    """Fold every norm into the linears ``norm_feeds`` says it feeds, then rotate the stream by
    a random orthogonal Q along ``residual_dims`` alone: if the roles are right (and only then)
    the logits do not move. This is SliceGPT at 0% slicing, driven by the spec's data, on the
    checkpoint's own tensor names (transformers then loads the result)."""
    import shutil

    import torch
    from conftest import logits
    from safetensors.torch import save_file

    folder = tiny_models[model_type]
    ckpt = open_checkpoint(folder)
    spec = ckpt.arch
    state = {name: ckpt.load(name, dtype="float64") for name in ckpt}
    if ckpt.tied:  # the head gets its own copy, so the final norm can fold into it alone
        state[spec.lm_head] = state[spec.embed].clone()
    roles = {name: spec.role(name) for name in state}
    assert "other" not in roles.values(), {n: r for n, r in roles.items() if r == "other"}
    offset = spec.norm.get("offset", 0.0)
    for name, t in state.items():  # 1. fold norms into the linears they feed
        norm = spec.feeding_norm(name)
        if norm is not None and t.dim() == 2:
            t.mul_(state[norm] + offset)
    for name, t in state.items():
        if roles[name] in ("norm", "final_norm"):
            t.fill_(1.0 - offset)  # now all ones: rotation-invariant
    hidden = ckpt.config["hidden_size"]
    q, _ = torch.linalg.qr(
        torch.randn(hidden, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    for name, t in state.items():  # 2. rotate along the residual dimensions only
        if roles[name] in ("norm", "final_norm"):
            continue
        dims = spec.residual_dims(name, t.dim())
        if dims == (1,):
            t.copy_(t @ q)
        elif dims == (0,):
            t.copy_(q.T @ t if t.dim() == 2 else t @ q)
    out = tmp_path / "rotated"
    out.mkdir()
    save_file({n: t.float().contiguous() for n, t in state.items()}, out / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / extra).exists():
            shutil.copy(folder / extra, out / extra)
    # float32 weights: wrong roles move the logits by ~1e-2, rounding by ~1e-6
    torch.testing.assert_close(logits(out), logits(folder), rtol=1e-4, atol=1e-4)


def test_expert_and_dense_kinds_are_inverse():
    spec = ArchSpec.load("mixtral")
    for expert_kind in spec.experts.tensors:
        assert spec.expert_kind(spec.dense_kind(expert_kind)) == expert_kind
    assert spec.dense_kind("w2.weight") == "mlp.down_proj.weight"
    assert spec.expert_kind("self_attn.q_proj.weight") is None
