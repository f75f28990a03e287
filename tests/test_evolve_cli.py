"""``splice evolve``: bad input is one line and exit code 2; run, report and resume verbs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from evolve_helpers import config_dict, write_config, write_tasks

from splice.cli import main

pytest.importorskip("cma")
pytest.importorskip("lm_eval")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("evolve_cli_tasks"))


def one_error(capsys, argv) -> str:
    """Run ``splice ARGV``; it must fail with exit code 2 and one line on stderr."""
    capsys.readouterr()  # what fixtures printed
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("splice: error: ")
    return err[0]


def test_empty_task_list(capsys, trio, tasks, tmp_path):
    cfg = write_config(tmp_path / "c.yml", {**config_dict(trio, tasks), "tasks": []})
    assert "tasks: must not be empty" in one_error(
        capsys, ["evolve", str(cfg), "--out", str(tmp_path / "r")]
    )


def test_unknown_task(capsys, trio, tasks, tmp_path):
    data = config_dict(trio, tasks)
    data["tasks"] = [{"name": "tiny_nope"}]
    cfg = write_config(tmp_path / "c.yml", data)
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "r")])
    assert "unknown task tiny_nope" in line
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_unknown_metric(capsys, trio, tasks, tmp_path):
    data = config_dict(trio, tasks)
    data["tasks"] = [{"name": "tiny_mc", "metric": "f1"}]
    cfg = write_config(tmp_path / "c.yml", data)
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "r")])
    assert "task tiny_mc has no metric f1 (it computes acc)" in line


def test_genome_whose_bounds_decode_to_an_invalid_recipe(capsys, trio, tasks, tmp_path):
    data = config_dict(trio, tasks)
    data["genome"] = {
        **data["genome"],
        "merge_method": "della",
        "ranges": {"density": [0.05, 0.5]},  # 0.05 - epsilon 0.15 < 0
    }
    cfg = write_config(tmp_path / "c.yml", data)
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "r")])
    assert "genome: genes at 0 decodes to a recipe that cannot run" in line
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_sources_of_different_architectures(capsys, trio, tasks, tmp_path):
    other = make_tiny(tmp_path / "mistral", "mistral", layers=4)
    data = config_dict(trio, tasks)
    data["genome"]["models"] = [str(trio["ft1"]), str(other)]
    cfg = write_config(tmp_path / "c.yml", data)
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "r")])
    assert "architecture mismatch" in line


def test_cuda_without_cuda(capsys, trio, tasks, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks))
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "r"), "--device", "cuda"])
    assert "no CUDA device" in line


def test_run_report_and_a_resume_folder_of_another_config(capsys, trio, tasks, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=2))
    assert main(["evolve", str(cfg), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2/2 generations, 8 candidates" in out
    assert main(["evolve", "report", str(run)]) == 0
    text = capsys.readouterr().out
    assert "best candidates:" in text and "merge_method: ties" in text
    assert (run / "fitness.png").is_file()
    assert main(["evolve", "report", str(run), "--table", "--tasks", "tiny_mc"]) == 0
    printed = capsys.readouterr()
    assert "splice: warning: report task tiny_mc is also a fitness task" in printed.err
    table = printed.out.split("report split:")[1].splitlines()
    labels = [line.split("  ")[0].strip() for line in table[2:]]
    assert labels == ["base", "ft1", "ft2", "linear (equal weights)", "ties (start)", "winner"]
    # another configuration for this folder is refused; a larger budget extends the run
    other = write_config(tmp_path / "o.yml", config_dict(trio, tasks, generations=3, seed=2))
    line = one_error(capsys, ["evolve", str(other), "--out", str(run)])
    assert "another configuration" in line and "search.seed" in line
    assert main(["evolve", str(cfg), "--out", str(run), "--max-fevals", "12"]) == 0
    assert "3/3 generations, 12 candidates" in capsys.readouterr().out
    # a finished run resumes to itself
    assert main(["evolve", "resume", str(run)]) == 0
    assert "3/3 generations" in capsys.readouterr().out
    line = one_error(capsys, ["evolve", "resume", str(tmp_path)])
    assert "not an evolve run folder" in line
    line = one_error(capsys, ["evolve", "resume", str(run), "--max-fevals", "3"])
    assert "12 candidates scored already; a budget of max_fevals 3 is not more" in line
    line = one_error(capsys, ["evolve", "resume", str(run), "--device", "cpu"])
    assert "--device does not apply" in line


def test_a_mergekit_evolve_file_runs_unchanged(capsys, trio, tasks, tmp_path):
    """mergekit-evolve's documented layout (dare_ties, filters, top-level limit / num_fewshot /
    shuffle), only the paths pointed at the tiny models; its tasks found with --tasks-dir."""
    from test_evolve_config import MERGEKIT_DOC

    from splice.evolve.search import load_state

    cfg = tmp_path / "mergekit.yml"
    cfg.write_text(MERGEKIT_DOC.format(**{k: str(v) for k, v in trio.items()}))
    run = tmp_path / "run"
    argv = ["evolve", str(cfg), "--out", str(run), "--tasks-dir", str(tasks), "--max-fevals", "13"]
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    state = load_state(run)
    # generation 0: mergekit-evolve's start and the grid of its space (weights 0.5 / 1 per
    # model, densities 0.5 / 0.7 / 1: 12 points, the start among them); then CMA-ES's
    # popsize 4 + floor(3 ln 24) = 13 from the best of them
    grid = [r for r in state["records"] if r["generation"] == 0]
    assert len(grid) == 12 and grid[0]["grid"] == "start"
    assert len(state["records"]) == 12 + 13
    assert all(r["error"] is None for r in state["records"])
    assert all(len(r["scores"]) == 2 for r in state["records"])


def test_progress_bar_shows_generation_best_mean_and_rate(
    capsys, monkeypatch, trio, tasks, tmp_path
):
    """On a terminal: a bar (elsewhere, lines: test_evolve_progress.py)."""
    import sys

    from splice.evolve import evolve
    from splice.evolve.config import EvolveConfig

    cfg = EvolveConfig.from_dict(config_dict(trio, tasks, generations=2))
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream: a terminal
    evolve(cfg, tmp_path / "run", show_progress=True)
    err = capsys.readouterr().err
    assert "evolve" in err and "2/2" in err and "best " in err and "mean " in err and "/min" in err
    assert "\r" in err


def test_run_is_an_action_and_options_belong_to_theirs(capsys, trio, tasks, tmp_path):
    """`splice evolve run CONFIG --out RUN` is `splice evolve CONFIG --out RUN`; an option of
    another action is one line."""
    import json

    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=1, popsize=2))
    assert "give the config file" in one_error(capsys, ["evolve", "run", "--out", "r"])
    line = one_error(capsys, ["evolve", "run", str(cfg), "--out", str(tmp_path / "r"), "--table"])
    assert "--table is an option of report" in line
    assert "--tasks is an option of report" in one_error(
        capsys, ["evolve", str(cfg), "--out", str(tmp_path / "r"), "--tasks", "x"]
    )
    assert not (tmp_path / "r").exists()
    assert main(["evolve", "run", str(cfg), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["evolve", str(cfg), "--out", str(tmp_path / "b"), "--no-progress"]) == 0

    def genes(run):
        return [r["genes"] for r in json.loads((run / "state.json").read_text())["records"]]

    assert genes(tmp_path / "a") == genes(tmp_path / "b")
