"""Hostile and mistaken merge recipes and options (issue 10), through the real CLI.

Each bad input must end as exit code 2 with one line (or one line per cause) on stderr starting
``splice: error:``, no traceback, found at planning time: no tensor data read, no output folder
and no staging folder left beside it.
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_tiny

from splice import SpliceError
from splice.cli import main
from splice.merge import plan


@pytest.fixture(scope="session")
def wide(tmp_path_factory):
    """A tiny llama like the trio's but with hidden size 64 (the trio's is 32)."""
    return make_tiny(tmp_path_factory.mktemp("wide") / "wide", "llama", hidden=64, seed=7)


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("qwen") / "qwen", "qwen2", seed=8)


@pytest.fixture
def no_reads(monkeypatch):
    """Fail if any tensor data is read: bad input is found while planning."""
    import splice.checkpoint

    monkeypatch.setattr(splice.checkpoint, "pread_into", lambda *a: pytest.fail("data was read"))


def write_recipe(tmp_path, recipe) -> str:
    path = tmp_path / "recipe.yml"
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    elif isinstance(recipe, str):
        path.write_text(recipe)
    else:
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def fails(tmp_path, capsys, recipe, *options: str, lines: int = 1) -> str:
    """Run ``splice merge`` on ``recipe``; check the failure contract; return stderr."""
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["merge", write_recipe(tmp_path, recipe), str(out), "--no-progress", *options])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, err
    assert "Traceback" not in err
    got = err.strip().splitlines()
    assert len(got) == lines, err
    assert all(line.startswith("splice: error: ") for line in got), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "splice-tmp" in p.name]
    return err


def models(*entries):
    """``models:`` entries from (path, parameters) pairs."""
    return [{"model": str(m), **({"parameters": p} if p else {})} for m, p in entries]


def linear(trio, w1=0.5, w2=0.5, **extra):
    return {
        "merge_method": "linear",
        "models": models((trio["ft1"], {"weight": w1}), (trio["ft2"], {"weight": w2})),
        **extra,
    }


def gta(trio, method="ties", p1=None, p2=None, **params):
    return {
        "merge_method": method,
        "base_model": str(trio["base"]),
        "models": models(
            (trio["ft1"], {"weight": 1.0, **(p1 or {})}),
            (trio["ft2"], {"weight": 0.5, **(p2 or {})}),
        ),
        **({"parameters": params} if params else {}),
    }


# ---- 1. the recipe file itself -----------------------------------------------------------------
@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x00\x01\x02\xffPK\x03\x04", "is a binary file, not YAML text"),
        ("merge_method: linear\nname: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte"),
        ("merge_method: linear\n".encode("utf-16"), "is UTF-16 text"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- merge_method: linear\n- models: []\n", "is a YAML list"),
        ("linear\n", "is a single YAML value ('linear')"),
        ("42\n", "is a single YAML value (42)"),
        ("merge_method: [linear\n", "is not valid YAML (line 2)"),
        ("merge_method: linear\nmerge_method: ties\n", "the key 'merge_method' is given twice"),
        (
            "!!python/object/apply:os.system ['echo owned']\n",
            "uses the YAML tag !!python/object/apply:os.system (line 1), which splice refuses: "
            "recipes are data",
        ),
        ("merge_method: !!python/name:os.system\n", "uses the YAML tag !!python/name:os.system"),
        ("merge_method: !custom linear\n", "uses the YAML tag !custom"),
        ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nests lists or mappings too deeply"),
    ],
)
def test_recipe_file_that_is_not_a_yaml_mapping(tmp_path, capsys, content, message):
    err = fails(tmp_path, capsys, content)
    assert message in err


def test_python_tags_are_never_constructed(tmp_path, capsys):
    marker = tmp_path / "ran"
    err = fails(tmp_path, capsys, f"!!python/object/apply:os.system ['touch {marker}']\n")
    assert "splice refuses" in err and not marker.exists()


def test_recipe_path_that_is_a_folder(tmp_path, capsys):
    capsys.readouterr()
    assert main(["merge", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"splice: error: {tmp_path}: a folder, not a recipe file"


def test_yaml_merge_keys_and_a_byte_order_mark_still_load(trio, tmp_path):
    text = (
        "\ufeffmerge_method: linear\n"
        f"models:\n  - model: {trio['ft1']}\n    parameters: &w {{weight: 0.5, normalize: true}}\n"
        f"  - model: {trio['ft2']}\n    parameters: {{<<: *w, weight: 0.25}}\n"
    )
    p = plan(write_recipe(tmp_path, text))
    assert p.recipe.models[1].parameters == {"weight": 0.25, "normalize": True}


# ---- 2. linear normalize with weights summing to 0 ----------------------------------------------
def test_linear_weights_summing_to_zero(trio, tmp_path, capsys, no_reads):
    err = fails(tmp_path, capsys, linear(trio, 1.0, -1.0))
    assert "linear: weights [1, -1] sum to 0 and cannot be normalized" in err
    assert "model.embed_tokens.weight and 38 more tensors" in err
    plan(linear(trio, 1.0, -1.0, parameters={"normalize": False}))  # no division: fine


def test_linear_weights_summing_to_zero_in_some_tensors_only(trio, tmp_path, capsys, no_reads):
    # only the MLP tensors' weights cancel (a filter); in a gradient only at t = 0: layer 0,
    # and the embedding, final norm and head (which resolve gradients at t = 0)
    by_filter = linear(trio, [{"filter": "mlp", "value": -0.5}, {"value": 1.0}], 0.5)
    err = fails(tmp_path, capsys, by_filter)
    assert "weights [-0.5, 0.5] sum to 0" in err
    assert "(model.layers.0.mlp.down_proj.weight and 11 more tensors)" in err
    by_gradient = linear(trio, [1.0, 3.0], -1.0)
    err = fails(tmp_path, capsys, by_gradient)
    assert "weights [1, -1] sum to 0" in err
    assert "(model.embed_tokens.weight and 11 more tensors)" in err
    multi = linear(trio, 2.0, -2.0, merge_method="multislerp")
    assert "multislerp: weights [2, -2] sum to 0" in fails(tmp_path, capsys, multi)


# ---- 3. NaN and infinity --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "where,value,message",
    [
        ("weight", ".nan", "models.0: parameter 'weight' of model {ft1}: nan is not a finite"),
        ("weight", "-.inf", "parameter 'weight' of model {ft1}: -inf is not a finite number"),
        ("weight", "[1.0, .inf]", "parameter 'weight' of model {ft1}: inf is not a finite"),
        ("weight", "'nan'", "weight for {ft1}: 'nan' is not a finite number"),
        ("density", ".nan", "parameter 'density' of model {ft1}: nan is not a finite number"),
        ("epsilon", ".inf", "parameter 'epsilon' of model {ft1}: inf is not a finite number"),
        ("lambda", ".nan", "recipe: parameter 'lambda': nan is not a finite number"),
        ("t", ".inf", "recipe: parameter 't': inf is not a finite number"),
    ],
)
def test_non_finite_parameters(trio, tmp_path, capsys, no_reads, where, value, message):
    recipe = gta(trio, "della")
    if where in ("lambda", "t"):
        recipe["parameters"] = {where: "VALUE"}
        if where == "t":
            recipe = {**recipe, "merge_method": "slerp", "models": recipe["models"][:1]}
    else:
        recipe["models"][0]["parameters"][where] = "VALUE"
    text = yaml.safe_dump(recipe, sort_keys=False).replace("VALUE", value)
    err = fails(tmp_path, capsys, text)
    assert message.format(ft1=trio["ft1"]) in err


def test_non_finite_scales_and_noise(trio, tmp_path, capsys, no_reads):
    b = str(trio["base"])
    passthrough = (
        f"merge_method: passthrough\nmodels:\n- {{model: {b}, parameters: {{scale: .nan}}}}\n"
    )
    assert "parameter 'scale' of model" in fails(tmp_path, capsys, passthrough)
    path = f"merge_method: passthrough\nlayer_path:\n- {{model: {b}, layer: 0, scale: .inf}}\n"
    assert "layer_path.0.scale: expected a finite number, got inf" in fails(tmp_path, capsys, path)
    moe = (
        f"merge_method: moe\nbase_model: {b}\ngate_mode: random\nexperts:\n"
        f"- {{source_model: {b}, noise_scale: .nan}}\n- {{source_model: {trio['ft1']}}}\n"
    )
    assert "experts.0.noise_scale: expected a finite number" in fails(tmp_path, capsys, moe)


# ---- 4. ranges ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,p1,params,message",
    [
        ("ties", {"density": 1.7}, {}, "ties: model {ft1}: density 1.7 is not in [0, 1]"),
        ("dare_ties", {"density": -0.5}, {}, "model {ft1}: density -0.5 is not in [0, 1]"),
        ("breadcrumbs", {"density": 0.5, "gamma": 2}, {}, "model {ft1}: gamma 2 is not in"),
        (
            "della",
            {"density": 0.5, "epsilon": 0.6},
            {},
            "della: model {ft1}: density 0.5 ± epsilon 0.6 must lie in (0, 1)",
        ),
        ("ties", {}, {"consensus_method": "mean"}, "consensus_method 'mean' is not one of sum"),
        ("karcher", {}, {"max_iter": -1}, "karcher: max_iter must be 0 or more (got -1)"),
    ],
)
def test_parameters_out_of_range(trio, tmp_path, capsys, no_reads, method, p1, params, message):
    recipe = gta(trio, method, p1, **params)
    if method == "karcher":  # no base, no weights
        recipe.pop("base_model")
        recipe["models"] = models((trio["ft1"], None), (trio["ft2"], None))
    err = fails(tmp_path, capsys, recipe)
    assert message.format(ft1=trio["ft1"]) in err


def test_values_mergekit_accepts_are_accepted(trio):
    plan(gta(trio, "ties", {"density": 0.0}, {"density": 1.0}))  # drop / keep everything
    plan(gta(trio, "task_arithmetic", {"weight": -1.0}, **{"lambda": 0.0}))  # negation, zero lambda
    plan(gta(trio, "della", {"density": 0.5, "epsilon": -0.2}))  # |epsilon| fits
    slerp = {"merge_method": "slerp", "base_model": str(trio["base"])}
    for t in (-0.5, 1.5):  # mergekit extrapolates with t outside [0, 1]
        plan({**slerp, "models": models((trio["ft1"], None)), "parameters": {"t": t}})


def test_a_parameter_the_method_does_not_take_is_an_error(trio, tmp_path, capsys, no_reads):
    """A typo (``desnity``) would otherwise merge with the default density, silently."""
    err = fails(tmp_path, capsys, gta(trio, "ties", {"desnity": 0.5}))
    assert f"parameters of model {trio['ft1']}: 'desnity' is not a parameter of ties" in err
    assert (
        "(it takes consensus_method, density, int8_mask, lambda, normalize, rescale, weight)" in err
    )
    top = {**linear(trio), "parameters": {"lambda_": 0.5}}
    assert (
        "parameters: 'lambda_' is not a parameter of linear (it takes normalize, weight)"
        in fails(tmp_path, capsys, top)
    )


def test_a_parameter_of_another_method_is_ignored_with_a_warning(trio, tmp_path, capsys):
    """As mergekit: ``density`` in a linear recipe (copied from a TIES one) does nothing."""
    recipe = {**linear(trio), "parameters": {"density": 0.5, "t": 0.3}}
    assert plan(recipe).warnings == [
        "parameters: 'density' is not a parameter of linear (it takes normalize, weight); ignored",
        "parameters: 't' is not a parameter of linear (it takes normalize, weight); ignored",
    ]
    path = write_recipe(tmp_path, recipe)
    capsys.readouterr()
    assert main(["merge", path, str(tmp_path / "out"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("splice: warning: parameters:") == 2


# ---- 5. chat templates ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "template,message",
    [
        ("{% if %}", "Expected an expression, got 'end of statement block' (line 1)"),
        ("{{ messages | shout }}", "No filter named 'shout'"),
        ("{% for m in messages %}\n{{ m }}\n", "Unexpected end of template"),
    ],
)
def test_invalid_jinja_chat_template(trio, tmp_path, capsys, no_reads, template, message):
    err = fails(tmp_path, capsys, linear(trio, chat_template=template))
    assert "chat_template is not a valid Jinja template: " in err and message in err


def test_valid_templates_with_transformers_extensions_pass(trio):
    template = (
        "{% for m in messages %}{% if loop.index > 9 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson(indent=2) }}{% endgeneration %}{% endfor %}"
    )
    assert plan(linear(trio, chat_template=template)).chat_template == template


# ---- 6. options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option,value", [("--threads", "-1"), ("--threads", "0"), ("--workers", "0")]
)
def test_counts_must_be_positive(trio, tmp_path, capsys, option, value):
    path = write_recipe(tmp_path, linear(trio))
    capsys.readouterr()
    assert main(["merge", path, str(tmp_path / "out"), option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splice merge: error: argument " + option)
    assert f"'{value}' must be 1 or more" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--device", "banana", "--device banana: not a device"),
        ("--memory", "banana", "--memory banana: cannot read size 'banana'"),
        ("--memory", "0", "--memory 0: size must be positive"),
        ("--max-shard-size", "banana", "--max-shard-size banana: cannot read size 'banana'"),
    ],
)
def test_bad_option_values(trio, tmp_path, capsys, option, value, message):
    assert message in fails(tmp_path, capsys, linear(trio), option, value)


def test_cuda_without_cuda(trio, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for device in ("cuda", "cuda:1"):
        assert "no CUDA device here" in fails(tmp_path, capsys, linear(trio), "--device", device)


# ---- 7. one line per cause ------------------------------------------------------------------------
def test_hidden_size_mismatch_is_one_line_naming_the_cause(trio, wide, tmp_path, capsys, no_reads):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(trio["base"]),
        "models": models((trio["ft1"], {"weight": 1}), (wide, {"weight": 1})),
    }
    err = fails(tmp_path, capsys, recipe)
    assert (
        "shape mismatch for model.embed_tokens.weight [96, 32] vs [96, 64] and 38 more tensors: "
        f"{trio['base']} and {wide} disagree on tensor shapes (hidden_size 32 vs 64" in err
    )


def test_slices_of_models_of_other_sizes(trio, wide, tmp_path, capsys, no_reads):
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(trio["base"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(wide), "layer_range": [2, 4]}]},
        ],
    }
    err = fails(tmp_path, capsys, recipe)
    assert "shape mismatch for model.layers.2.input_layernorm.weight [32] vs [64]" in err
    assert f"tensors from {wide} do not fit the output config, which is {trio['base']}'s" in err
    path = {"merge_method": "passthrough", "layer_path": [{"model": str(wide), "layer": 0}]}
    path["base_model"] = str(trio["base"])
    assert "hidden size 64" in fails(tmp_path, capsys, path)


def test_missing_parameter_is_one_line(trio, tmp_path, capsys, no_reads):
    recipe = linear(trio)
    del recipe["models"][1]["parameters"]
    err = fails(tmp_path, capsys, recipe)
    assert (
        f"linear: parameter 'weight' is required for model {trio['ft2']} "
        "(model.embed_tokens.weight and 38 more tensors)" in err
    )


def test_missing_tensors_are_one_line_per_model(trio, qwen, tmp_path, capsys, no_reads):
    recipe = {
        "merge_method": "linear",
        "models": models((qwen, {"weight": 1}), (trio["ft1"], {"weight": 1})),
    }
    err = fails(tmp_path, capsys, recipe, "--allow-crimes")
    assert f"{trio['ft1']} lacks tensors the merge needs (model.layers.0.self_attn." in err
    assert "and 11 more tensors)" in err


def test_distinct_causes_stay_distinct_lines(trio, tmp_path, capsys):
    recipe = linear(trio, models=models((tmp_path / "gone", None), (tmp_path / "lost", None)))
    recipe["merge_method"] = "frobnicate"
    err = fails(tmp_path, capsys, recipe, lines=3)
    assert "unknown merge method 'frobnicate'" in err and err.count("no such folder") == 2


# ---- 8. moe under --no-progress ---------------------------------------------------------------------
def test_moe_prints_nothing_without_progress(trio, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    recipe = {
        "merge_method": "moe",
        "base_model": str(trio["base"]),
        "gate_mode": "hidden",  # loads the base model with transformers
        "experts": [
            {"source_model": str(trio["ft1"]), "positive_prompts": ["w1 w2"]},
            {"source_model": str(trio["ft2"]), "positive_prompts": ["w3 w4"]},
        ],
    }
    before = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    capsys.readouterr()
    out = tmp_path / "moe"
    assert main(["merge", write_recipe(tmp_path, recipe), str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == f"wrote {out}\n"
    assert (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()) == before


# ---- 9. the rest of the recipe surface --------------------------------------------------------------
def sliced(model, layer_range):
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": model, "layer_range": layer_range}]}],
    }


def weighted(model, weight):
    return {
        "merge_method": "linear",
        "models": [{"model": model, "parameters": {"weight": weight}}],
    }


def bad_surface(trio):
    b, f1 = str(trio["base"]), str(trio["ft1"])
    w = {"weight": 1}
    return {
        "models not a list": ({"merge_method": "linear", "models": b}, "models: expected a list"),
        "entry a number": ({"merge_method": "linear", "models": [5]}, "models.0: expected a map"),
        "model a number": (
            {"merge_method": "linear", "models": [{"model": 5}]},
            "models.0.model: expected a string, got 5",
        ),
        "model empty": ({"merge_method": "linear", "models": [{"model": ""}]}, "is empty"),
        "model a URL": (
            {"merge_method": "linear", "models": [{"model": "https://example.com/m"}]},
            "'https://example.com/m' is a URL",
        ),
        "model revision": (
            {"merge_method": "linear", "models": [{"model": {"model": {"path": b, "rev": "x"}}}]},
            "model reference key 'rev' is not supported",
        ),
        "models empty": ({"merge_method": "linear", "models": []}, "`models` is empty"),
        "tokenizer_source empty": ({**linear(trio), "tokenizer_source": ""}, "is empty"),
        "tokenizer_source a URL": ({**linear(trio), "tokenizer_source": "s3://b/m"}, "is a URL"),
        "params a list": (
            {"merge_method": "linear", "models": [{"model": b, "parameters": [1]}]},
            "models.0.parameters: expected a mapping, got [1]",
        ),
        "param null": (
            weighted(b, None),
            "parameter 'weight' of model",
        ),
        "param empty list": (
            weighted(b, []),
            "an empty list is not a value",
        ),
        "condition without value": (
            weighted(b, {"filter": "mlp"}),
            "a {filter, value} condition needs `value`",
        ),
        "param a mix": (
            weighted(b, [1, {"value": 2}]),
            "not a mix",
        ),
        "param bool for a number": (
            weighted(b, True),
            "is not a valid float",
        ),
        "number for a bool": (
            {**linear(trio), "parameters": {"normalize": 5}},
            "normalize for model.embed_tokens.weight: 5 is not a valid bool",
        ),
        "layer_range reversed": (
            sliced(b, [5, 2]),
            "layer_range [5, 2] must be [start, end) with 0 <= start < end",
        ),
        "layer_range empty": (
            sliced(b, [2, 2]),
            "layer_range [2, 2] must be",
        ),
        "layer_range negative": (
            sliced(b, [-1, 2]),
            "layer_range [-1, 2] must be",
        ),
        "layer_range three numbers": (
            sliced(b, [0, 1, 2]),
            "layer_range: expected [start, end], got [0, 1, 2]",
        ),
        "layer_range past the layers": (
            sliced(b, [0, 9]),
            "layer_range [0, 9] is out of bounds",
        ),
        "slice without sources": (
            {"merge_method": "passthrough", "slices": [{"sources": []}]},
            "slices.0.sources: must not be empty",
        ),
        "layer_path negative layer": (
            {"merge_method": "passthrough", "layer_path": [{"model": b, "layer": -1}]},
            "layer -1 must be 0 or more",
        ),
        "layer_path reversed range": (
            {"merge_method": "passthrough", "layer_path": [{"model": b, "layer_range": [3, 1]}]},
            "layer_range [3, 1] must be",
        ),
        "layer_path past the layers": (
            {"merge_method": "passthrough", "layer_path": [{"model": b, "layer": 4}]},
            "has no layer 4 (it has 4)",
        ),
        "slerp of three": (
            {
                "merge_method": "slerp",
                "base_model": b,
                "parameters": {"t": 0.5},
                "models": models((f1, None), (trio["ft2"], None)),
            },
            "slerp merges exactly 1 model besides the base, got 2",
        ),
        "nuslerp of one": (
            {"merge_method": "nuslerp", "models": models((f1, w))},
            "nuslerp merges exactly 2 models, got 1",
        ),
        "model_stock of one": (
            {"merge_method": "model_stock", "base_model": b, "models": models((f1, None))},
            "model_stock merges at least 2 models besides the base, got 1",
        ),
        "integer dtype": ({**linear(trio), "dtype": "int8"}, "dtype int8: merges compute in"),
        "integer out_dtype": ({**linear(trio), "out_dtype": "int32"}, "out_dtype int32: the"),
    }


@pytest.mark.parametrize("case", list(bad_surface({"base": "B", "ft1": "F1", "ft2": "F2"})))
def test_bad_recipe_surface(trio, tmp_path, capsys, no_reads, case):
    recipe, message = bad_surface(trio)[case]
    assert message in fails(tmp_path, capsys, recipe)
    with pytest.raises(SpliceError):
        plan(recipe)


def test_dry_run_reports_the_same_way(trio, tmp_path, capsys):
    path = write_recipe(tmp_path, linear(trio, 1.0, -1.0))
    capsys.readouterr()
    assert main(["merge", path, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sum to 0" in err[0]
    assert json.dumps(err)  # plain text
