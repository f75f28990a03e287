"""Relative paths named in files: one rule for merge recipes (one document or several,
mergekit-moe's too) and evolve configs.

A relative path a file names is taken from the current folder when it exists there (as mergekit
does, so its recipes run unchanged), else from the folder of the file that names it. A hub id
(``org/name``) that exists in neither place passes through for the hub to resolve
(:func:`splice.checkpoint.resolve`); any other path found in neither place is a
:class:`~splice.errors.SpliceError` that names the path and both folders tried.

    resolve_path("../../assets/zoo/base", Path("examples/recipes"))
    # -> "/abs/assets/zoo/base" when only the recipe's folder has it (from the current folder,
    #    "../../assets/zoo/base" is taken as written)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from splice.errors import SpliceError

#: ``org/name`` as :mod:`splice.checkpoint` tells a hub id from a path
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(ref: str) -> bool:
    """``ref`` reads as a hub id (``org/name``), not a relative path such as ``../model``."""
    return bool(_HUB_ID.match(ref)) and not any(p in (".", "..") for p in ref.split("/"))


def resolve_path(ref: str, folder: Path | None, *, what: str = "") -> str:
    """``ref`` as written when it is absolute or exists from the current folder, else
    ``folder / ref`` (made absolute) when that exists (``folder``: that of the file naming ``ref``; ``None``:
    no file, as for YAML text), else ``ref`` when it is a hub id or no file names it.

    ``SpliceError`` otherwise, one line (``what`` first: the file, e.g. ``recipe r.yml``)
    naming ``ref`` and both folders tried.
    """
    if os.path.isabs(ref) or os.path.exists(ref) or folder is None:
        return ref
    candidate = folder / ref
    if candidate.exists():
        return str(candidate.resolve())
    if is_hub_id(ref):
        return ref
    where = f"{what}: " if what else ""
    raise SpliceError(
        f"{where}{ref}: no such folder, from the current folder ({os.getcwd()}) or from the "
        f"file's folder ({folder.resolve()})"
    )
