"""Dependencies point inward, checked on every import statement (module level and inside
functions): the core (``splice/``) imports none of the subpackages; ``analysis``, ``merge`` and
``surgery`` import only the core; ``evolve`` may also import ``merge`` and ``analysis``. The
core reaches what it runs of a subpackage by name only (the CLI's verb table, entry points). And
no code imports
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


def test_the_core_reaches_subpackages_by_name_only():
    """What the core runs of a subpackage is named, never imported by the core's code: the
    zoo's merge check through an entry point declared in pyproject.toml, the CLI's verbs through
    its table (``splice.cli.VERBS``); each loads to the subpackage's own object."""
    from splice import cli
    from splice.merge import merge_into
    from splice.registry import plugin
    from splice.surgery.cli import add_upscale

    assert plugin("splice.zoo", "merge_into") is merge_into
    with pytest.raises(SpliceError, match="no entry point 'nope'"):
        plugin("splice.zoo", "nope")
    verbs = cli._verbs()
    assert list(verbs)[: len(cli.VERBS)] == list(cli.VERBS)
    assert verbs["upscale"].load() is add_upscale
    for name, verb in verbs.items():
        assert callable(verb.load()), name


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


def test_the_calibration_tier_imports_only_the_core():
    """``splice/calib`` (text sources, collectors, the runner) imports no subpackage and not the
    zoo: the zoo's ``zoo`` text source registers itself when the zoo is imported."""
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "splice" / "calib").rglob("*.py"))
        for line, module in imports(path)
        if layer_of(module) not in (None, "core") or module.startswith(("splice.zoo", "splice.cli"))
    ]
    assert not bad, "\n".join(bad)


def module_graph() -> dict[str, set[str]]:
    """Core module -> the core modules it imports (module level or inside functions)."""
    mods = {}
    for path in sorted((ROOT / "splice").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for _, target in imports(path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    return graph


def test_no_import_circle_between_the_core_and_the_zoo():
    """The zoo builds on the core; no core module outside ``splice/zoo`` reaches a zoo module
    that reaches it back (e.g. the core importing the zoo for its calibration text)."""
    graph = module_graph()
    assert "splice.calib.text" in graph and "splice.zoo.corpus" in graph

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    def in_zoo(m: str) -> bool:
        return m == "splice.zoo" or m.startswith("splice.zoo.")

    reached = {m: reach(m) for m in graph}
    circles = sorted(
        f"{a} <-> {b}"
        for a in graph
        if not in_zoo(a)
        for b in reached[a]
        if in_zoo(b) and a in reached[b]
    )
    assert not circles, "import circles between the core and the zoo:\n" + "\n".join(circles)


def test_the_zoo_text_source_is_registered_by_the_zoo():
    from splice.calib import text

    assert text.text_source("zoo:both") is text.SOURCES.get("zoo:both")
    assert text.is_text_source("zoo") and not text.is_text_source("zoo:nope")
