"""Multi-token-prediction layers (DeepSeek-V3, GLM-4.5: ``num_nextn_predict_layers`` layers stored
after the decoder layers; splice.mtp): listed apart, carried unchanged after the output's last
layer by the verbs that keep the layer layout, left out (and said) by collapse.

The fixtures are tiny transformers-built models given one MTP layer the way the released
checkpoints store it: a decoder layer at index ``num_hidden_layers`` with ``enorm``, ``hnorm``,
``eh_proj`` and ``shared_head``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import build
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from splice.checkpoint import Checkpoint
from splice.cli import main

MTP_PARTS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


def with_mtp(folder: Path, family: str) -> Path:
    """A tiny ``family`` model with one MTP layer (its decoder part a perturbed copy of the
    last layer)."""
    path = build(family, folder)
    cfg = json.loads((path / "config.json").read_text())
    n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    sd = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    for name, t in list(sd.items()):
        if name.startswith(f"model.layers.{n - 1}."):
            new = name.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")
            sd[new] = t + 0.01 * torch.randn(t.shape, generator=g)
    for part in MTP_PARTS:
        shape = (h, 2 * h) if part == "eh_proj.weight" else (h,)
        sd[f"model.layers.{n}.{part}"] = torch.randn(shape, generator=g)
    save_file({k: v.contiguous() for k, v in sd.items()}, path / "model.safetensors")
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118


def layer(sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    return {n[len(p) :]: t for n, t in sd.items() if n.startswith(p)}


@pytest.fixture(scope="module", params=["deepseek_v3", "glm4_moe"])
def src(request, tmp_path_factory) -> Path:
    return with_mtp(tmp_path_factory.mktemp("mtp") / request.param, request.param)


def run(*argv: object) -> None:
    assert main([str(a) for a in argv]) == 0


def test_listed_apart(src):
    ckpt = Checkpoint(src)
    n = ckpt.config["num_hidden_layers"]
    assert ckpt.num_layers == n and ckpt.mtp
    assert {ckpt.arch.layer_of(m) for m in ckpt.mtp} == {n}
    ckpt.validate()  # the config's count is the decoder layers'


@pytest.mark.parametrize(
    ("verb", "layers"),
    [
        (["upscale", "--layers", "0,1,1,2,3"], [0, 1, 1, 2, 3]),
        (["prune", "--drop", "1"], [0, 2, 3]),
    ],
)
def test_carried_after_the_last_layer(src, verb, layers, tmp_path):
    """The output's layers are the planned ones and the MTP layer follows them, bytes
    unchanged; transformers loads the output with nothing missing and only the MTP layer
    unused."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    run(verb[0], src, out, *verb[1:], "--no-progress")
    a, b = tensors(src), tensors(out)
    n_out = len(layers)
    n_src = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == n_out and cfg["num_nextn_predict_layers"] == 1
    for j, i in enumerate(layers):
        assert layer(b, j).keys() == layer(a, i).keys()
    mtp_src, mtp_out = layer(a, n_src), layer(b, n_out)
    assert mtp_out.keys() == mtp_src.keys() and set(MTP_PARTS) <= set(mtp_out)
    assert all(torch.equal(mtp_out[k], mtp_src[k]) for k in mtp_src)
    assert not layer(b, n_out + 1)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert all(k.startswith(f"model.layers.{n_out}.") for k in info["unexpected_keys"])


def test_a_merge_carries_its_first_model_s(src, tmp_path):
    other = with_mtp(tmp_path / "b", Checkpoint(src).config["model_type"])
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: linear\nparameters: {normalize: false}\nmodels:\n"
        f"  - model: {src}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {other}\n    parameters: {{weight: 0.5}}\n"
    )
    out = tmp_path / "m"
    run("merge", recipe, out, "--no-progress")
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    mtp_src, mtp_out = layer(tensors(src), n), layer(tensors(out), n)
    assert mtp_out.keys() == mtp_src.keys()
    assert all(torch.equal(mtp_out[k], mtp_src[k]) for k in mtp_src)


def test_collapse_leaves_it_out_and_says_so(src, tmp_path):
    out = tmp_path / "c"
    from splice.surgery import collapse

    report = collapse(src, out, method="uniform").report
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0
    assert not layer(tensors(out), cfg["num_hidden_layers"])
    assert any("multi-token-prediction" in note for note in report.notes)


def test_keeping_some_experts_leaves_it_out_and_says_so(src, tmp_path):
    from splice.merge import run as merge

    cfg = json.loads((src / "config.json").read_text())
    n, dense = cfg["num_hidden_layers"], cfg.get("first_k_dense_replace", 0)
    keep = [None if i < dense else [1, 0, 3, 2] for i in range(n)]
    out = tmp_path / "k"
    with pytest.warns(UserWarning, match="multi-token-prediction layers are left out"):
        merge({"merge_method": "passthrough", "models": [{"model": str(src)}],
               "keep_experts": keep}, out)  # fmt: skip
    written = json.loads((out / "config.json").read_text())
    assert written["num_nextn_predict_layers"] == 0 and not layer(tensors(out), n)


def test_inspect_shows_it(src, capsys):
    run("inspect", src, "--json")
    data = json.loads(capsys.readouterr().out)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert data["mtp_layers"] == [n] and data["mtp_params"] > 0
    assert data["num_layers"] == n
