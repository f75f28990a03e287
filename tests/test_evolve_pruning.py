"""Merge and prune in one search (``genome.prune: layers``, ``splice.evolve.pruning``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import logits
from evolve_helpers import config_dict, write_tasks

from splice.errors import SpliceError
from splice.evolve import EvolveConfig, evolve
from splice.evolve.search import Candidates, prepare
from splice.merge import MergeOptions, run

pytest.importorskip("cma")
pytest.importorskip("lm_eval")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("prune_tasks"))


def pruned_config(trio, tasks, **genome) -> EvolveConfig:
    data = config_dict(trio, tasks)
    data["genome"].update(merge_method="task_arithmetic", prune="layers", **genome)
    return EvolveConfig.from_dict(data)


def genes(genome, keep, seed=0) -> np.ndarray:
    merge = np.random.default_rng(seed).uniform(0, 1, genome.merge_dim)
    return np.r_[merge, np.asarray(keep, dtype=float)]


@pytest.mark.parametrize(
    "genome",
    [
        {"filters": ["self_attn", "mlp"]},  # per group of 2 layers, attention / mlp / rest
        {"smooth": True},  # gradients over the layers
        {"layer_granularity": 0},
    ],
    ids=["groups", "smooth", "one-group"],
)
def test_a_pruned_candidate_is_the_model_its_recipe_writes(trio, tasks, tmp_path, genome):
    """In memory (the resident module's view of its kept layers) = ``splice merge`` of the
    recipe loaded by transformers; then a keep-all candidate is the plain merge again."""
    cfg = pruned_config(trio, tasks, **genome)
    g, sources, options = prepare(cfg)
    cand = Candidates(cfg, g, sources, None, options)  # type: ignore[arg-type]
    x = genes(g, [0.2, 0.9, 0.1, 0.8])  # layers 1 and 3 of 4
    assert g.kept_layers(x) == [1, 3]
    cand.merge(x)
    recipe = g.recipe(x)
    assert "slices" in recipe and "models" not in recipe
    out = run(recipe, tmp_path / "pruned", MergeOptions(show_progress=False))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert torch.equal(logits(cand.module), logits(out))
    assert cand.module.config.num_hidden_layers == 2

    full = g.keep_all(x)
    cand.merge(full)
    assert len(cand.module.model.layers) == 4 and cand.module.config.num_hidden_layers == 4
    written = run(g.recipe(full), tmp_path / "full", MergeOptions(show_progress=False))
    assert torch.equal(logits(cand.module), logits(written))


def test_keeping_every_layer_is_the_plain_genome(trio, tasks):
    cfg = pruned_config(trio, tasks)
    plain_cfg = EvolveConfig.from_dict(
        {**cfg.model_dump(mode="json"), "genome": {**cfg.genome.model_dump(), "prune": None}}
    )
    g, sources, options = prepare(cfg)
    p, p_sources, p_options = prepare(plain_cfg)
    assert g.dim == p.dim + 4 and g.names()[p.dim :] == ["keep.0", "keep.1", "keep.2", "keep.3"]
    x = genes(g, [1, 1, 0.6, 0.51])
    assert g.recipe(x) == p.recipe(x[: p.dim])
    assert g.size(x) == 1.0
    start = g.start(0.5)
    assert np.array_equal(start[: p.dim], p.start(0.5)) and np.all(start[p.dim :] > 0.5)
    a = Candidates(cfg, g, sources, None, options)  # type: ignore[arg-type]
    b = Candidates(plain_cfg, p, p_sources, None, p_options)  # type: ignore[arg-type]
    a.merge(x)
    b.merge(x[: p.dim])
    assert torch.equal(logits(a.module), logits(b.module))


def test_size_is_the_kept_parameters_over_all(trio, tasks):
    """The tiny llama by hand: hidden 32, MLP 72, 4 heads of 8 (2 for keys and values),
    vocabulary 96, head not tied."""
    g, _, _ = prepare(pruned_config(trio, tasks))
    h, i, kv, v = 32, 72, 16, 96
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q o, k v, gate up down, 2 norms
    other = 2 * v * h + h  # embeddings, head, final norm
    assert g.layer_params == (layer,) * 4 and g.other_params == other
    x = genes(g, [1, 0, 0, 1])
    assert g.params(x) == other + 2 * layer
    assert g.size(x) == pytest.approx((other + 2 * layer) / (other + 4 * layer))


def test_validation(trio, tasks):
    g, _, _ = prepare(pruned_config(trio, tasks))
    with pytest.raises(SpliceError, match="drop every layer"):
        g.recipe(genes(g, [0, 0.5, 0.1, 0.2]))
    data = config_dict(trio, tasks)
    data["genome"] = {"models": data["genome"]["models"], "space": "dataflow", "prune": "layers"}
    with pytest.raises(SpliceError, match="prune is a parameter-space setting"):
        EvolveConfig.from_dict(data)
    data = config_dict(trio, tasks)
    data["genome"]["prune"] = "heads"
    with pytest.raises(SpliceError, match="prune"):
        EvolveConfig.from_dict(data)
    # a config without the key keeps the fingerprint it had before the key existed
    plain = EvolveConfig.from_dict(config_dict(trio, tasks))
    dump = plain.model_dump(mode="json")
    assert "prune" in dump["genome"]
    dump["genome"]["prune"] = "layers"
    assert EvolveConfig.from_dict(dump).fingerprint() != plain.fingerprint()


def test_a_search_trades_score_for_size(trio, tasks, tmp_path):
    """size_weight: fitness = task score - w * size, recorded per candidate."""
    data = config_dict(trio, tasks)
    data["genome"].update(merge_method="task_arithmetic", prune="layers")
    data["search"].update(size_weight=0.5, generations=2)
    data["tasks"] = [{"name": "tiny_mc"}]
    result = evolve(EvolveConfig.from_dict(data), tmp_path / "run")
    records = [
        json.loads(r) for r in (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()
    ]
    assert len(records) >= 8 and all(r["error"] is None for r in records)
    for r in records:
        assert 0 < r["size"] <= 1
        assert r["fitness"] == pytest.approx(r["scores"]["tiny_mc"] - 0.5 * r["size"])
    assert result.best_fitness == max(r["fitness"] for r in records)


def test_the_pareto_example_marks_the_points_no_other_beats():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "pareto_zoo.py"
    spec = importlib.util.spec_from_file_location("pareto_zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    points = [
        {"params": p, "scores": {"zoo_math_lang": a}}
        for p, a in [(10, 0.7), (10, 0.6), (8, 0.65), (8, 0.65), (6, 0.5), (9, 0.5)]
    ]
    module.pareto(points)
    assert [p["front"] for p in points] == [True, False, True, True, True, False]
    slices = {
        "slices": [{"sources": [{"layer_range": [0, 2]}]}, {"sources": [{"layer_range": [5, 6]}]}]
    }
    assert module._kept(slices, 8) == [0, 1, 5] and module._kept({"models": []}, 3) == [0, 1, 2]
