"""Extending an evolve run: a larger budget continues a run, finished or interrupted, to the
result of the uninterrupted run with that budget (same CMA-ES samples, scores, best)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from evolve_helpers import config_dict, write_config, write_tasks

from splice.cli import main
from splice.errors import SpliceError
from splice.evolve import EvolveConfig, evolve, format_report, report, resume
from splice.evolve.search import load_state

pytest.importorskip("cma")
pytest.importorskip("lm_eval")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("evolve_extend_tasks"))


@pytest.fixture(scope="module")
def reference(trio, tasks, tmp_path_factory) -> Path:
    """An uninterrupted run of 4 generations."""
    run = tmp_path_factory.mktemp("evolve_extend") / "run"
    evolve(EvolveConfig.from_dict(config_dict(trio, tasks, generations=4)), run)
    return run


def comparable(run: Path) -> dict[str, Any]:
    """The run's state less its timings."""
    state = load_state(run)
    records = [
        {k: v for k, v in r.items() if k not in ("merge_s", "eval_s")} for r in state["records"]
    ]
    history = [
        {k: v for k, v in h.items() if k not in ("seconds", "per_minute")} for h in state["history"]
    ]
    return {**state, "records": records, "history": history}


def one_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_a_finished_run_extended_is_the_uninterrupted_run(capsys, trio, tasks, tmp_path, reference):
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=2))
    run = tmp_path / "run"
    assert main(["evolve", str(cfg), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evolve", "resume", str(run), "--generations", "4", "--no-progress"]) == 0
    assert "4/4 generations, 16 candidates" in capsys.readouterr().out
    # config, fingerprint, every candidate's genes, scores and fitness, history, stop
    assert comparable(run) == comparable(reference)
    assert (run / "best.yml").read_text() == (reference / "best.yml").read_text()
    assert yaml.safe_load((run / "config.yml").read_text())["search"]["generations"] == 4
    assert "generation 4/4" in format_report(report(run))

    # a budget not more than spent: one line, exit code 2, the run untouched
    before = (run / "state.json").read_bytes(), (run / "config.yml").read_bytes()
    for budget in (["--generations", "4"], ["--generations", "1"], ["--max-fevals", "16"]):
        assert "is not more" in one_error(capsys, ["evolve", "resume", str(run), *budget])
    both = ["--generations", "5", "--max-fevals", "20"]
    assert "not both" in one_error(capsys, ["evolve", "resume", str(run), *both])
    assert ((run / "state.json").read_bytes(), (run / "config.yml").read_bytes()) == before

    # --max-fevals: 18 candidates are 5 whole generations of 4
    assert main(["evolve", "resume", str(run), "--max-fevals", "18", "--no-progress"]) == 0
    state = load_state(run)
    assert state["generation"] == state["generations"] == 5 and len(state["records"]) == 20
    assert comparable(run)["records"][:16] == comparable(reference)["records"]
    search = yaml.safe_load((run / "config.yml").read_text())["search"]
    assert search["max_fevals"] == 18 and search["generations"] is None
    assert state["config"]["search"] == search


def test_an_interrupted_run_rerun_with_a_larger_budget(trio, tasks, tmp_path, reference):
    """Interrupted after 1 of 3 generations; `evolve` again with 4 is the 4-generation run."""

    def interrupt(history: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        evolve(
            EvolveConfig.from_dict(config_dict(trio, tasks, generations=3)),
            run,
            on_generation=interrupt,
        )
    assert load_state(run)["generation"] == 1
    result = evolve(EvolveConfig.from_dict(config_dict(trio, tasks, generations=4)), run)
    assert result.done and result.generation == 4
    assert comparable(run) == comparable(reference)


def test_a_run_cma_es_stopped_is_not_extended(tmp_path, reference):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = json.loads((run / "state.json").read_text())
    state["stop"] = "cma: tolfun"
    (run / "state.json").write_text(json.dumps(state))
    with pytest.raises(SpliceError, match=r"CMA-ES stopped this search itself after generation 4"):
        resume(run, generations=8)
