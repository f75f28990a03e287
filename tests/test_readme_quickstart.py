"""The README's first hour works as written: its quick-start commands (the ``$ splice ...``
lines between ``<!-- quickstart:begin -->`` and ``<!-- quickstart:end -->``) run in order from a
folder laid out like the clone's root and exit 0, and its verb table names every verb and
sub-verb ``splice --help`` lists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from splice.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"


def quickstart_commands(text: str) -> list[str]:
    """The commands of the marked quick start, in order (``$ `` stripped)."""
    assert BEGIN in text and END in text, "README.md: no quick-start markers"
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    return [line[2:].strip() for line in block.splitlines() if line.startswith("$ ")]


def test_the_quick_start_walks_the_first_hour() -> None:
    """inspect -> merge -> analyze -> upscale / prune -> evolve, each one `splice` command whose
    outputs go under out/ and whose inputs are the clone's own files."""
    commands = quickstart_commands(README.read_text())
    verbs = [shlex.split(c)[1] for c in commands]
    assert all(shlex.split(c)[0] == "splice" for c in commands), commands
    assert {"inspect", "merge", "analyze", "prune", "upscale", "evolve"} <= set(verbs), verbs
    order = [verbs.index(v) for v in ("inspect", "merge", "analyze", "evolve")]
    assert order == sorted(order), verbs
    for command in commands:
        for arg in shlex.split(command)[2:]:
            if "/" in arg and not arg.startswith("-"):
                assert arg.startswith(("assets/", "examples/", "out/")), (command, arg)
                if not arg.startswith("out/"):
                    assert (ROOT / arg).exists(), (command, arg)


@pytest.mark.slow
def test_the_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command in order, in process, from a temporary folder whose assets/ and examples/
    are the clone's (so out/ is written there, not in the checkout)."""
    for name in ("assets", "examples"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for command in quickstart_commands(README.read_text()):
        assert main(shlex.split(command)[1:]) == 0, command
    assert (tmp_path / "out" / "ties" / "config.json").is_file()
    assert (tmp_path / "out" / "evolve" / "best.yml").is_file()


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def _listed(help_text: str) -> list[str]:
    """The sub-commands an argparse help lists (four spaces, a name, then its line or nothing),
    or the choices of an ``a|b|c`` positional."""
    names = re.findall(r"^    ([a-z][a-z-]*)(?:\s{2,}|$)", help_text, re.M)
    if names:
        return names
    usage = help_text.split("\n\n", 1)[0]
    return [
        n for group in re.findall(r"\s([a-z]+(?:\|[a-z]+)+)\s", usage) for n in group.split("|")
    ]


def test_the_verb_table_names_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    text = README.read_text()
    section = text[text.index("\n## Verbs") :]
    section = section[: section.index("\n## ", 1)]
    verbs = _listed(_help(capsys))
    assert {"inspect", "merge", "slice", "collapse", "evolve"} <= set(verbs), verbs
    for verb in verbs:
        rows = [line for line in section.splitlines() if line.startswith(f"| `splice {verb}")]
        assert rows, f"README's verb table has no row for `splice {verb}`"
        for sub in _listed(_help(capsys, verb)) if verb in ("analyze", "zoo", "evolve") else []:
            assert any(re.search(rf"\b{sub}\b", row) for row in rows), (verb, sub)


def test_the_recipe_shown_is_the_one_run() -> None:
    """README's recipe block is examples/recipes/ties.yml, which the quick start merges."""
    import yaml

    text = README.read_text()
    section = text[text.index("\n## A recipe") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    assert "examples/recipes/ties.yml" in quickstart_commands(text)[1]
    shown = yaml.safe_load(block.group(1))
    assert shown == yaml.safe_load((ROOT / "examples" / "recipes" / "ties.yml").read_text())
