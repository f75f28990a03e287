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

A LoRA reference ``BASE+ADAPTER`` (mergekit's syntax) follows the rule on each side: a path
that exists as typed wins, else the reference splits at the last ``+`` whose two sides are
found (:func:`lora_parts`).
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


def _found(ref: str, folder: Path | None) -> bool:
    """``ref`` exists as written or from ``folder``, or reads as a hub id."""
    return (
        os.path.exists(ref)
        or (folder is not None and not os.path.isabs(ref) and (folder / ref).exists())
        or is_hub_id(ref)
    )


def lora_parts(ref: str, folder: Path | None = None) -> tuple[str, str] | None:
    """``(base, adapter)`` when ``ref`` is a LoRA reference ``BASE+ADAPTER``, else ``None``.

    A path that exists as typed (from the current folder or ``folder``) is no LoRA reference,
    even with a ``+`` in its name. Otherwise ``ref`` splits at the last ``+`` whose two sides
    are found (each exists from the current folder or ``folder``, or is a hub id); when no
    split has both, at the last ``+``, so that the side found nowhere is the one reported
    (``None`` when a side of it is empty: ``model+`` is a path, found or not).
    """
    if "+" not in ref or os.path.exists(ref):
        return None
    if folder is not None and not os.path.isabs(ref) and (folder / ref).exists():
        return None
    cuts = [i for i, c in enumerate(ref) if c == "+"]
    for i in reversed(cuts):
        base, adapter = ref[:i], ref[i + 1 :]
        if base and adapter and _found(base, folder) and _found(adapter, folder):
            return base, adapter
    base, adapter = ref[: cuts[-1]], ref[cuts[-1] + 1 :]
    return (base, adapter) if base and adapter else None


def resolve_path(ref: str, folder: Path | None, *, what: str = "", absolute: bool = False) -> str:
    """``ref`` as written when it is absolute or exists from the current folder, else
    ``folder / ref`` (made absolute) when that exists (``folder``: that of the file naming
    ``ref``; ``None``: no file, as for YAML text), else ``ref`` when it is a hub id or no file
    names it. A LoRA reference ``BASE+ADAPTER`` (:func:`lora_parts`) is resolved side by side.
    ``absolute``: a local path found is made absolute (a hub id stays as it is).

    ``SpliceError`` otherwise, one line (``what`` first: the file, e.g. ``recipe r.yml``)
    naming ``ref`` and both folders tried.
    """
    parts = lora_parts(ref, folder)
    if parts is not None:
        base, adapter = (resolve_path(p, folder, what=what, absolute=absolute) for p in parts)
        return f"{base}+{adapter}"
    if os.path.isabs(ref) or os.path.exists(ref) or folder is None:
        return os.path.abspath(ref) if absolute and os.path.exists(ref) else ref
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
