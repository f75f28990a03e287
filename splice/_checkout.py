"""``import splice.merge`` from a plain checkout (no ``pip install``).

The subpackages live in top-level folders (``merge/``, ``surgery/``, ``evolve/``,
``analysis/``) that an install maps to ``splice.<name>`` (setuptools ``package-dir``). Run from
a checkout with the repository root on ``sys.path`` and no install, Python finds ``splice`` but
not ``splice.merge``: :class:`CheckoutFinder`, appended to ``sys.meta_path`` (so an install's
own finders always come first), maps those four names, and only those, to the sibling folders.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

#: the subpackages that live beside the core's folder in a checkout
SUBPACKAGES = ("merge", "surgery", "evolve", "analysis")
_ROOT = Path(__file__).resolve().parent.parent


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``splice.<sub>`` in the checkout's ``<sub>/`` folder (for the four subpackages)."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        head, _, sub = name.partition(".")
        if head != "splice" or sub not in SUBPACKAGES:
            return None
        init = _ROOT / sub / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)]
        )


def install() -> None:
    """Append the finder once (last: installed packages are found by their own finders)."""
    if not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(CheckoutFinder())
