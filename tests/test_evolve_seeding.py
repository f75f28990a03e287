"""Grid seeding and restarts: generation 0 is the start and a grid of the genome's own space,
CMA-ES starts from its best point, restarts on stagnation (ipop / bipop), and every one of these
runs resumes and extends to the uninterrupted result. Runs begun before these keys existed keep
the behaviour they had."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from evolve_helpers import config_dict, write_tasks

from splice.evolve import EvolveConfig, evolve, resume
from splice.evolve.config import LATER_KEYS, GenomeSpec
from splice.evolve.genome import ParameterGenome
from splice.evolve.search import load_state

pytest.importorskip("cma")
pytest.importorskip("lm_eval")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("evolve_seed_tasks"), items=8)


def seeded(trio, tasks, **search):
    return EvolveConfig.from_dict(
        config_dict(trio, tasks, **{"grid": True, "restarts": "ipop", "patience": 1, **search})
    )


def comparable(run: Path) -> list[tuple]:
    state = load_state(run)
    return [(r["generation"], r["genes"], r["fitness"], r.get("grid")) for r in state["records"]]


def test_the_grid_covers_the_obvious_points_of_the_space():
    spec = GenomeSpec(models=["a", "b"], merge_method="ties", base_model="c", layer_granularity=2)
    g = ParameterGenome(spec, 4)
    points = dict(g.grid())
    # weights {0.5, 1} per model x densities {0.5, 0.7, 1}; ties normalizes the weights, so
    # 1/1 is 0.5/0.5 and left out
    assert len(points) == 9 and "ties a 0.5 b 0.5 density 0.7" in points
    unnormalized = ParameterGenome(spec.model_copy(update={"normalize": False}), 4)
    assert len(unnormalized.grid()) == 12
    v = g.values(points["ties a 1 b 0.5 density 0.7"])  # [groups, models, sets, genes]
    assert np.allclose(v[:, 0, :, 0], 1.0) and np.allclose(v[:, 1, :, 0], 0.5)
    assert np.allclose(v[..., 1], 0.7)
    # ranges map values onto genes; values outside a range are clipped, duplicates dropped
    ta = GenomeSpec(
        models=["a", "b"], merge_method="task_arithmetic", base_model="c", ranges={"weight": (0, 2)}
    )
    pts = ParameterGenome(ta, 4).grid()
    assert len(pts) == 9 and np.allclose(pts[-1][1], 0.5)  # weight 1.0 is gene 0.5
    narrow = GenomeSpec(
        models=["a", "b"],
        merge_method="task_arithmetic",
        base_model="c",
        ranges={"weight": (0, 0.5)},
    )
    assert len(ParameterGenome(narrow, 4).grid()) == 1  # every weight clipped to 0.5


def test_generation_0_is_the_grid_and_cma_starts_from_its_best(trio, tasks, tmp_path):
    from splice.evolve.search import grid_points, strategy_of

    cfg = seeded(trio, tasks, generations=2, restarts="none")
    result = evolve(cfg, tmp_path / "run")
    state = load_state(result.run)
    config = EvolveConfig.from_yaml(result.run / "config.yml")
    genome = ParameterGenome(config.genome, 4, config.dtype, config.search.seed)
    grid = grid_points(config, genome)
    gen0 = [r for r in state["records"] if r["generation"] == 0]
    assert [r["grid"] for r in gen0] == [label for label, _ in grid]
    assert [r["genes"] for r in gen0] == [list(x) for _, x in grid]
    assert gen0[0]["grid"] == "start" and all(r["error"] is None for r in gen0)
    best0 = max(gen0, key=lambda r: r["fitness"])
    assert result.best_fitness >= best0["fitness"]  # the search never ends below its grid
    one_gen = {**state, "generation": 1, "records": gen0, "history": state["history"][:1]}
    search = strategy_of(result.run, config, genome, one_gen)
    es = search.strategy.es  # its mean in pycma's coordinates inside the bounds' transform
    assert np.allclose(es.boundary_handler.transform(es.mean), best0["genes"])
    assert not any("grid" in r for r in state["records"] if r["generation"] == 1)
    # the report says where the winner stands against the grid, on both splits
    from splice.evolve import format_report, report
    from splice.evolve.report import grid_standing, report_table

    text = format_report(report(result.run))
    assert f"seeded grid (generation 0, {len(grid)} points): best {best0['grid']}" in text
    table = report_table(result.run, ["tiny_mc"])
    rows = [k for k in table if k.startswith("grid: ")]
    assert len(rows) == len(grid) - 1  # the start is the "ties (start)" row already
    (line,) = grid_standing(table)
    won = table["winner"]["tiny_mc"]
    points = [table[k]["tiny_mc"] for k in [*rows, "ties (start)"]]
    assert line.startswith(f"tiny_mc: the winner {won:.4f}, above {sum(p < won for p in points)} ")


@pytest.mark.parametrize("restarts", ["ipop", "bipop"])
def test_restarts_resume_and_extend_to_the_uninterrupted_run(trio, tasks, tmp_path, restarts):
    full = evolve(seeded(trio, tasks, generations=7, restarts=restarts), tmp_path / "full")
    hist = load_state(full.run)["history"]
    assert max(h["restart"] for h in hist) >= 2  # patience 1: it restarted
    pops = [h["popsize"] for h in hist]
    assert pops[0] == 9 and pops[1] == 4  # the grid (ties: 9 points), then CMA-ES's population
    if restarts == "ipop":
        assert 8 in pops and 16 in pops  # doubled at each restart
    short = evolve(seeded(trio, tasks, generations=3, restarts=restarts), tmp_path / "short")
    assert short.done
    resume(short.run, generations=7)
    assert comparable(short.run) == comparable(full.run)


def test_fevals_budget_stops_a_run_whose_population_grew(trio, tasks, tmp_path):
    cfg = seeded(trio, tasks, generations=None, max_fevals=40)
    result = evolve(cfg, tmp_path / "run")
    assert result.done and 40 <= result.evaluations < 40 + 16
    state = load_state(result.run)
    assert state["stop"].endswith("(max_fevals 40)") or state["stop"].endswith("generations done")


def test_a_run_begun_before_grid_and_restarts_keeps_its_behaviour(trio, tasks, tmp_path):
    """A run folder whose config has no grid / restarts keys (an older splice's) resumes and
    extends with neither, and its fingerprint is the one the older splice computed."""
    data = config_dict(trio, tasks, generations=2)
    result = evolve(EvolveConfig.from_dict(data), tmp_path / "run")  # grid false, restarts none
    run = result.run
    old = {k: v for k, v in data.items()}
    old["search"] = {k: v for k, v in data["search"].items() if k not in ("grid", "restarts")}
    stored = EvolveConfig.from_dict(old).model_dump(mode="json")
    for section, key in LATER_KEYS:  # an older splice had none of them
        stored[section].pop(key)
    text = json.dumps(stored, sort_keys=True, separators=(",", ":"))
    fingerprint = hashlib.sha256(text.encode()).hexdigest()  # what the older splice wrote
    assert EvolveConfig.from_dict(stored).fingerprint() == fingerprint
    state = json.loads((run / "state.json").read_text())
    state.update(config=stored, fingerprint=fingerprint)
    (run / "state.json").write_text(json.dumps(state))
    (run / "config.yml").write_text(yaml.safe_dump(stored, sort_keys=False))
    again = resume(run, generations=4)
    assert again.done and again.generation == 4
    assert not any("grid" in r for r in load_state(run)["records"])
    # the same old config given to evolve again is this run, not another configuration
    old["search"]["generations"] = 4
    assert evolve(EvolveConfig.from_dict(old), run).evaluations == again.evaluations
    # a fingerprint from another rule (a key's default changed) is the same configuration
    state = json.loads((run / "state.json").read_text())
    state["fingerprint"] = "0" * 64
    (run / "state.json").write_text(json.dumps(state))
    assert evolve(EvolveConfig.from_dict(old), run).evaluations == again.evaluations
