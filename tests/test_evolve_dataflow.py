"""splice.evolve's data-flow genome: slots, decoding to a layer_path, and the in-memory path
model (shared layers, scales applied) giving the logits of the recipe ``splice merge`` writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import logits
from evolve_helpers import config_dict, write_tasks

from splice.errors import SpliceError
from splice.evolve import DataFlowGenome, EvolveConfig, evolve
from splice.evolve.config import GenomeSpec

pytest.importorskip("cma")

torch.set_num_threads(1)


def spec(trio, **kw) -> GenomeSpec:
    return GenomeSpec(
        models=[str(trio["ft1"]), str(trio["ft2"])], space="dataflow", repeats=2, **kw
    )


def test_slots_start_and_decoding(trio):
    g = DataFlowGenome(spec(trio), layers=(4, 4))
    assert len(g.slots) == 2 * (4 + 4) and g.dim == 32 and len(g.names()) == 32
    f1, f2 = str(trio["ft1"]), str(trio["ft2"])
    assert g.slots[:5] == ((f1, 0), (f1, 1), (f1, 2), (f1, 3), (f2, 0))
    x0 = g.start()
    path = g.path(x0)  # the first model's layers once, scales 1
    assert [(s["model"], s["layer"], s["scale"]) for s in path] == [
        (str(trio["ft1"]), i, 1.0) for i in range(4)
    ]
    x = x0.copy()
    x[8 + 2] = 0.9  # ft1's layer 2 again, in the second repetition
    x[16 + 8 + 2] = 1.0  # at the highest scale
    x[0] = 0.1  # ft1's layer 0 off
    steps = g.path(x)
    assert [s["layer"] for s in steps] == [1, 2, 3, 2] and steps[-1]["scale"] == 2.0
    recipe = g.recipe(x)
    assert recipe["merge_method"] == "passthrough" and recipe["base_model"] == str(trio["ft1"])
    with pytest.raises(SpliceError, match="no layer on the path"):
        g.path(np.zeros(g.dim))


def test_bad_dataflow_settings():
    with pytest.raises(ValueError, match="parameter-space setting"):
        GenomeSpec(models=["a"], space="dataflow", filters=["mlp"])
    with pytest.raises(ValueError, match="0 < low < high"):
        GenomeSpec(models=["a"], space="dataflow", ranges={"scale": (0.0, 2.0)})


def test_path_model_gives_the_logits_of_the_written_layer_path(trio, tmp_path):
    """Shared modules run in path order with the scales applied == the layer_path recipe
    written by `splice merge` with the scales folded into the residual writers."""
    from splice.evolve.dataflow import PathModels
    from splice.merge import MergeOptions, run
    from splice.resident import ResidentCheckpoint

    g = DataFlowGenome(spec(trio), layers=(4, 4))
    x = g.start()
    x[[4 + 1, 8 + 3, 12 + 0]] = 0.8  # ft2.1, ft1.3 (second pass), ft2.0 (second pass)
    x[16:] = np.linspace(0.1, 0.9, 16)  # scales from 0.57 to 1.74
    recipe = g.recipe(x)
    assert len(recipe["layer_path"]) == 7
    opts = MergeOptions(show_progress=False)
    sources = {str(trio[n]): ResidentCheckpoint(trio[n]) for n in ("ft1", "ft2")}
    paths = PathModels(sources, g.donor, opts, "float32")
    module = paths.build(recipe["layer_path"])
    written = run(recipe, tmp_path / "path", opts)
    # the fold is exact but for RMSNorm's eps (w*h / sqrt(w^2 ms(h) + eps)): these random tiny
    # models have ms(h) ~ 4e-4, so eps 1e-6 shows at 1e-3; with eps 1e-12 the two agree
    assert torch.allclose(logits(module), logits(written), atol=5e-3)
    for m in paths.modules.values():
        for sub in m.modules():
            if hasattr(sub, "variance_epsilon"):
                sub.variance_epsilon = 1e-12
    ours, theirs = logits(module), logits(written, rms_norm_eps=1e-12)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    # the path model shares the sources' layer modules: nothing is copied
    f1, f2 = paths.layers[str(trio["ft1"])], paths.layers[str(trio["ft2"])]
    expected = [f1[0], f1[1], f1[2], f1[3], f2[1], f1[3], f2[0]]
    got = [getattr(m, "layer", m) for m in module.model.layers]
    assert all(a is b for a, b in zip(got, expected, strict=True))
    # a second path reuses the same module object
    assert paths.build(g.path(g.start())) is module
    assert torch.allclose(logits(module), logits(trio["ft1"], rms_norm_eps=1e-12), atol=1e-6)


def test_a_dataflow_search_runs(trio, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    data = config_dict(trio, tasks, generations=2)
    data["genome"] = {
        "models": [str(trio["ft1"]), str(trio["ft2"])],
        "space": "dataflow",
        "repeats": 2,
    }
    result = evolve(EvolveConfig.from_dict(data), tmp_path / "run")
    assert result.done and result.evaluations == 8 and result.best_recipe["layer_path"]


def test_parameter_then_dataflow_in_sequence(trio, tmp_path):
    """A finished parameter-space run named as a model of a data-flow search stands for its
    winner (merged once to RUN/winner); the data-flow winner's recipe runs on it."""
    from splice.merge import MergeOptions, run

    tasks = write_tasks(tmp_path / "tasks")
    ps = evolve(EvolveConfig.from_dict(config_dict(trio, tasks, generations=1)), tmp_path / "ps")
    data = config_dict(trio, tasks, generations=1)
    data["genome"] = {"models": [str(ps.run), str(trio["ft2"])], "space": "dataflow", "repeats": 1}
    dfs = evolve(EvolveConfig.from_dict(data), tmp_path / "dfs")
    winner = ps.run / "winner"
    assert (winner / "config.json").is_file()
    assert dfs.best_recipe["base_model"] == str(winner)
    assert {s["model"] for s in dfs.best_recipe["layer_path"]} <= {str(winner), str(trio["ft2"])}
    assert run(dfs.run / "best.yml", tmp_path / "out", MergeOptions(show_progress=False)).is_dir()


def test_a_path_that_repeats_a_layer_generates_with_a_kv_cache(trio):
    """Each path position has its own cache slot: cached greedy decoding == uncached."""
    from splice.evolve.dataflow import PathModels
    from splice.merge import MergeOptions
    from splice.resident import ResidentCheckpoint

    f1 = str(trio["ft1"])
    sources = {f1: ResidentCheckpoint(trio["ft1"])}
    paths = PathModels(sources, f1, MergeOptions(show_progress=False), "float32")
    steps = [{"model": f1, "layer": i, "scale": s} for i, s in [(0, 1), (1, 1.5), (1, 1), (2, 1)]]
    module = paths.build(steps)
    ids, nxt = torch.tensor([[5, 9, 17, 33]]), torch.tensor([[40]])
    with torch.no_grad():
        full = module(torch.cat([ids, nxt], 1), use_cache=False).logits[0, -1]
        prefill = module(ids, use_cache=True)
        cache = prefill.past_key_values
        assert len(cache.layers) == 4  # one slot per path position
        step = module(nxt, past_key_values=cache, use_cache=True).logits[0, -1]
        kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        cached = module.generate(ids, use_cache=True, **kw)
        plain = module.generate(ids, use_cache=False, **kw)
    assert torch.allclose(step, full, atol=1e-5)
    assert torch.equal(cached, plain)
