"""``import splice.merge`` (and the other subpackages) works from a plain checkout, with no
install: the repository root on ``sys.path``, the libraries but not splice's editable hook."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_subpackages_import_from_a_plain_checkout(tmp_path):
    code = (
        "import sys, splice.merge, splice.surgery, splice.evolve, splice.analysis\n"
        "import splice.merge.methods\n"
        "from splice.merge import run\n"
        "assert not any('editable' in type(f).__module__ for f in sys.meta_path), sys.meta_path\n"
        "print(splice.merge.__file__, splice.surgery.__file__)\n"
    )
    libs = ":".join(site.getsitepackages())
    # -S: no site processing, so the editable install's .pth hook does not run
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": f"{ROOT}:{libs}", "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    merge, surgery = proc.stdout.split()
    assert Path(merge) == ROOT / "merge" / "__init__.py"
    assert Path(surgery) == ROOT / "surgery" / "__init__.py"


def test_the_cli_runs_from_a_plain_checkout(tmp_path):
    """Every verb of the table loads without an install (no entry points exist then)."""
    libs = ":".join(site.getsitepackages())
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "splice.cli", "merge", "--help"],
        env={"PYTHONPATH": f"{ROOT}:{libs}", "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "usage: splice merge" in proc.stdout, proc.stderr[-2000:]
    code = "from splice import cli; print(sorted(cli._verbs()) == sorted(cli.VERBS))"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": f"{ROOT}:{libs}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]


def test_only_the_four_subpackages_are_mapped():
    from splice._checkout import CheckoutFinder

    finder = CheckoutFinder()
    assert finder.find_spec("splice.merge") is not None
    for name in ("splice.tests", "splice.examples", "merge", "splice.merge.recipe", "other.merge"):
        assert finder.find_spec(name) is None, name


def test_every_package_folder_is_in_pyproject():
    """A folder with an ``__init__.py`` that ``[tool.setuptools] packages`` does not list is
    left out of a wheel (an editable install still finds it, so nothing else would notice)."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in tool["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    assert found - set(tool["packages"]) == set(), "add these to pyproject's packages"
