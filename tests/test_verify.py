"""The writer's two promises (splice/verify.py): no input tensor is lost, and the output loads.

Each fault class is planted on purpose into a real verb's plan (a tensor dropped from the tasks,
a config whose ``layer_types`` does not match the layer count, an unknown model type) and must
give exit 2, one line, and nothing at OUT.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from families import build

from splice.checkpoint import open_checkpoint
from splice.cli import main
from splice.layerplan import LayerPlan
from splice.verify import lost_tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def phi(tmp_path_factory) -> Path:
    """A LayerNorm family with biases everywhere: final_layernorm.bias, lm_head.bias."""
    return build("phi", tmp_path_factory.mktemp("phi") / "model")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return build("qwen3", tmp_path_factory.mktemp("qwen3") / "model")


def _plan(folder: Path, layers: list[int]) -> tuple[list, dict]:
    from splice.layerplan import LayerRef

    ckpt = open_checkpoint(folder)
    models = {"m": ckpt}
    plan = LayerPlan(tuple(LayerRef("m", i) for i in layers), "m", "m")
    return plan.tasks(models), models


def test_layer_plans_take_every_global_tensor(phi):
    tasks, models = _plan(phi, [0, 1, 1, 2, 3])
    names = {t.name for t in tasks}
    assert {"model.final_layernorm.bias", "lm_head.bias", "lm_head.weight"} <= names
    assert lost_tensors(tasks, models) == []


def test_a_dropped_bias_is_lost(phi):
    tasks, models = _plan(phi, [0, 1, 2, 3])
    for name in ("lm_head.bias", "model.final_layernorm.bias", "model.layers.2.mlp.fc1.bias"):
        kept = [t for t in tasks if t.name != name]
        assert lost_tensors(kept, models) == [("m", name)]


def test_whole_layers_left_out_are_not_lost(phi):
    tasks, models = _plan(phi, [0, 3])
    assert lost_tensors(tasks, models) == []


def test_named_removals_are_not_lost(phi):
    tasks, models = _plan(phi, [0, 1, 2, 3])
    kept = [t for t in tasks if t.name != "lm_head.bias"]
    assert lost_tensors(kept, models, {"m": {"lm_head.bias": "test"}}) == []


def _refused(capsys, argv: list[str], out: Path, needle: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_planner_that_drops_a_tensor_writes_nothing(phi, tmp_path, capsys, monkeypatch):
    real = LayerPlan.tasks

    def dropping(self, models, **kw):
        return [t for t in real(self, models, **kw) if t.name != "model.final_layernorm.bias"]

    monkeypatch.setattr(LayerPlan, "tasks", dropping)
    out = tmp_path / "out"
    _refused(
        capsys, ["upscale", str(phi), str(out), "--duplicate", "1:3"], out, "final_layernorm.bias"
    )


def test_a_config_transformers_refuses_writes_nothing(qwen3, tmp_path, capsys, monkeypatch):
    real = LayerPlan.config

    def short(self, models, donor=None):
        cfg = real(self, models, donor)
        cfg["layer_types"] = cfg["layer_types"][:-1]
        return cfg

    monkeypatch.setattr(LayerPlan, "config", short)
    out = tmp_path / "out"
    _refused(capsys, ["upscale", str(qwen3), str(out), "--duplicate", "1:3"], out, "layer_types")


def test_an_unknown_model_type_needs_no_verify(qwen3, tmp_path, capsys, monkeypatch):
    real = LayerPlan.config

    def renamed(self, models, donor=None):
        return {**real(self, models, donor), "model_type": "qwen3_private"}

    monkeypatch.setattr(LayerPlan, "config", renamed)
    out = tmp_path / "out"
    argv = ["upscale", str(qwen3), str(out), "--duplicate", "1:3"]
    _refused(capsys, argv, out, "--no-verify")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--no-verify"]) == 0
    assert (out / "config.json").is_file()
