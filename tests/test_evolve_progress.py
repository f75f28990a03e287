"""What a search shows while it runs and when it is stopped: a bar on a terminal, plain lines
elsewhere, and after SIGTERM the saved generation and the command that continues the run; the
report's generation column and the plot's ticks are integers."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch
from evolve_helpers import config_dict, write_config, write_tasks

from splice.cli import main
from splice.evolve import EvolveConfig, evolve, format_report, plot_history, report
from splice.evolve.search import generation_line, load_state

pytest.importorskip("cma")
pytest.importorskip("lm_eval")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("evolve_progress_tasks"))


def test_generation_line():
    h = {"generation": 2, "best_so_far": 0.7123, "mean": 0.6551, "evaluations": 12, "failed": 0}
    line = "generation 3/10: best 0.7123, mean 0.6551, 12 candidates, 41 s"
    assert generation_line(h, 10, 41.2) == line
    h["failed"] = 1
    assert generation_line(h, 10, 3725) == line.replace(
        "candidates, 41 s", "candidates (1 failed), 1 h 02 min"
    )


def test_one_plain_line_per_generation_when_stderr_is_not_a_terminal(capsys, trio, tasks, tmp_path):
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=2))
    capsys.readouterr()
    assert main(["evolve", str(cfg), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("generation ")]
    number = r"-?\d[\d.e+-]*"
    for k, line in enumerate(lines, 1):
        pattern = rf"generation {k}/2: best {number}, mean {number}, {4 * k} candidates, \d+ s"
        assert re.fullmatch(pattern, line), line
    assert len(lines) == 2


def test_sigterm_names_the_saved_generation_and_the_resume_command(
    capsys, monkeypatch, trio, tasks, tmp_path
):
    """SIGTERM (to this process, through splice.cli's handler) as the third generation starts."""
    from splice.evolve import search

    real, calls = search._generation, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "_generation", signalled)
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=3))
    run = tmp_path / "my run"
    capsys.readouterr()
    assert main(["evolve", str(cfg), "--out", str(run), "--no-progress"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"splice: stopped by SIGTERM after generation 2/3 (saved in {run}); continue with: "
        f"splice evolve resume '{run}'"
    )
    assert load_state(run)["generation"] == 2
    monkeypatch.undo()
    assert main(["evolve", "resume", str(run), "--no-progress"]) == 0
    assert "3/3 generations" in capsys.readouterr().out


def test_report_generation_column_and_plot_ticks_are_integers(trio, tasks, tmp_path):
    result = evolve(
        EvolveConfig.from_dict(config_dict(trio, tasks, generations=2)), tmp_path / "run"
    )
    rep = report(result.run, top=8)
    rows = format_report(rep).split("best candidates:\n")[1].splitlines()
    assert rows[0].split()[:4] == ["rank", "gen", "cand", "fitness"]
    cells = [row.split()[1:3] for row in rows[1:9]]
    assert cells == [[str(r["generation"]), str(r["index"])] for r in rep.top]
    assert {r["generation"] for r in rep.top} == {0, 1}
    ticks = plot_history(result.history).axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)
