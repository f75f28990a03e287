"""examples/evolve_zoo.py's helpers: task configs for the zoo's fitness splits, the fitness
(and its fallback on a zoo without fitness splits), the naive grid. Nothing is trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import evolve_zoo

ROW = {"prompt": "a b", "choices": ["1", "2", "3", "4"], "gold": 0, "answer": "1"}


def fake_zoo(root: Path, fit: bool) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    names = ["zoo_math", "zoo_lang", "zoo_math_lang"]
    for n in names + ([f"{n}_fit" for n in names] if fit else []):
        (tasks / f"{n}.jsonl").write_text(json.dumps(ROW) + "\n")
        # a zoo built elsewhere names a folder that is gone
        (tasks / f"{n}.yaml").write_text(f"task: {n}\ndataset_kwargs: {{data_files: /gone}}\n")
    return root


def test_fit_splits_get_configs_naming_this_zoo(tmp_path):
    zoo = fake_zoo(tmp_path / "zoo", fit=True)
    folder, have = evolve_zoo.zoo_tasks(zoo, tmp_path / "cfg")
    assert {"zoo_math_lang_fit", "zoo_math_fit", "zoo_lang_fit", "zoo_math_lang"} <= have
    if folder is None:  # splice.zoo writes the fitness splits' configs itself (zoo v2's code)
        from splice.zoo.tasks import write_tasks

        (tmp_path / "zoo-cfg").mkdir()
        folder = write_tasks(tmp_path / "zoo-cfg", zoo / "tasks")
    else:
        written = sorted(p.stem for p in folder.glob("*.yaml"))
        assert written == ["zoo_lang_fit", "zoo_math_fit", "zoo_math_lang_fit"]
    cfg = yaml.safe_load((folder / "zoo_math_fit.yaml").read_text())
    assert cfg["task"] == "zoo_math_fit"
    assert cfg["doc_to_text"] == "{{prompt}}"
    assert (
        Path(cfg["dataset_kwargs"]["data_files"]["test"])
        == (zoo / "tasks" / "zoo_math_fit.jsonl").resolve()
    )
    tasks, note = evolve_zoo.fitness_tasks(have, 0.0)
    assert note is None
    assert tasks == [{"name": "zoo_math_lang_fit", "weight": 1.0, "metric": "acc,none"}]
    tasks, _ = evolve_zoo.fitness_tasks(have, 0.25)
    assert [(t["name"], t["weight"]) for t in tasks] == [
        ("zoo_math_lang_fit", 1.0),
        ("zoo_math_fit", 0.25),
        ("zoo_lang_fit", 0.25),
    ]


def test_v1_zoo_falls_back_to_report_names_with_a_note(tmp_path):
    zoo = fake_zoo(tmp_path / "zoo", fit=False)
    folder, have = evolve_zoo.zoo_tasks(zoo, tmp_path / "cfg")
    # splice.zoo of v1 writes the report configs itself; v2's refuses a v1 zoo: written here
    assert folder is None or sorted(p.stem for p in folder.glob("*.yaml")) == [
        "zoo_lang",
        "zoo_math",
        "zoo_math_lang",
    ]
    tasks, note = evolve_zoo.fitness_tasks(have, 0.0)
    assert note and "no *_fit splits" in note
    assert [t["name"] for t in tasks] == ["zoo_math_lang"]


def test_grid_and_configs_validate(tmp_path):
    pytest.importorskip("cma")
    from splice.evolve import EvolveConfig

    zoo = tmp_path / "zoo"
    grid = evolve_zoo.naive_grid(zoo)
    assert len(grid) == 11 and "ties 1.0/1.0" in grid and "task_arithmetic 0.8/0.5" in grid
    args = evolve_zoo.parser().parse_args([])
    common = {"tasks": ["zoo_math_lang_fit"], "zoo": str(zoo)}
    ps = EvolveConfig.from_dict(evolve_zoo.ps_config(zoo, common, args))
    assert ps.genome.merge_method == "task_arithmetic" and ps.genome.layer_granularity == 2
    assert ps.genome.range_of("weight") == (0.0, 2.0)
    dfs = evolve_zoo.dfs_config([str(zoo / "math"), str(zoo / "lang")], common, 10, args)
    assert EvolveConfig.from_dict(dfs).genome.space == "dataflow"
