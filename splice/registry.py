"""One registry pattern for everything looked up by name.

Merge methods, collapse methods, prune criteria, similarity metrics and genomes each get a
:class:`Registry`; entries register with a decorator and a duplicate name is an error (which
also catches a module imported twice under two names, e.g. bare ``merge`` next to
``splice.merge``).

Across packages, the same lookup goes through entry points: the core never imports a
subpackage, so what it runs of one (the CLI's verbs, group ``splice.commands``; the zoo's merge
check, group ``splice.zoo``) the subpackage declares in ``pyproject.toml`` and :func:`plugin`
loads by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from splice.errors import SpliceError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object table for one kind of thing (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("slerp")`` registers and returns the object unchanged."""

        def add(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name is a :class:`SpliceError` listing the choices."""
        try:
            return self._items[name]
        except KeyError:
            raise SpliceError(
                f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted (for help texts and error messages)."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def entry_points_of(group: str) -> dict[str, Any]:
    """The entry points installed packages declare in ``group``, by name (not yet loaded)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


def plugin(group: str, name: str) -> object:
    """The object an installed package declares as entry point ``name`` of ``group``, loaded."""
    found = entry_points_of(group).get(name)
    if found is None:
        raise SpliceError(
            f"no entry point {name!r} in group {group!r}: is splice installed (pip install -e .)?"
        )
    return found.load()
