"""splice.evolve's configuration and genome: mergekit-evolve files with their meaning, genes
decoded into recipes that plan, bad input as one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from evolve_helpers import config_dict, write_tasks

from splice.errors import SpliceError
from splice.evolve import EvolveConfig, ParameterGenome, default_popsize
from splice.evolve.config import GenomeSpec

MERGEKIT_DOC = """\
genome:
    models:
      - {ft1}
      - {ft2}
    merge_method: dare_ties
    base_model: {base}
    layer_granularity: 2
    normalize: false
    allow_negative_weights: false
    smooth: false
    filters:
      - self_attn
      - mlp
tasks:
  - name: tiny_mc
    weight: 1.0
    metric: "acc,none"
  - tiny_ll
limit: 8
num_fewshot: 0
shuffle: true
random_init: false
"""


def mergekit_config(trio, tmp_path):
    path = tmp_path / "mk.yml"
    path.write_text(MERGEKIT_DOC.format(**{k: str(v) for k, v in trio.items()}))
    return EvolveConfig.from_yaml(path)


def test_mergekit_evolve_file_runs_unchanged_with_its_meaning(trio, tmp_path):
    cfg = mergekit_config(trio, tmp_path)
    assert cfg.lm_eval.limit == 8 and cfg.lm_eval.num_fewshot == 0 and cfg.lm_eval.shuffle
    assert cfg.search.start == "mergekit"  # no search section: mergekit-evolve's start
    assert [t.name for t in cfg.tasks] == ["tiny_mc", "tiny_ll"]
    assert cfg.tasks[1].metric_key == "acc,none"
    g = ParameterGenome(cfg.genome, num_layers=4)
    assert g.shape == (2, 2, 3, 2)  # groups, models, filter sets (+ rest), (weight, density)
    x0 = g.start("mergekit")
    v = g.values(x0)
    assert np.allclose(v[..., 0], 0.5) and np.allclose(v[..., 1], 1.0)  # 1/n and density 1
    recipe = g.recipe(x0)
    assert recipe["parameters"] == {"normalize": False}
    assert len(recipe["slices"]) == 2
    src = recipe["slices"][1]["sources"]
    assert [s["layer_range"] for s in src] == [[2, 4]] * 3  # + the base, as mergekit
    assert src[0]["parameters"]["weight"] == [
        {"filter": "self_attn", "value": 0.5},
        {"filter": "mlp", "value": 0.5},
        {"value": 0.5},
    ]
    assert recipe["seed"] == 0  # DARE masks are the same for the same genes


def test_mergekit_normalize_default_and_negative_weights():
    spec = GenomeSpec(models=["a", "b"], merge_method="ties", base_model="c")
    assert spec.normalize_flag() is True
    spec = GenomeSpec(models=["a"], merge_method="task_arithmetic", base_model="c")
    assert spec.normalize_flag() is False
    neg = GenomeSpec(
        models=["a"], merge_method="task_arithmetic", base_model="c", allow_negative_weights=True
    )
    g = ParameterGenome(neg, num_layers=4)
    assert np.allclose(g.values(np.array([0.0, 0.5, 1.0])[:1]), -1.0)
    assert g.values(np.array([0.75]))[0, 0, 0, 0] == pytest.approx(0.5)


def test_genes_decode_linearly_and_smooth_gives_gradients():
    spec = GenomeSpec(
        models=["a", "b"], merge_method="ties", base_model="c", layer_granularity=1, smooth=True
    )
    g = ParameterGenome(spec, num_layers=4)
    assert g.dim == 4 * 2 * 1 * 2 and len(g.names()) == g.dim
    x = np.linspace(0, 1, g.dim)
    recipe = g.recipe(x)
    assert "slices" not in recipe
    weights = recipe["models"][0]["parameters"]["weight"]
    assert len(weights) == 4  # one value per layer group: a gradient over the layers
    assert weights == [round(float(v), 8) for v in x.reshape(g.shape)[:, 0, 0, 0]]


def test_slerp_takes_the_two_best_scored_models_as_mergekit():
    spec = GenomeSpec(models=["a", "b", "c"], merge_method="slerp")
    g = ParameterGenome(spec, num_layers=2)
    recipe = g.recipe(np.array([0.2, 0.9, 0.6]))
    (sl,) = recipe["slices"]
    assert sl["base_model"] == "b" and [s["model"] for s in sl["sources"]] == ["b", "c"]
    assert sl["parameters"]["t"] == pytest.approx(1 / (1 + math.exp(0.9 - 0.6)))


def test_default_popsize_and_della_range():
    assert default_popsize(8) == 4 + math.floor(3 * math.log(8)) == 10
    spec = GenomeSpec(
        models=["a"], merge_method="della", base_model="b", parameters={"epsilon": 0.1}
    )
    assert spec.range_of("density") == (0.11, 0.89)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": []}, "config: tasks: must not be empty"),
        ({"genome": {"models": ["a"], "merge_method": "nearswap"}}, "cannot be evolved"),
        ({"genome": {"models": ["a"], "merge_method": "ties"}}, "needs a base_model"),
        ({"search": {"start": 2.0}}, "must be in [0, 1]"),
        ({"limit": 3, "lm_eval": {"limit": 4}}, "limit is given twice"),
        ({"tasks": [{"name": "x", "weight": 0}]}, "weight 0"),
        ({"genomes": {}}, "genomes: unknown key"),
    ],
)
def test_bad_config_is_one_line(trio, tmp_path, change, message):
    data = {**config_dict(trio, tmp_path), **change}
    with pytest.raises(SpliceError) as e:
        EvolveConfig.from_dict(data)
    assert message in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_fingerprint_and_differences(trio, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    a = EvolveConfig.from_dict(config_dict(trio, tasks))
    b = EvolveConfig.from_dict(config_dict(trio, tasks, popsize=6))
    assert a.fingerprint() == EvolveConfig.from_dict(yaml.safe_load(a.to_yaml())).fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert a.differences(b) == ["search.popsize"]
    c = a.with_overrides(max_fevals=12)
    assert c.search.max_fevals == 12 and c.search.generations is None


def test_every_method_plans_at_the_corners(trio):
    """Each method's genome decodes, at its start and its bounds, to a recipe the planner
    accepts against the real models."""
    from splice.evolve.genome import check_genome
    from splice.merge import MergeOptions
    from splice.problems import open_models

    models = open_models([str(trio[n]) for n in ("base", "ft1", "ft2")])
    for method in (
        "ties",
        "dare_ties",
        "task_arithmetic",
        "linear",
        "slerp",
        "della",
        "breadcrumbs",
    ):
        filters = None if method == "slerp" else ["self_attn", "mlp"]
        spec = GenomeSpec(
            models=[str(trio["ft1"]), str(trio["ft2"])],
            merge_method=method,
            base_model=str(trio["base"]),
            layer_granularity=2,
            filters=filters,
        )
        g = ParameterGenome(spec, num_layers=4)
        check_genome(g, models, MergeOptions(show_progress=False), g.start(0.5))


def test_bounds_that_decode_to_an_invalid_recipe_are_refused(trio):
    from splice.evolve.genome import check_genome
    from splice.merge import MergeOptions
    from splice.problems import open_models

    models = open_models([str(trio[n]) for n in ("base", "ft1", "ft2")])
    spec = GenomeSpec(
        models=[str(trio["ft1"]), str(trio["ft2"])],
        merge_method="della",
        base_model=str(trio["base"]),
        ranges={"density": (0.0, 0.95)},  # density 0.95 ± epsilon 0.15 leaves (0, 1)
    )
    g = ParameterGenome(spec, num_layers=4)
    with pytest.raises(SpliceError) as e:
        check_genome(g, models, MergeOptions(show_progress=False))
    assert "genome: every gene at 1 decodes to a recipe that cannot run" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_zoo_fitness_and_report_splits_by_name():
    """zoo v2's names: a fitness task X_fit reports on X; fitting a report split warns."""
    base = {"genome": {"models": ["a"], "merge_method": "linear"}}
    cfg = EvolveConfig.from_dict({**base, "tasks": ["zoo_math_fit", "zoo_lang_fit"]})
    assert cfg.report_split() == ["zoo_math", "zoo_lang"] and cfg.split_warnings() == []
    cfg = EvolveConfig.from_dict({**base, "tasks": ["zoo_math_lang"]})
    assert cfg.split_warnings() == [
        "task zoo_math_lang is a zoo report split; search on zoo_math_lang_fit and report on "
        "zoo_math_lang"
    ]
    cfg = EvolveConfig.from_dict({**base, "tasks": ["t"], "report_tasks": ["t"]})
    assert "both a fitness and a report task" in cfg.split_warnings()[0]


@pytest.mark.parametrize("name", ["zoo_ps.yml", "zoo_dfs.yml", "mergekit_evolve.yml"])
def test_example_configs_validate(name):
    """The examples (zoo v2) are valid configs (nothing is loaded)."""
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "evolve" / name
    cfg = EvolveConfig.from_yaml(path)
    assert cfg.report_split() == ["zoo_math_lang"] and cfg.split_warnings() == []
