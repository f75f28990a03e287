"""Layer maps carry per-layer config fields: ``layer_types`` (sliding / full attention per layer)
and ``no_rope_layers``. Without them transformers refuses the output of upscale / prune / a
passthrough merge of Qwen3, Gemma 3 or SmolLM3 ("num_hidden_layers ... must be equal to the
number of layer_types"), or worse, runs layers with another layer's attention type.

The reference is transformers' own model of the family, built from a config whose per-layer
fields the test maps by hand and loaded with the source's layers in the new order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from splice.cli import main

torch.set_num_threads(1)

#: family -> extra config; sliding windows short enough that a 12-token input tells the
#: attention types apart
FAMILIES = {
    "qwen3": dict(
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        use_sliding_window=True,
        sliding_window=3,
    ),
    "gemma3_text": dict(head_dim=8, sliding_window=3, sliding_window_pattern=2),
    "smollm3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layer_interval=2),
}
PER_LAYER = ("layer_types", "no_rope_layers")


def _known(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@pytest.fixture(scope="module", params=[f for f in FAMILIES if _known(f)])
def source(request, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    family = request.param
    config = AutoConfig.for_model(
        family,
        vocab_size=96,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **FAMILIES[family],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at 1 (or 0): make each layer's weights its own
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(family) / "model"
    model.save_pretrained(folder)
    assert any(isinstance(getattr(config, k, None), list) for k in PER_LAYER)
    return folder


def reference(source: Path, mapping: list[int]) -> torch.nn.Module:
    """transformers' model of the family with the source's layers ``mapping`` in order."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(source).to_dict()
    cfg["num_hidden_layers"] = len(mapping)
    for key in PER_LAYER:
        if isinstance(cfg.get(key), list):
            cfg[key] = [cfg[key][i] for i in mapping]
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config)
    src = AutoModelForCausalLM.from_pretrained(source).state_dict()
    state = {}
    for name, t in src.items():
        if not name.startswith("model.layers."):
            state[name] = t
    for j, i in enumerate(mapping):
        prefix = f"model.layers.{i}."
        for name, t in src.items():
            if name.startswith(prefix):
                state[f"model.layers.{j}." + name[len(prefix) :]] = t
    model.load_state_dict(state, strict=False)  # a tied head is not in the state dict twice
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def check(out: Path, source: Path, mapping: list[int]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    src, got = AutoConfig.from_pretrained(source), AutoConfig.from_pretrained(out)
    assert got.num_hidden_layers == len(mapping)
    for key in PER_LAYER:
        if isinstance(getattr(src, key, None), list):
            assert getattr(got, key) == [getattr(src, key)[i] for i in mapping], key
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(model), logits(reference(source, mapping)), atol=1e-5)


def run(argv: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--no-progress"]) == 0


def test_prune_maps_the_per_layer_fields(source, tmp_path):
    run(["prune", str(source), str(tmp_path / "out"), "--drop", "1"])
    check(tmp_path / "out", source, [0, 2, 3])


def test_upscale_maps_the_per_layer_fields(source, tmp_path):
    run(["upscale", str(source), str(tmp_path / "out"), "--duplicate", "1:3"])
    check(tmp_path / "out", source, [0, 1, 2, 1, 2, 3])


def test_a_passthrough_merge_maps_the_per_layer_fields(source, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {source}, layer_range: [0, 2]}}]\n"
        f"  - sources: [{{model: {source}, layer_range: [1, 4]}}]\n"
    )
    run(["merge", str(recipe), str(tmp_path / "out")])
    check(tmp_path / "out", source, [0, 1, 1, 2, 3])


def test_the_per_layer_keys_of_a_config():
    from types import SimpleNamespace

    from splice.layer_config import per_layer_keys

    config = {
        "layer_types": ["a", "b"],
        "my_flags": [1, 0],
        "architectures": ["X", "Y"],
        "eos_token_id": [1, 2],
        "other": [1, 2, 3],
    }
    fake = SimpleNamespace(num_layers=2, config=config, arch=SimpleNamespace(config_keys={}))
    assert per_layer_keys(fake) == ["layer_types", "my_flags"]


def test_an_inferred_layout_names_the_per_layer_fields_it_assumed():
    from splice.arch import ArchSpec

    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    config = {"model_type": "private", "num_hidden_layers": 3, "my_flags": [1, 0, 1]}
    with pytest.warns(UserWarning, match="per-layer config fields my_flags"):
        ArchSpec.for_model(config, names)
