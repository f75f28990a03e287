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


# ---- Sakana's W (scales per transition), the donor gene ----------------------------------------
def test_per_transition_decoding(trio):
    """W[p, j] scales the input of layer j when p is the layer before it (row 0: the
    embeddings); the same transition met twice on a path takes the same gene."""
    g = DataFlowGenome(spec(trio, scales="per_transition"), layers=(4, 4))
    f1, f2 = str(trio["ft1"]), str(trio["ft2"])
    t, m = 16, 8  # slots, distinct layers
    assert g.num_scales == (m + 1) * m and g.dim == t + 72 and len(g.names()) == g.dim
    assert g.ids[:5] == ((f1, 0), (f1, 1), (f1, 2), (f1, 3), (f2, 0))
    # the gene layout: indicators, then W row after row (embeddings first), columns by layer id
    assert g.scale_gene(None, (f1, 0)) == t and g.scale_gene(None, (f2, 3)) == t + 7
    assert (
        g.scale_gene((f1, 0), (f1, 0)) == t + m and g.scale_gene((f2, 1), (f1, 1)) == t + 6 * m + 1
    )
    assert g.names()[g.scale_gene((f2, 1), (f1, 1))] == "W.ft2.1>ft1.1"
    assert g.names()[t] == "W.embed>ft1.0" and g.names()[0] == "on.ft1.0.r0"
    assert [(s["model"], s["layer"], s["scale"]) for s in g.path(g.start())] == [
        (f1, i, 1.0) for i in range(4)
    ]
    x = np.r_[np.full(t, 0.1), np.full(g.num_scales, 0.5)]  # every scale 1 (range [0.5, 2])
    x[[0, 4 + 1, 8 + 0, 12 + 1]] = 0.9  # ft1.0, ft2.1, ft1.0 again, ft2.1 again
    x[g.scale_gene(None, (f1, 0))] = 1.0  # 2.0 from the embeddings
    x[g.scale_gene((f1, 0), (f2, 1))] = 0.0  # 0.5 from ft1.0 to ft2.1 (met twice)
    x[g.scale_gene((f2, 1), (f1, 0))] = 0.75  # 2 ** 0.5
    x[g.scale_gene((f1, 0), (f1, 0))] = 0.0  # a transition the path does not take
    steps = g.path(x)
    assert [(s["model"], s["layer"]) for s in steps] == [(f1, 0), (f2, 1), (f1, 0), (f2, 1)]
    assert [s["scale"] for s in steps] == [2.0, 0.5, round(2**0.5, 8), 0.5]
    assert g.recipe(x)["base_model"] == f1 and g.donor == f1
    # per slot, the same indicators take the slots' own scale genes
    per_slot = DataFlowGenome(spec(trio), layers=(4, 4))
    y = np.r_[x[:t], np.full(t, 0.5)]
    y[t + 12 + 1] = 1.0
    assert [s["scale"] for s in per_slot.path(y)] == [1.0, 1.0, 1.0, 2.0]
    # a scale range of its own
    wide = DataFlowGenome(
        spec(trio, scales="per_transition", ranges={"scale": (0.25, 4.0)}), (4, 4)
    )
    assert [s["scale"] for s in wide.path(x)] == [4.0, 0.25, 2.0, 0.25]


def test_donor_gene_decoding(trio):
    f1, f2 = str(trio["ft1"]), str(trio["ft2"])
    g = DataFlowGenome(spec(trio, donor="gene"), layers=(4, 4))
    assert g.dim == 32 + 2 and g.names()[-2:] == ["donor.ft1", "donor.ft2"]
    assert g.donor is None and g.donors == (f1, f2)
    x = g.start()
    assert g.donor_of(x) == f1 and g.recipe(x)["base_model"] == f1
    x[-2:] = [0.2, 0.9]
    assert g.donor_of(x) == f2 and g.recipe(x)["base_model"] == f2
    x[-2:] = [0.6, 0.6]  # a tie: the first model
    assert g.donor_of(x) == f1
    # generation 0's grid: each model's layers under each donor
    grid = dict(g.grid())
    assert list(grid) == [
        "ft1 layers, donor ft1",
        "ft2 layers, donor ft1",
        "ft1 layers, donor ft2",
        "ft2 layers, donor ft2",
    ]
    assert np.array_equal(grid["ft1 layers, donor ft1"], g.start())
    p = grid["ft1 layers, donor ft2"]
    assert g.donor_of(p) == f2 and [s["model"] for s in g.path(p)] == [f1] * 4
    # the bounds are checked under every donor
    assert [g.donor_of(x) for _, x in g.corners()] == [f1, f1, f2]
    # a fixed donor: donor MODEL is base_model
    fixed = DataFlowGenome(spec(trio, donor=f2), layers=(4, 4))
    assert fixed.spec.base_model == f2 and fixed.donor == f2 and fixed.dim == 32
    assert fixed.recipe(fixed.start())["base_model"] == f2


def test_dataflow_settings_are_validated():
    with pytest.raises(ValueError, match="scales is a data-flow setting"):
        GenomeSpec(models=["a", "b"], merge_method="linear", scales="per_transition")
    with pytest.raises(ValueError, match="donor is a data-flow setting"):
        GenomeSpec(models=["a", "b"], merge_method="linear", donor="gene")
    with pytest.raises(ValueError, match="scales"):
        GenomeSpec(models=["a"], space="dataflow", scales="per_matrix")
    with pytest.raises(ValueError, match="base_model would fix it"):
        GenomeSpec(models=["a", "b"], space="dataflow", donor="gene", base_model="a")
    with pytest.raises(ValueError, match="two or more models"):
        GenomeSpec(models=["a"], space="dataflow", donor="gene")
    with pytest.raises(ValueError, match="name two donors"):
        GenomeSpec(models=["a", "b"], space="dataflow", donor="b", base_model="a")
    same = GenomeSpec(models=["a", "b"], space="dataflow", donor="b", base_model="b")
    assert same == GenomeSpec(models=["a", "b"], space="dataflow", base_model="b")
    assert (
        GenomeSpec(models=["a"], space="dataflow", ranges={"scale": (0.5, 3)}).scales == "per_slot"
    )


def test_a_donor_path_resolves_like_base_model(trio):
    data = {
        "genome": {"models": ["ft1", "ft2"], "space": "dataflow", "donor": "ft2"},
        "tasks": ["tiny_mc"],
    }
    config = EvolveConfig.from_dict(data, base_dir=trio["ft1"].parent)
    assert config.genome.base_model == str(trio["ft2"]) and config.genome.donor is None


def test_an_old_dataflow_config_keeps_its_fingerprint():
    """The new genome keys at their defaults leave the fingerprint as it was before they
    existed (the value below: the same config's fingerprint before ``scales`` and ``donor``),
    so older data-flow run folders still resume; set, they change it."""
    data = {
        "genome": {"models": ["math", "lang"], "space": "dataflow", "repeats": 2},
        "tasks": ["zoo_math_lang_fit"],
        "search": {"seed": 0, "max_fevals": 200},
    }
    old = "6ebf990c37f3b1058eff8237efb790b689975ce784e89ab679ee85c2b2d80671"
    assert EvolveConfig.from_dict(data).fingerprint() == old
    explicit = {**data, "genome": {**data["genome"], "scales": "per_slot", "donor": None}}
    assert EvolveConfig.from_dict(explicit).fingerprint() == old
    for change in ({"scales": "per_transition"}, {"donor": "gene"}):
        changed = {**data, "genome": {**data["genome"], **change}}
        assert EvolveConfig.from_dict(changed).fingerprint() != old


def test_a_path_through_w_and_a_donor_gene_gives_the_logits_of_the_written_recipe(trio, tmp_path):
    """Per-transition scales and a donor picked by its gene: the path model (shared layers,
    the donor's module) == the recipe ``splice merge`` writes (scales folded)."""
    from splice.evolve.dataflow import PathModels
    from splice.merge import MergeOptions, run
    from splice.resident import ResidentCheckpoint

    f1, f2 = str(trio["ft1"]), str(trio["ft2"])
    g = DataFlowGenome(spec(trio, scales="per_transition", donor="gene"), layers=(4, 4))
    x = g.start()
    x[[4 + 1, 8 + 3, 12 + 0]] = 0.8  # ft2.1, ft1.3 (second pass), ft2.0 (second pass)
    x[16:-2] = np.random.default_rng(0).uniform(0.1, 0.9, g.num_scales)
    x[-2:] = [0.3, 0.7]  # ft2's embeddings, final norm and head
    recipe = g.recipe(x)
    steps = recipe["layer_path"]
    assert recipe["base_model"] == f2 and len(steps) == 7
    assert len({s["scale"] for s in steps}) == 7  # seven transitions, seven scales
    opts = MergeOptions(show_progress=False)
    sources = {r: ResidentCheckpoint(r) for r in (f1, f2)}
    paths = PathModels(sources, g.donor, opts, "float32")
    with pytest.raises(SpliceError, match="no fixed donor"):
        paths.build(steps)
    module = paths.build(steps, donor=recipe["base_model"])
    assert module is paths.modules[f2]
    written = run(recipe, tmp_path / "w", opts)
    for m in paths.modules.values():  # see the per-slot test: RMSNorm's eps, not the fold
        for sub in m.modules():
            if hasattr(sub, "variance_epsilon"):
                sub.variance_epsilon = 1e-12
    ours, theirs = logits(module), logits(written, rms_norm_eps=1e-12)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    # another donor on the same path models: ft1's own layers under ft1 are ft1
    plain = paths.build([{"model": f1, "layer": i, "scale": 1.0} for i in range(4)], donor=f1)
    assert plain is paths.modules[f1]
    assert torch.allclose(logits(plain), logits(trio["ft1"], rms_norm_eps=1e-12), atol=1e-6)


def test_dataflow_needs_one_family_and_hidden_size(trio, tmp_path):
    """Layers of a model of another hidden size or family cannot share the stream: refused
    before any candidate, whichever donor."""
    from conftest import make_tiny

    from splice.evolve.genome import build_genome, check_genome
    from splice.merge import MergeOptions
    from splice.problems import open_models

    wide = str(make_tiny(tmp_path / "wide", "llama", hidden=48))
    qwen = str(make_tiny(tmp_path / "qwen", "qwen2"))
    f1 = str(trio["ft1"])
    for other, problem in ((wide, "has hidden size 48"), (qwen, "architecture mismatch")):
        for donor in (None, "gene"):
            data = {
                "genome": {"models": [f1, other], "space": "dataflow", "repeats": 1},
                "tasks": ["tiny_mc"],
            }
            data["genome"]["donor"] = donor
            config = EvolveConfig.from_dict(data)
            models = open_models(config.source_models())
            genome = build_genome(config, models)
            with pytest.raises(SpliceError, match=problem):
                check_genome(genome, models, MergeOptions(show_progress=False), genome.start())


def test_the_w_example_config_validates():
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "evolve" / "zoo_dfs_w.yml"
    cfg = EvolveConfig.from_yaml(path)
    g = cfg.genome
    assert (g.space, g.scales, g.donor, g.repeats) == ("dataflow", "per_transition", "gene", 2)
    assert cfg.report_split() == ["zoo_math_lang"] and cfg.split_warnings() == []
