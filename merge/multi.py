"""mergekit-multi: several recipes in one file (YAML documents separated by ``---``), each
named document an intermediate merge that later documents use as a model.
:func:`read_recipe` reads any recipe file: one document is a ``Recipe``, several a
:class:`MultiRecipe` (run by ``splice.merge.runner``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.merge.recipe import Recipe
from splice.merge.recipe_text import one_mapping, source_text, yaml_documents
from splice.paths import resolve_path

_STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_RESERVED = ("base", "union")  # tokenizer_source keywords


@dataclass(frozen=True)
class Stage:
    """One document of a multi-document recipe: its ``name`` (``None``: the final merge), its
    recipe with model references as written, and the names of the documents it uses."""

    index: int  # 1-based position in the file
    name: str | None
    recipe: Recipe
    uses: tuple[str, ...]

    @property
    def label(self) -> str:
        """``document 2 (second-merge)``: how messages name it."""
        return f"document {self.index} ({self.name or 'final, unnamed'})"


@dataclass(frozen=True)
class MultiRecipe:
    """mergekit-multi's format: YAML documents separated by ``---``, each a recipe; a document
    with a ``name`` is an intermediate merge, and a later document that names it as a model
    (``model``, ``base_model``, a slice source, ``tokenizer_source``, ...) merges its output.
    A name always means that document's output, even where a folder of that name exists.

    ``stages`` are in run order (every document after the ones it uses, otherwise in file
    order); the last is the final merge: the document without a ``name``, or else the only one
    that no other document uses. Every other document must be used (perhaps through others) by
    the final one.
    """

    stages: tuple[Stage, ...]
    base_dir: Path | None = None  # the recipe file's folder, for relative paths
    what: str = "recipe"

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def intermediates(self) -> tuple[Stage, ...]:
        return self.stages[:-1]

    def resolved(self, stage: Stage, outputs: Mapping[str, str | os.PathLike[str]]) -> Recipe:
        """``stage``'s recipe with the documents it uses replaced by their ``outputs`` (folders,
        made absolute) and relative paths resolved as :mod:`splice.paths` says (from the
        current folder, else the recipe file's)."""
        missing = [n for n in stage.uses if n not in outputs]
        if missing:
            raise SpliceError(f"{stage.label}: no output for {missing[0]!r} yet")
        done = {n: os.path.abspath(outputs[n]) for n in stage.uses}
        return stage.recipe.map_models(lambda ref: done.get(ref) or self.path(ref))

    def path(self, ref: str) -> str:
        """A model reference that is no document's name, resolved (:mod:`splice.paths`)."""
        return resolve_path(ref, self.base_dir, what=self.what)

    def external_models(self) -> list[str]:
        """The models the documents name that are no document's output, in file order
        (relative paths resolved as in :meth:`resolved`)."""
        names = {s.name for s in self.stages}
        refs = [
            self.path(ref)
            for s in sorted(self.stages, key=lambda s: s.index)
            for ref in s.recipe.referenced_models()
            if ref not in names
        ]
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        """Every document, in file order, names as written (for the final model's card)."""
        parts = []
        for s in sorted(self.stages, key=lambda s: s.index):
            parts.append(s.recipe.to_yaml())
        return "---\n".join(parts)


def read_recipe(source: str | os.PathLike[str]) -> Recipe | MultiRecipe:
    """A recipe file (or YAML text): a ``Recipe`` when it holds one document, a ``MultiRecipe``
    (mergekit-multi) when it holds several; ``SpliceError``, one line per problem."""
    text, base_dir, what = source_text(source)
    docs = yaml_documents(text, what)
    if len(docs) <= 1:
        recipe = Recipe.from_dict(one_mapping(docs, what))
        return recipe.with_paths(base_dir, what=what) if base_dir else recipe
    return _multi(docs, what, base_dir)


def _multi(docs: list[Any], what: str, base_dir: Path | None) -> MultiRecipe:
    stages: list[Stage] = []
    unnamed: list[int] = []
    for i, data in enumerate(docs, start=1):
        where = f"{what} document {i}"
        if not isinstance(data, dict):
            raise SpliceError(f"{where} is not a mapping; each document is a recipe")
        name = data.get("name")
        if name is not None and (
            not isinstance(name, str) or not _STAGE_NAME.fullmatch(name) or name in _RESERVED
        ):
            raise SpliceError(
                f"{where}: name {name!r} must be a plain folder name (letters, digits, . _ -), "
                f"not {' or '.join(_RESERVED)}"
            )
        if name is None:
            unnamed.append(i)
        elif any(s.name == name for s in stages):
            raise SpliceError(f"{where}: the name {name!r} is given to two documents")
        label = f"{where} ({name})" if name else where
        recipe = Recipe.from_dict(data, what=label)  # paths are resolved once names are
        stages.append(Stage(i, name, recipe, ()))
    if len(unnamed) > 1:
        raise SpliceError(
            f"{what}: documents {unnamed[0]} and {unnamed[1]} have no `name`; only the final "
            "merge may go without one"
        )
    names = [s.name for s in stages if s.name]
    for k, s in enumerate(stages):
        refs = s.recipe.referenced_models()
        stages[k] = replace(s, uses=tuple(n for n in names if n in refs))
    order: list[Stage] = []  # every document after those it uses, otherwise in file order
    while len(order) < len(stages):
        done = {s.name for s in order}
        ready = [s for s in stages if s not in order and all(u in done for u in s.uses)]
        if not ready:
            rest = [s for s in stages if s not in order]
            raise SpliceError(f"{what}: the documents use each other in a cycle ({_cycle(rest)})")
        order.append(ready[0])
    used = {n for s in stages for n in s.uses}
    finals = [s for s in stages if s.name is None] or [s for s in stages if s.name not in used]
    if len(finals) > 1:
        shown = ", ".join(str(s.name) for s in finals)
        raise SpliceError(
            f"{what}: documents {shown} are each used by no other document; leave the `name` "
            "out of the final one (the others must feed it)"
        )
    (final,) = finals
    by_name = {s.name: s for s in stages if s.name}
    needed: set[str] = set()
    todo = list(final.uses)
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo += by_name[n].uses
    unused = [s for s in stages if s is not final and s.name not in needed]
    if unused:
        raise SpliceError(
            f"{what}: {unused[0].label} is not used by the final merge, {final.label}; remove "
            "it, or merge it on its own"
        )
    order.remove(final)  # nothing uses the final merge: it can go last
    multi = MultiRecipe((*order, final), base_dir, what)
    multi.external_models()  # a relative path found nowhere is an error now, not mid-run
    return multi


def _cycle(stages: list[Stage]) -> str:
    """``a -> b -> a``: one cycle among ``stages`` (each of which uses another of them)."""
    by_name = {s.name: s for s in stages if s.name}
    path = [next(iter(by_name))]
    while True:
        nxt = next(u for u in by_name[path[-1]].uses if u in by_name)
        if nxt in path:
            return " -> ".join([*path[path.index(nxt) :], nxt])
        path.append(nxt)
