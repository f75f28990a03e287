"""The zoo's task data for lm-eval: copied by :func:`splice.zoo.tasks.write_tasks` beside the
task YAML files, whose ``custom_dataset: !function zoo_data.load`` calls :func:`load`.

A relative ``data_files`` path is read from this file's folder, so the zoo's task files work as
they are from any current folder (``lm_eval --include_path ZOO/tasks --tasks zoo_math``) and
wherever the folder is copied or moved; an absolute one is read as it is. Self-contained: it
needs ``datasets`` (lm-eval's dependency), not splice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(data_files: dict[str, str], **_: Any) -> Any:
    """The ``DatasetDict`` of the jsonl files ``data_files`` (split -> path), relative paths
    read from this folder. lm-eval also passes the task's metadata (ignored)."""
    import datasets

    here = Path(__file__).resolve().parent
    files = {split: str(here / path) for split, path in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
