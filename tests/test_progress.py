"""The one progress rule (splice.progress): a bar on a terminal, plain lines elsewhere (a count,
the elapsed time, at most one every ``every_s`` seconds, and a last one), never a carriage return
in a log; nothing with --no-progress."""

from __future__ import annotations

import io

from splice.cli import main
from splice.progress import Progress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal():
    log = io.StringIO()
    assert list(progress(range(4), "work", unit="step", stream=log, every_s=0)) == [0, 1, 2, 3]
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("work: 1/4 step (25%), ") and lines[-1].startswith("work: 4/4 step")
    assert len(lines) == 4 and "\r" not in log.getvalue()


def test_short_work_prints_nothing_long_work_ends_with_a_count():
    import time

    import pytest

    log = io.StringIO()
    list(progress(range(1000), "many", stream=log))  # well under 30 s: nothing in the log
    assert log.getvalue() == ""
    with Progress(3, "slow", stream=log, every_s=0.05) as p:
        p.update()  # too soon for a line
        time.sleep(0.06)
        p.update()  # a line: 2/3
        p.update()  # too soon again
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["slow: 2/3 it (67%)", "slow: 3/3 it (100%)"]
    assert lines[-1].endswith(" done")
    failed = io.StringIO()
    with pytest.raises(RuntimeError), Progress(3, "fails", stream=failed, every_s=0) as p:
        p.update()
        raise RuntimeError("the work failed")
    assert failed.getvalue().splitlines()[0].startswith("fails: 1/3")
    assert "done" not in failed.getvalue()


def test_a_bar_on_a_terminal_and_nothing_when_off():
    tty = Terminal()
    list(progress(range(3), "bar", stream=tty))
    assert "\r" in tty.getvalue() and "bar" in tty.getvalue()
    quiet = io.StringIO()
    list(progress(range(3), "off", stream=quiet, enabled=False))
    with Progress(3, "off", stream=quiet, enabled=False) as p:
        p.update(3)
        p.line("ignored")
    assert quiet.getvalue() == ""


def test_a_verb_in_a_log_prints_plain_lines(tmp_path, capsys, monkeypatch):
    """``splice prune`` with stderr not a terminal (a log): its tensor progress as plain lines
    (here one per tensor: the interval set to 0), no bar, no carriage return; ``--no-progress``
    prints none."""
    import splice.progress

    monkeypatch.setattr(splice.progress, "EVERY_S", 0.0)
    assert main(["prune", "assets/zoo/base", str(tmp_path / "p"), "--drop", "3"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "tensors: 1/" in err
    assert (
        main(["prune", "assets/zoo/base", str(tmp_path / "q"), "--drop", "3", "--no-progress"]) == 0
    )
    assert "tensors: " not in capsys.readouterr().err
