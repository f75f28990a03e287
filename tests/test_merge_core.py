"""Merge core: recipe schema, parameter resolution, planning, passthrough and data-flow merges.

Methods themselves are tested in test_methods.py; here two tiny test-only methods check the
plumbing (which tensors and parameters reach a method) against hand computations.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import logits, make_tiny
from test_checkpoint import reference_tensors

from splice import SpliceError
from splice.cli import main
from splice.merge import MergeOptions, Recipe, merge_into, plan, run
from splice.merge.methods import METHODS, merge_method
from splice.merge.params import MISSING, resolve, setting_value

if "_test_weighted_delta" not in METHODS:

    @merge_method("_test_weighted_delta", base="required", per_model={"weight": None})
    def _weighted_delta(tensors, base, *, weight, lambda_=1.0):
        """base + lambda * sum_i weight_i (x_i - base)"""
        return base + lambda_ * sum(w * (x - base) for w, x in zip(weight, tensors, strict=True))

    @merge_method("_test_fail", base="none")
    def _fail(tensors, base):
        if tensors[0].dim() == 2:
            raise RuntimeError("boom")
        return tensors[0]


# ---- parameters ---------------------------------------------------------------------------------
def test_gradient_interpolation_and_filters():
    r = Recipe.from_dict(
        {
            "merge_method": "slerp",
            "models": [{"model": "a"}],
            "parameters": {
                "t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": [1, 0]}],
                "flag": [True, False],
            },
        }
    )
    t = r.parameters["t"]
    assert setting_value(t, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0
    assert setting_value(t, "model.layers.3.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert setting_value(t, "model.layers.3.self_attn.q_proj.weight", 0.75) == pytest.approx(0.75)
    assert setting_value(t, "model.layers.3.mlp.up_proj.weight", 0.3) == pytest.approx(0.7)
    assert setting_value(r.parameters["flag"], "x", 0.4) is True  # booleans select, never blend
    assert setting_value(r.parameters["flag"], "x", 1.0) is False
    only = Recipe.from_dict(
        {
            "merge_method": "x",
            "models": [{"model": "a"}],
            "parameters": {"w": {"filter": "mlp", "value": 2}},
        }
    ).parameters
    assert setting_value(only["w"], "self_attn", 0) is MISSING
    assert resolve("w", (None, only, {"w": 5}), "self_attn.q", 0) == 5  # falls through
    assert resolve("w", (None, only, {"w": 5}), "mlp.up", 0) == 2


# ---- parameter-space plumbing ---------------------------------------------------------------------
def test_per_model_and_global_parameters_reach_the_method(trio, tmp_path):
    recipe = {
        "merge_method": "_test_weighted_delta",
        "base_model": str(trio["base"]),
        "models": [
            {"model": str(trio["ft1"]), "parameters": {"weight": 0.3}},
            {
                "model": str(trio["ft2"]),
                "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]},
            },
        ],
        "parameters": {"lambda": 2.0},
        "dtype": "float32",
    }
    out = run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    b, f1, f2 = (reference_tensors(trio[k]) for k in ("base", "ft1", "ft2"))
    got = reference_tensors(out)
    assert set(got) == set(b)
    n_layers = 4
    for name, x in got.items():
        w2 = 0.5
        if "mlp" in name:  # gradient over the 4 layers: t = i / 3
            w2 = int(name.split(".")[2]) / (n_layers - 1)
        expected = b[name] + 2.0 * (0.3 * (f1[name] - b[name]) + w2 * (f2[name] - b[name]))
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6, msg=name)
    card = (out / "README.md").read_text()
    assert "_test_weighted_delta" in card and "lambda: 2.0" in card
    assert (out / "tokenizer.json").exists()


def test_merge_into_module_matches_written_checkpoint(trio, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {
        "merge_method": "_test_weighted_delta",
        "base_model": str(trio["base"]),
        "models": [{"model": str(trio["ft1"]), "parameters": {"weight": 0.7}}],
    }
    out = run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    model = AutoModelForCausalLM.from_pretrained(trio["base"], dtype=torch.float32)
    merge_into(model, recipe)
    torch.testing.assert_close(logits(model), logits(out), rtol=0, atol=0)


def test_merge_into_a_module_that_packs_its_experts(tiny_models, tmp_path):
    """transformers 5's Mixtral holds each layer's experts in one packed parameter; merging into
    it fills each expert's block, as loading the written merge does."""
    from transformers import AutoModelForCausalLM

    mixtral = tiny_models["mixtral"]
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(mixtral), "parameters": {"weight": 0.5}},
            {"model": str(mixtral), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    out = run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    assert any("experts.gate_up_proj" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    merge_into(model, recipe)
    torch.testing.assert_close(logits(model), logits(out), rtol=0, atol=1e-6)


# ---- passthrough and data flow ------------------------------------------------------------------
def test_passthrough_frankenmerge_copies_layers(trio, tmp_path):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(trio["ft1"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(trio["ft2"]), "layer_range": [1, 4]}]},
        ],
    }
    out = run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    a, b, got = (
        reference_tensors(trio["ft1"]),
        reference_tensors(trio["ft2"]),
        reference_tensors(out),
    )
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"]}
    for j, (src, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        for k, v in src.items():
            if k.startswith(f"model.layers.{layer}."):
                expected[k.replace(f"layers.{layer}.", f"layers.{j}.", 1)] = v
    expected["model.norm.weight"] = b["model.norm.weight"]
    expected["lm_head.weight"] = b["lm_head.weight"]
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6


def _scaled_reference(trio, steps, **config) -> torch.Tensor:
    """Logits of the path with the residual stream really scaled, using forward pre-hooks."""
    from transformers import AutoModelForCausalLM

    models = {
        k: AutoModelForCausalLM.from_pretrained(trio[k], dtype=torch.float32, **config)
        for k in trio
    }
    host = AutoModelForCausalLM.from_pretrained(trio["base"], dtype=torch.float32, **config)
    layers = []
    for model_key, layer, scale in steps:
        blk = models[model_key].model.layers[layer]
        if scale != 1.0:
            blk.register_forward_pre_hook(
                lambda mod, args, kwargs, s=scale: (
                    ((args[0] * s, *args[1:]), kwargs)
                    if args
                    else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s})
                ),
                with_kwargs=True,
            )
        layers.append(blk)
    for i, blk in enumerate(layers):
        blk.self_attn.layer_idx = i
    host.model.layers = torch.nn.ModuleList(layers)
    host.config.num_hidden_layers = len(layers)
    return logits(host)


def test_layer_path_folds_scales_exactly_up_to_norm_eps(trio, tmp_path):
    steps = [("base", 0, 1.0), ("ft1", 1, 0.6), ("ft2", 1, 1.0), ("ft2", 2, 1.7), ("base", 3, 1.0)]
    recipe = {
        "merge_method": "passthrough",
        "base_model": str(trio["base"]),
        "layer_path": [
            {"model": str(trio[m]), "layer": layer, "scale": s} for m, layer, s in steps
        ],
    }
    out = run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    # exact up to float rounding once the norm's epsilon is negligible...
    ref = _scaled_reference(trio, steps, rms_norm_eps=1e-12)
    assert (logits(out, rms_norm_eps=1e-12) - ref).abs().max() < 1e-5
    unscaled = _scaled_reference(trio, [(m, layer, 1.0) for m, layer, _ in steps])
    assert (unscaled - _scaled_reference(trio, steps)).abs().max() > 1e-2  # scales matter
    # ...and with the model's own eps (1e-6), off only by eps against this tiny model's small
    # hidden states (mean square ~4e-4 here, far larger in trained models)
    assert (logits(out) - _scaled_reference(trio, steps)).abs().max() < 2e-3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5


def test_layer_path_ranges_and_dry_run(trio, capsys):
    recipe = yaml.safe_dump(
        {
            "merge_method": "passthrough",
            "layer_path": [
                {"model": str(trio["base"]), "layer_range": [0, 3]},
                {"model": str(trio["ft1"]), "layer_range": [2, 4], "scale": 0.5},
            ],
        }
    )
    p = plan(recipe)
    assert p.config["num_hidden_layers"] == 5
    o = next(t for t in p.tasks if t.name.startswith("model.layers.4.self_attn.o_proj"))
    q = next(t for t in p.tasks if t.name.startswith("model.layers.4.self_attn.q_proj"))
    early = next(t for t in p.tasks if t.name.startswith("model.layers.2.self_attn.o_proj"))
    assert o.scale == pytest.approx(2.0) and q.scale == 1.0 and early.scale == 1.0


# ---- failures -----------------------------------------------------------------------------------
def test_failure_mid_merge_leaves_no_output(trio, tmp_path):
    recipe = {"merge_method": "_test_fail", "models": [{"model": str(trio["ft1"])}]}
    with pytest.raises(RuntimeError, match="boom"):
        run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    assert list(tmp_path.iterdir()) == []


def bad_recipes(trio, tmp_path) -> dict[str, tuple[dict, str]]:
    qwen = make_tiny(tmp_path / "qwen", "qwen2")
    wide = make_tiny(tmp_path / "wide", "llama", hidden=48)
    b, f1 = str(trio["base"]), str(trio["ft1"])
    return {
        "unknown method": (
            {"merge_method": "frobnicate", "models": [{"model": b}]},
            "unknown merge method 'frobnicate'",
        ),
        "missing base": (
            {
                "merge_method": "_test_weighted_delta",
                "models": [{"model": f1, "parameters": {"weight": 1}}],
            },
            "needs a base_model",
        ),
        "layer range": (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": b, "layer_range": [2, 9]}]}],
            },
            "out of bounds",
        ),
        "architecture": (
            {
                "merge_method": "_test_weighted_delta",
                "base_model": b,
                "models": [{"model": str(qwen), "parameters": {"weight": 1}}],
            },
            "architecture mismatch",
        ),
        "shape": (
            {
                "merge_method": "_test_weighted_delta",
                "base_model": b,
                "models": [{"model": str(wide), "parameters": {"weight": 1}}],
            },
            "shape mismatch for model.embed_tokens.weight",
        ),
        "missing parameter": (
            {"merge_method": "_test_weighted_delta", "base_model": b, "models": [{"model": f1}]},
            "parameter 'weight' is required for model",
        ),
        "missing model": (
            {"merge_method": "passthrough", "models": [{"model": str(tmp_path / "gone")}]},
            "no such folder",
        ),
        "schema": ({"merge_method": "linear", "modles": []}, "recipe: modles: unknown key"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown method",
        "missing base",
        "layer range",
        "architecture",
        "shape",
        "missing parameter",
        "missing model",
        "schema",
    ],
)
def test_bad_recipes_fail_before_reading_tensors(trio, tmp_path, capsys, monkeypatch, case):
    recipe, message = bad_recipes(trio, tmp_path)[case]
    import splice.checkpoint

    monkeypatch.setattr(splice.checkpoint, "pread_into", lambda *a: pytest.fail("data was read"))
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert all(line.startswith("splice: error: ") for line in err.strip().splitlines())
    assert not (tmp_path / "out").exists()
    with pytest.raises(SpliceError):
        plan(recipe)


def test_every_problem_is_reported_at_once(trio, tmp_path, capsys):
    recipe = {
        "merge_method": "frobnicate",
        "base_model": str(trio["base"]),
        "models": [{"model": str(tmp_path / "gone")}, {"model": str(tmp_path / "lost")}],
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unknown merge method 'frobnicate'" in err[0]
    assert all("no such folder" in line for line in err[1:])


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.yml"), str(tmp_path / "o")]) == 2
    assert "no such recipe file" in capsys.readouterr().err


def test_cli_dry_run_and_device_checks(trio, tmp_path, capsys):
    import torch

    path = tmp_path / "r.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "_test_weighted_delta",
                "base_model": str(trio["base"]),
                "models": [{"model": str(trio["ft1"]), "parameters": {"weight": 0.5}}],
            }
        )
    )
    assert main(["merge", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.3.mlp.down_proj.weight" in out and "_test_weighted_delta" in out
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        assert main(["merge", str(path), str(tmp_path / "out"), "--device", "cuda"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err
    assert main(["merge", str(path), "--no-progress"]) == 2  # no OUT and no --dry-run
    assert "give an output folder" in capsys.readouterr().err
    args = ["merge", str(path), str(tmp_path / "out"), "--device", "cpu", "--threads", "1"]
    assert main([*args, "--workers", "3", "--no-progress"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_options_are_checked_in_the_library_too():
    """A notebook gets the CLI's one-line errors: bad device, counts, budget."""
    from splice.errors import SpliceError

    if not torch.cuda.is_available():
        with pytest.raises(SpliceError, match="no CUDA device here"):
            MergeOptions(device="cuda")
    for bad in ({"device": "banana"}, {"threads": 0}, {"workers": -2}, {"memory_budget": 0}):
        with pytest.raises(SpliceError):
            MergeOptions(**bad)


def test_a_module_path_always_names_the_module():
    import importlib
    import types

    for name in ("planner", "runner", "recipe", "params", "moe", "vocab", "chat_template"):
        assert isinstance(importlib.import_module(f"splice.merge.{name}"), types.ModuleType)
    import splice.merge

    for name in dir(splice.merge):  # no exported function shadows a submodule of that name
        obj = getattr(splice.merge, name)
        if callable(obj) and not isinstance(obj, type):
            assert importlib.util.find_spec(f"splice.merge.{name}") is None, name
