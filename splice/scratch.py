"""Scratch folders in the temporary folder (TMPDIR): named for their process, and removed by
the next run once that process is gone.

A verb that needs scratch space (analysis' spilled hidden states, collapse's per-layer
activations, lm-eval task configs) takes it with :func:`scratch_dir`, as a context manager that
removes the folder on every exit it sees (errors, Ctrl-C, SIGTERM). A SIGKILL leaves the folder
behind: its name ``splice-KIND-PID-XXXX`` says which process made it, and every later
:func:`scratch_dir` in the same parent removes those whose process no longer runs, with a note.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from splice.target import pid_alive

_SCRATCH = re.compile(r"^splice-(?P<kind>[a-z]+(?:-[a-z]+)*)-(?P<pid>\d+)-[^/]+$")


def clean_scratch(parent: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the scratch folders in ``parent`` (None: the temporary folder) whose process is
    gone; returns what was removed."""
    base = Path(parent if parent is not None else tempfile.gettempdir())
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            m = _SCRATCH.match(entry.name)
            if not m or entry.is_symlink() or not entry.is_dir() or pid_alive(int(m["pid"])):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
                print(
                    f"splice: note: removed {entry}, left by splice process {m['pid']}, "
                    "which is gone",
                    file=sys.stderr,
                    flush=True,
                )
    return removed


def scratch_folder(
    kind: str, parent: str | os.PathLike[str] | None = None
) -> tempfile.TemporaryDirectory[str]:
    """A new folder ``splice-KIND-PID-XXXX`` in ``parent`` (None: the temporary folder), as a
    ``TemporaryDirectory`` (removed by ``cleanup()``, its ``with`` block, or when it is garbage
    collected); stale ones of dead processes are removed first."""
    clean_scratch(parent)
    return tempfile.TemporaryDirectory(
        prefix=f"splice-{kind}-{os.getpid()}-", dir=parent, ignore_cleanup_errors=True
    )


@contextlib.contextmanager
def scratch_dir(kind: str, parent: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """:func:`scratch_folder` as a ``Path`` for one block, removed when the block exits."""
    with scratch_folder(kind, parent) as name:
        yield Path(name)
