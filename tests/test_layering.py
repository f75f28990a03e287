"""Dependencies point inward, checked on every import statement (module level and inside
functions): the core (``splice/``) imports none of the subpackages; ``analysis``, ``merge`` and
``surgery`` import only the core; ``evolve`` may also import ``merge`` and ``analysis``. What the
core runs of a subpackage goes through entry points the subpackage declares. And no code imports
a subpackage by its folder name (``import merge``), which would load it twice."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from splice.errors import SpliceError

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("analysis", "evolve", "merge", "surgery")
ALLOWED = {
    "core": {"core"},
    "analysis": {"core", "analysis"},
    "merge": {"core", "merge"},
    "surgery": {"core", "surgery"},
    "evolve": {"core", "evolve", "merge", "analysis"},
}


def layer_of(module: str) -> str | None:
    """``splice.merge.x`` -> ``merge``; ``splice.checkpoint`` -> ``core``; else None."""
    parts = module.split(".")
    if parts[0] != "splice":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "core"


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import in ``path``, ``from a import b`` giving both
    ``a`` and ``a.b`` (``b`` may be a submodule)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def package_files() -> dict[str, list[Path]]:
    files = {"core": sorted((ROOT / "splice").rglob("*.py"))}
    for sub in SUBPACKAGES:
        files[sub] = sorted((ROOT / sub).rglob("*.py"))
    return files


def test_dependencies_point_inward():
    files = package_files()
    assert all(files.values()), "a package folder is empty: did the layout change?"
    bad = []
    for layer, paths in files.items():
        for path in paths:
            rel = path.relative_to(ROOT).as_posix()
            for line, module in imports(path):
                target = layer_of(module)
                if target is None or target in ALLOWED[layer]:
                    continue
                bad.append(f"{rel}:{line} ({layer}) imports {module} ({target})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(set(bad)))


def test_the_core_reaches_subpackages_through_declared_entry_points():
    """What the core runs of a subpackage (CLI verbs, the zoo's merge check) is declared in
    pyproject.toml and loads to the subpackage's own object."""
    from splice.merge import merge_into
    from splice.registry import plugin

    assert plugin("splice.zoo", "merge_into") is merge_into
    assert callable(plugin("splice.commands", "upscale"))
    with pytest.raises(SpliceError, match="no entry point 'nope'"):
        plugin("splice.zoo", "nope")


def test_no_subpackage_is_imported_by_its_folder_name():
    folders = ["splice", *SUBPACKAGES, "tests", "benchmarks", "examples"]
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in imports(path)
        if module.split(".")[0] in SUBPACKAGES
    ]
    assert not bad, "\n".join(bad)
