"""Scratch folders in TMPDIR: removed on every exit the process sees, and a SIGKILLed
process's removed by the next run (its pid is in the name)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from splice.scratch import clean_scratch, scratch_dir, scratch_folder

DEAD = 2**22 + 4321  # above the default pid_max: no such process


def test_stale_folders_of_dead_processes_go_and_nothing_else(tmp_path, capsys):
    stale = [tmp_path / f"splice-compare-{DEAD}-x1", tmp_path / f"splice-evolve-tasks-{DEAD}-x2"]
    for f in stale:
        (f / "sub").mkdir(parents=True)
        (f / "sub" / "a.states").write_bytes(b"0" * 100)
    live = tmp_path / f"splice-compare-{os.getppid()}-x3"  # a running process's
    mine = tmp_path / f"splice-compare-{os.getpid()}-x4"
    other = tmp_path / f"notsplice-compare-{DEAD}-x5"
    for f in (live, mine, other):
        f.mkdir()
    with scratch_dir("compare", tmp_path) as folder:
        assert folder.name.startswith(f"splice-compare-{os.getpid()}-") and folder.is_dir()
        assert not any(f.exists() for f in stale)
        assert live.exists() and mine.exists() and other.exists()
    assert not folder.exists()
    assert capsys.readouterr().err.count("which is gone") == 2
    assert clean_scratch(tmp_path) == []


def test_a_folder_is_removed_on_error_and_when_dropped(tmp_path):
    try:
        with scratch_dir("collapse", tmp_path) as folder:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert not folder.exists()
    held = scratch_folder("collapse", tmp_path)
    path = Path(held.name)
    assert path.is_dir()
    del held
    assert not path.exists()


def test_a_sigkilled_process_leaves_a_folder_that_the_next_run_removes(tmp_path):
    code = (
        "import sys, time\n"
        "from splice.scratch import scratch_dir\n"
        f"with scratch_dir('compare', {str(tmp_path)!r}) as f:\n"
        "    print(f, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    folder = Path(proc.stdout.readline().strip())
    assert folder.is_dir()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.1)
    assert folder.is_dir()  # nothing ran on SIGKILL
    assert clean_scratch(tmp_path) == [folder] and not folder.exists()
