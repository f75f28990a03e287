"""The tables of numbers in README.md and docs/*.md are their JSON's, never typed: each sits
between ``<!-- table:NAME -->`` markers and equals what ``scripts/doc_tables.py`` draws now from
``benchmarks/results/*.json`` (a hand edit, or a JSON rewritten without rerunning the script,
fails here); no table of numbers stands outside the markers; and the docs' relative links
lead to files and headings that exist."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "doc_tables.py"


def _load():
    spec = importlib.util.spec_from_file_location("doc_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dt = _load()
DOCS = dt.doc_files()


def test_every_marked_table_is_what_the_script_writes_now() -> None:
    problems = dt.check()
    assert not problems, "\n".join([*problems, "run: python scripts/doc_tables.py"])


def test_every_table_is_shown_once() -> None:
    shown = [name for path in DOCS for name, _ in dt.regions(path.read_text())]
    assert sorted(shown) == sorted(dt.TABLES), "each table of scripts/doc_tables.py once"


def test_a_hand_edit_is_caught() -> None:
    text = (ROOT / "docs" / "merging.md").read_text()
    _, body = dt.regions(text)[0]
    row = body.splitlines()[2]  # the first data row, under the header and the alignment line
    typed = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), row, count=1)
    edited = text.replace(row, typed, 1)
    assert edited != text
    assert dt.rewrite(edited) == text  # the script puts the JSON's number back


def test_a_stale_json_is_caught(tmp_path: Path) -> None:
    """The JSON changes (a rerun benchmark) and the docs do not: check() names the table."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "benchmarks" / "results", copy / "benchmarks" / "results")
    (copy / "assets" / "zoo").mkdir(parents=True)
    shutil.copy(ROOT / "assets" / "zoo" / "zoo.json", copy / "assets" / "zoo" / "zoo.json")
    assert dt.check(ROOT, dt.Sources(copy)) == []
    merge = copy / "benchmarks" / "results" / "merge.json"
    data = json.loads(merge.read_text())
    data["linear"]["splice_s"] += 1.0
    merge.write_text(json.dumps(data))
    problems = dt.check(ROOT, dt.Sources(copy))
    assert problems == ["docs/benchmarks.md: table:merge-vs-mergekit differs from its JSON"]


def test_bad_markers_are_named() -> None:
    text = "<!-- table:zoo-merges -->\n<!-- table:no-such -->\n<!-- /table:zoo-merges -->\n"
    problems = dt.marker_problems(text)
    assert "unknown table 'no-such'" in problems
    assert any("opens inside" in p for p in problems)
    assert dt.marker_problems("<!-- table:core-io -->\n") == ["table:core-io is never closed"]


NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?\s*(s|ms|MB|GB|%|x)?")
FENCE = re.compile(r"^(```|~~~)")
OWNED = re.compile(
    r"<!-- table:([a-z0-9_-]+) -->.*?<!-- /table:\1 -->"
    r"|<!-- architectures:begin -->.*?<!-- architectures:end -->",
    re.S,
)


def _prose(text: str) -> list[str]:
    """``text``'s lines outside the generated regions and outside fenced code."""
    lines, fenced = [], False
    for line in OWNED.sub("", text).splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_table_of_numbers_is_typed_by_hand(path: Path) -> None:
    """A Markdown table row with two or more numeric cells outside the markers is a table
    someone typed: draw it from a JSON with scripts/doc_tables.py instead."""
    for line in _prose(path.read_text()):
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("*`") for c in line.strip().strip("|").split("|")]
        numeric = [c for c in cells if NUMBER.fullmatch(c)]
        assert len(numeric) < 2, f"{path.name}: a hand-typed row of numbers: {line}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {
        _slug(m.group(1)) for line in _prose(path.read_text()) if (m := re.match(r"#+ (.*)", line))
    }


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(_prose(path.read_text()))):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to a missing file: {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: no heading for {target}"


def test_the_script_is_fast_and_imports_no_torch() -> None:
    code = (
        "import runpy, sys, time\n"
        "sys.argv = ['doc_tables.py', '--check']\n"
        "t = time.perf_counter()\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = {'torch', 'numpy', 'splice', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert time.perf_counter() - t < 5\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
