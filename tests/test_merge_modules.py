"""mergekit's ``modules:`` recipes on multimodal models: the language model (``text_decoder``)
merged as any recipe, the vision tower and projector each merged from their own entry's models
with the recipe's method, a module left out carried from the base model.

Tiny vision-language models come from :mod:`mm_families`; every output tensor is checked
against a mix computed here from the inputs' files, the output is loaded by transformers, and
(where mergekit is installed and reads these families) the same recipe through mergekit gives
the same tensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny
from mm_families import MM_FAMILIES, build_mm
from safetensors.torch import load_file

import splice.merge as sm
from splice.cli import main
from splice.merge.runner import describe

#: stored-name prefix -> module, per family (longest first), as transformers saves them
MODULE_PREFIXES = {
    "gemma3": {"vision_tower.": "vision_tower", "multi_modal_projector.": "multi_modal_projector"},
    "mistral3": {
        "vision_tower.": "vision_tower",
        "multi_modal_projector.": "multi_modal_projector",
    },
    "qwen2_5_vl": {"visual.merger.": "multi_modal_projector", "visual.": "vision_tower"},
}


def module_of(model_type: str, name: str) -> str:
    prefixes = MODULE_PREFIXES[model_type]
    return next((m for p, m in prefixes.items() if name.startswith(p)), "text_decoder")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """model_type -> (a, b): two tiny vision-language models of the family, a the base."""
    root = tmp_path_factory.mktemp("mm")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(model_type: str) -> tuple[Path, Path]:
        if model_type not in cache:
            cache[model_type] = (
                build_mm(model_type, root / f"{model_type}_a", seed=1),
                build_mm(model_type, root / f"{model_type}_b", seed=2),
            )
        return cache[model_type]

    return get


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def weights_recipe(a: Path, b: Path, *, projector: bool, tower: str = "vision_tower") -> dict:
    """linear: text 0.3 / 0.7 (per model); the tower 0.8 for a and the module's 0.2 for b; the
    projector (if listed) the recipe's 1.0 for both."""
    modules = {
        "text_decoder": {
            "models": [
                {"model": str(a), "parameters": {"weight": 0.3}},
                {"model": str(b), "parameters": {"weight": 0.7}},
            ]
        },
        tower: {
            "models": [{"model": str(a), "parameters": {"weight": 0.8}}, {"model": str(b)}],
            "parameters": {"weight": 0.2},
        },
    }
    if projector:
        modules["multi_modal_projector"] = {"models": [{"model": str(a)}, {"model": str(b)}]}
    return {
        "merge_method": "linear",
        "base_model": str(a),
        "parameters": {"weight": 1.0},
        "dtype": "float32",
        "modules": modules,
    }


def merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    sm.run(recipe, out, sm.MergeOptions(show_progress=False))
    return tensors(out)


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_5_vl"])
@pytest.mark.parametrize("projector", [True, False], ids=["projector-merged", "projector-base"])
def test_each_module_is_mixed_as_its_entry_says(pairs, tmp_path, model_type, projector):
    a, b = pairs(model_type)
    ta, tb = tensors(a), tensors(b)
    out = merge(weights_recipe(a, b, projector=projector), tmp_path / "out")
    assert sorted(out) == sorted(ta)
    mix = {
        "text_decoder": (0.3, 0.7),
        "vision_tower": (0.8, 0.2),
        "multi_modal_projector": (0.5, 0.5) if projector else (1.0, 0.0),
    }
    seen = set()
    for name, got in out.items():
        module = module_of(model_type, name)
        seen.add(module)
        wa, wb = mix[module]
        want = ta[name] if wb == 0.0 else wa * ta[name] + wb * tb[name]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
        if module == "multi_modal_projector" and not projector:
            assert torch.equal(got, ta[name]), name  # carried as is
    assert seen == set(mix)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((a / "config.json").read_text())


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_5_vl"])
def test_the_output_loads_in_transformers(pairs, tmp_path, model_type):
    from transformers import AutoModelForImageTextToText

    a, b = pairs(model_type)
    merge(weights_recipe(a, b, projector=True), tmp_path / "out")
    model, info = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(model).__name__ == json.loads((a / "config.json").read_text())["architectures"][0]


def test_a_frankenmerge_of_the_language_model_keeps_the_base_vision_tower(pairs, tmp_path):
    from transformers import AutoModelForImageTextToText

    a, b = pairs("gemma3")
    recipe = {
        "merge_method": "passthrough",
        "base_model": str(a),
        "modules": {
            "text_decoder": {
                "slices": [
                    {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                    {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
                ]
            }
        },
    }
    out = merge(recipe, tmp_path / "out")
    ta, tb = tensors(a), tensors(b)
    prefix = "language_model.model.layers."
    for layer, (src, at) in enumerate([(ta, 0), (ta, 1), (ta, 2), (tb, 1), (tb, 2), (tb, 3)]):
        for name in [n for n in ta if n.startswith(f"{prefix}0.")]:
            got = out[name.replace(f"{prefix}0.", f"{prefix}{layer}.")]
            assert torch.equal(got, src[name.replace(f"{prefix}0.", f"{prefix}{at}.")])
    for name in ta:
        if module_of("gemma3", name) != "text_decoder":
            assert torch.equal(out[name], ta[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6
    assert len(config["text_config"]["layer_types"]) == 6
    assert config["vision_config"] == json.loads((a / "config.json").read_text())["vision_config"]
    _, info = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_a_recipe_without_text_decoder_copies_the_base_language_model(pairs, tmp_path):
    a, b = pairs("qwen2_5_vl")
    recipe = weights_recipe(a, b, projector=False)
    del recipe["modules"]["text_decoder"]
    out = merge(recipe, tmp_path / "out")
    ta, tb = tensors(a), tensors(b)
    for name, got in out.items():
        if module_of("qwen2_5_vl", name) == "vision_tower":
            torch.testing.assert_close(got, 0.8 * ta[name] + 0.2 * tb[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(got, ta[name]), name


def test_a_gradient_spreads_over_the_vision_layers(pairs):
    a, b = pairs("mistral3")
    recipe = {
        "merge_method": "linear",
        "base_model": str(a),
        "modules": {
            "text_decoder": {"models": [{"model": str(a)}, {"model": str(b)}]},
            "vision_tower": {
                "models": [
                    {"model": str(a), "parameters": {"weight": [1.0, 0.0]}},
                    {"model": str(b), "parameters": {"weight": [0.0, 1.0]}},
                ]
            },
        },
        "parameters": {"weight": 1.0},
    }
    p = sm.plan(recipe)
    by_name = {t.name: t for t in p.tasks}
    layer0 = by_name["vision_tower.transformer.layers.0.attention.q_proj.weight"]
    layer1 = by_name["vision_tower.transformer.layers.1.attention.q_proj.weight"]
    embed = by_name["vision_tower.patch_conv.weight"]  # t = 0, as mergekit's pre-weights
    assert layer0.compute.kwargs["weight"] == [1.0, 0.0]
    assert layer1.compute.kwargs["weight"] == [0.0, 1.0]
    assert embed.compute.kwargs["weight"] == [1.0, 0.0]
    table = describe(recipe).split("resolved parameters")[1]  # the module is its group
    assert "vision_tower:" in table or "  vision_tower " in table


def test_a_text_models_one_module_is_default_as_mergekit_names_it(trio, tmp_path):
    recipe = {
        "merge_method": "linear",
        "modules": {
            "default": {
                "models": [
                    {"model": str(trio["ft1"]), "parameters": {"weight": 0.25}},
                    {"model": str(trio["ft2"]), "parameters": {"weight": 0.75}},
                ]
            }
        },
    }
    out = merge(recipe, tmp_path / "out")
    t1, t2 = tensors(trio["ft1"]), tensors(trio["ft2"])
    for name, got in out.items():
        torch.testing.assert_close(got, 0.25 * t1[name] + 0.75 * t2[name], rtol=0, atol=1e-6)


# ---- bad recipes: exit code 2, one line, nothing written --------------------------------------
def fails(tmp_path, capsys, recipe: dict, lines: int = 1) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["merge", str(path), str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    got = err.strip().splitlines()
    assert len(got) == lines, err
    assert all(line.startswith("splice: error: ") for line in got), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "splice-tmp" in p.name]
    return err


@pytest.fixture
def no_reads(monkeypatch):
    import splice.checkpoint

    monkeypatch.setattr(splice.checkpoint, "pread_into", lambda *a: pytest.fail("data was read"))


@pytest.mark.parametrize("top", ["models", "slices"])
def test_modules_with_top_level_models_or_slices(pairs, tmp_path, capsys, top):
    a, b = pairs("gemma3")
    recipe = weights_recipe(a, b, projector=False)
    recipe[top] = (
        [{"model": str(a), "parameters": {"weight": 1.0}}]
        if top == "models"
        else [{"sources": [{"model": str(a), "layer_range": [0, 4]}]}]
    )
    err = fails(tmp_path, capsys, recipe)
    assert f"give `modules` or top-level `{top}`, not both" in err


def test_an_unknown_module_names_the_known_ones(pairs, tmp_path, capsys, no_reads):
    a, b = pairs("gemma3")
    recipe = weights_recipe(a, b, projector=False)
    recipe["modules"]["audio_tower"] = {"models": [{"model": str(b)}]}
    err = fails(tmp_path, capsys, recipe)
    assert (
        "'audio_tower' is not a module of gemma3 models (known: multi_modal_projector, "
        "text_decoder, vision_tower)" in err
    )


def test_modules_on_text_models(trio, tmp_path, capsys, no_reads):
    recipe = {
        "merge_method": "linear",
        "modules": {"text_decoder": {"models": [{"model": str(trio["ft1"])}]}},
        "parameters": {"weight": 1.0},
    }
    err = fails(tmp_path, capsys, recipe)
    assert "is not a multimodal model (model_type llama)" in err


def test_a_text_model_in_a_vision_module(pairs, tmp_path, capsys):
    a, b = pairs("mistral3")
    text = make_tiny(tmp_path / "mistral", "mistral", seed=5)  # the language model's family
    recipe = weights_recipe(a, b, projector=False)
    recipe["modules"]["vision_tower"]["models"].append({"model": str(text)})
    err = fails(tmp_path, capsys, recipe)
    assert f"modules.vision_tower: {text} is not a multimodal model (model_type mistral)" in err


def test_vision_towers_of_other_sizes(pairs, tmp_path, capsys, monkeypatch):
    a, _ = pairs("gemma3")
    wide = {**MM_FAMILIES["gemma3"]["vision_config"], "intermediate_size": 48}
    monkeypatch.setitem(MM_FAMILIES["gemma3"], "vision_config", wide)
    other = build_mm("gemma3", tmp_path / "wide", seed=3)
    import splice.checkpoint  # from here on, no tensor data may be read

    monkeypatch.setattr(splice.checkpoint, "pread_into", lambda *a: pytest.fail("data was read"))
    err = fails(tmp_path, capsys, weights_recipe(a, other, projector=False))
    assert "shape mismatch for vision_tower." in err
    assert f"{a} and {other} disagree on tensor shapes" in err


def test_slices_that_cut_a_vision_tower_are_refused(pairs, tmp_path, capsys, no_reads):
    a, b = pairs("gemma3")
    recipe = weights_recipe(a, b, projector=False)
    source = {"model": str(a), "layer_range": [0, 1], "parameters": {"weight": 1.0}}
    recipe["modules"]["vision_tower"] = {"slices": [{"sources": [source]}]}
    err = fails(tmp_path, capsys, recipe)
    assert "modules.vision_tower: slices that cut, repeat or reorder its layers" in err
    assert "has 2 layers" in err


def test_one_slice_over_the_whole_vision_tower_is_its_models(pairs, tmp_path):
    a, b = pairs("gemma3")
    recipe = weights_recipe(a, b, projector=False)
    recipe["modules"]["vision_tower"] = {
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 2], "parameters": {"weight": 0.8}},
                    {"model": str(b), "layer_range": [0, 2]},
                ],
                "parameters": {"weight": 0.2},
            }
        ]
    }
    out = merge(recipe, tmp_path / "out")
    ta, tb = tensors(a), tensors(b)
    name = "vision_tower.encoder.layers.1.mlp.fc1.weight"
    torch.testing.assert_close(out[name], 0.8 * ta[name] + 0.2 * tb[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "module, message",
    [
        ({}, "a module needs exactly one of `models` or `slices`"),
        ({"models": [], "parameters": {"weight": 1}}, "a module needs exactly one of"),
        ({"models": [{"model": "x"}], "layers": 3}, "modules.vision_tower.layers: unknown key"),
    ],
)
def test_malformed_module_entries(pairs, tmp_path, capsys, module, message):
    a, b = pairs("gemma3")
    recipe = weights_recipe(a, b, projector=False)
    recipe["modules"]["vision_tower"] = module
    assert message in fails(tmp_path, capsys, recipe)


# ---- against mergekit -------------------------------------------------------------------------
MERGEKIT_DRIVER = """
import json, sys
from mergekit.scripts.run_yaml import main
for config, out in json.loads(sys.argv[1]):
    main.main([config, out, "--no-write-model-card", "--no-copy-tokenizer", "--quiet"],
              standalone_mode=False)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed"
)
def test_the_same_tensors_as_mergekit(pairs, tmp_path):
    """qwen2_5_vl and mistral3: mergekit's architecture files name their modules as transformers
    saves the tiny models (its gemma3vl.json expects ``vision_tower.vision_model.``, which
    transformers 5 no longer writes, and its qwen3_vl.json three deepstack mergers)."""
    jobs = []
    for model_type in ("qwen2_5_vl", "mistral3"):
        a, b = pairs(model_type)
        recipe = weights_recipe(a, b, projector=True)
        tower = recipe["modules"]["vision_tower"]
        tower["models"][1]["parameters"] = {
            "weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.4}]
        }
        path = tmp_path / f"{model_type}.yml"
        path.write_text(yaml.safe_dump(recipe))
        jobs.append((model_type, path, recipe))
    pairs_arg = [(str(p), str(tmp_path / f"mk-{t}")) for t, p, _ in jobs]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", MERGEKIT_DRIVER, json.dumps(pairs_arg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.skip(f"mergekit cannot run these recipes: {proc.stderr.strip().splitlines()[-1]}")
    for model_type, _, recipe in jobs:
        theirs = tensors(tmp_path / f"mk-{model_type}")
        ours = merge(recipe, tmp_path / f"splice-{model_type}")
        assert sorted(ours) == sorted(theirs), model_type
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
        mk_config = json.loads((tmp_path / f"mk-{model_type}" / "config.json").read_text())
        assert json.loads((tmp_path / f"splice-{model_type}" / "config.json").read_text()) == (
            mk_config
        )
