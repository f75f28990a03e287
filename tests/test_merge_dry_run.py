"""``splice merge --dry-run`` shows the numbers the merge will use: per tensor (JSON) and as a
table by layer range and tensor group, checked against the gradient formula and the recipe's
per-model values on the zoo's models (headers only: nothing is merged)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from splice.cli import main
from splice.execute import tensor_seed
from splice.merge import plan
from splice.merge.dry_run import parameter_table, tensor_parameters

ZOO = Path(__file__).resolve().parent.parent / "assets" / "zoo"
BASE, MATH, LANG = str(ZOO / "base"), str(ZOO / "math"), str(ZOO / "lang")
LAYERS = 8


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def dry_json(capsys, path: Path) -> dict:
    assert main(["merge", str(path), "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


SLERP = {
    "merge_method": "slerp",
    "base_model": BASE,
    "models": [{"model": BASE}, {"model": MATH}],
    "parameters": {"t": [0, 0.5, 1]},
}


def gradient(values: list[float], t: float) -> float:
    """mergekit's gradient: ``values`` spread evenly over [0, 1], linear in between."""
    return float(np.interp(t, np.linspace(0, 1, len(values)), values))


def test_slerp_gradient_per_layer(tmp_path, capsys):
    data = dry_json(capsys, write(tmp_path, SLERP))
    assert data["method"] == "slerp" and data["layers"] == LAYERS
    tensors = data["tensors"]
    assert len(tensors) == len(plan(SLERP).tasks) and {t["method"] for t in tensors} == {"slerp"}
    for t in tensors:
        assert t["base"] == BASE and t["models"] == [MATH]
        # layer i of n at i / (n - 1); embeddings, final norm and head at 0
        where = t["layer"] / (LAYERS - 1) if t["layer"] is not None else 0.0
        assert t["params"]["t"] == pytest.approx(gradient([0, 0.5, 1], where), abs=1e-12), t
    groups = {t["group"] for t in tensors}
    assert {"embed", "attention", "mlp", "norms", "final_norm", "head"} <= groups
    # the table: one row per layer (its groups share t), the globals apart
    rows = data["rows"]
    layer_rows = [r for r in rows if r["layers"] is not None]
    assert [r["layers"] for r in layer_rows] == [[i, i] for i in range(LAYERS)]
    assert all(r["what"] == "attention,mlp,norms" for r in layer_rows)
    assert [r["what"] for r in rows if r["layers"] is None] == ["embed", "final_norm", "head"]
    assert main(["merge", str(write(tmp_path, SLERP)), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "resolved parameters (slerp, base base):" in text
    assert "layer 3  attention,mlp,norms  t=0.4286" in text  # 3/7 to 4 digits
    assert "model.layers.3.mlp.down_proj.weight" in text  # the tensor list is still there


def test_constant_values_fold_into_layer_ranges(tmp_path):
    recipe = {**SLERP, "parameters": {"t": [{"filter": "mlp", "value": 0.25}, {"value": 0.75}]}}
    rows = [(r.layers, r.what, r.params) for r in parameter_table(plan(recipe))]
    assert rows == [
        (None, "embed", {"t": 0.75}),
        ((0, 7), "attention,norms", {"t": 0.75}),
        ((0, 7), "mlp", {"t": 0.25}),
        (None, "final_norm", {"t": 0.75}),
        (None, "head", {"t": 0.75}),
    ]
    # a group whose tensors disagree is shown by tensor kind
    recipe["parameters"] = {"t": [{"filter": "q_proj", "value": [0, 1]}, {"value": 0.5}]}
    first = [(r.layers, r.what) for r in parameter_table(plan(recipe)) if r.layers == (0, 0)]
    assert first == [((0, 0), "attention:self_attn.q_proj.weight")]
    zero = [r for r in parameter_table(plan(recipe)) if r.what.startswith("attention:self_attn.k")]
    assert zero[0].layers == (0, 7) and zero[0].params == {"t": 0.5}


def ties(density_lang, method: str = "ties", **extra) -> dict:
    return {
        "merge_method": method,
        "base_model": BASE,
        "models": [
            {"model": MATH, "parameters": {"weight": 1.0,
                                           "density": [{"filter": "mlp", "value": 0.5},
                                                       {"value": 0.9}]}},
            {"model": LANG, "parameters": {"weight": 0.8, "density": density_lang}},
        ],
        "parameters": {"normalize": False},
        **extra,
    }  # fmt: skip


def test_ties_density_and_weight(tmp_path, capsys):
    data = dry_json(capsys, write(tmp_path, ties([0.2, 0.6])))
    for t in data["tensors"]:
        p = t["params"]
        assert t["models"] == [MATH, LANG] and t["base"] == BASE
        assert p["weight"] == [1.0, 0.8] and p["normalize"] is False and p["lambda"] == 1.0
        where = t["layer"] / (LAYERS - 1) if t["layer"] is not None else 0.0
        math_density = 0.5 if "mlp" in t["name"] else 0.9
        assert p["density"] == pytest.approx([math_density, gradient([0.2, 0.6], where)])
        assert t["seed"] is None  # TIES draws nothing
    rows = data["rows"]
    assert rows[1]["layers"] == [0, 0] and rows[1]["what"] == "attention,norms"
    assert rows[2]["what"] == "mlp" and rows[2]["params"]["density"] == [0.5, 0.2]
    assert main(["merge", str(write(tmp_path, ties(0.3))), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "models: math = " in text and f"base = {BASE}" in text
    lines = [line.split() for line in text.splitlines()]
    assert ["layers", "0-7", "mlp", "normalize=false", "weight=math:1,lang:0.8",
            "density=math:0.5,lang:0.3"] in lines  # fmt: skip
    assert ["layers", "0-7", "attention,norms", "normalize=false", "weight=math:1,lang:0.8",
            "density=math:0.9,lang:0.3"] in lines  # fmt: skip


def test_dare_seeds_per_tensor(tmp_path, capsys):
    path = write(tmp_path, ties(0.3, method="dare_ties", seed=7))
    tensors = dry_json(capsys, path)["tensors"]
    assert all(t["seed"] == tensor_seed(7, t["name"]) for t in tensors)
    assert main(["merge", str(path), "--dry-run", "--seed", "3"]) == 0
    assert "seed 3: each tensor's generator" in capsys.readouterr().out


def test_copies_show_their_source_layers():
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": MATH, "layer_range": [0, 6]}]},
            {"sources": [{"model": LANG, "layer_range": [2, 8]}], "parameters": {"scale": 0.5}},
        ],
    }
    ts = tensor_parameters(plan(recipe))
    assert {(t.layer, t.source_layer) for t in ts if t.layer is not None} == {
        *((i, i) for i in range(6)),
        *((i, i - 4) for i in range(6, 12)),
    }
    rows = [(r.layers, r.what, r.models, r.params, r.source_layers) for r in parameter_table(ts)]
    assert rows == [
        (None, "embed", (MATH,), {}, None),
        ((0, 5), "attention,mlp,norms", (MATH,), {}, (0, 5)),
        ((6, 11), "attention,mlp,norms", (LANG,), {"scale": 0.5}, (2, 7)),
        (None, "final_norm", (LANG,), {"scale": 0.5}, None),
        (None, "head", (LANG,), {"scale": 0.5}, None),
    ]


def test_multi_document_dry_run_json(tmp_path, capsys):
    first = {**ties(0.3), "name": "step"}
    final = {**SLERP, "base_model": "step", "models": [{"model": "step"}, {"model": LANG}]}
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump_all([first, final]))
    docs = dry_json(capsys, path)["documents"]
    assert [(d["name"], d["output"], d["uses"]) for d in docs] == [
        ("step", "a temporary folder beside OUT (step)", []),
        (None, "OUT", ["step"]),
    ]
    assert docs[0]["plan"]["method"] == "ties" and docs[1]["plan"] is None
