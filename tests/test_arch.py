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


def test_config_with_layers_rewrites_per_layer_lists():
    spec = ArchSpec.load("qwen2")
    cfg = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "hidden_size": 8}
    out = spec.config_with_layers(cfg, [0, 1, 1, 2, 2])
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == ["a", "b", "b", "c", "c"]
    assert cfg["num_hidden_layers"] == 3  # input untouched


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
