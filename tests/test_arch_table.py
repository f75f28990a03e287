"""README's architecture table is the battery's result, not typed: the table is what
``docs/architectures.json`` gives, and the JSON says what ``tests/test_families.py`` asserts
(every verb passes on every family, slicing refused exactly where the battery allows it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from families import FAMILIES, MOE_FAMILIES, known
from family_checks import VERBS
from test_families import COLLAPSE_REFUSED, SLICE_REFUSED

ROOT = Path(__file__).resolve().parent.parent


def test_readme_table_is_the_json() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "arch_table.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr + run.stdout


def test_the_json_is_what_the_battery_asserts() -> None:
    data = json.loads((ROOT / "docs" / "architectures.json").read_text())
    assert list(data["families"]) == [*FAMILIES, *MOE_FAMILIES]
    assert list(data["verbs"]) == list(VERBS)
    for family, row in data["families"].items():
        for verb in VERBS:
            got = row[verb]["status"]
            if not known(family):
                continue
            refused = {"slice": SLICE_REFUSED, "collapse": COLLAPSE_REFUSED}.get(verb, {})
            if family in refused:
                assert got == "refused", (family, verb, row[verb])
                assert refused[family] in row[verb]["detail"]
            elif verb == "collapse" and family not in [*MOE_FAMILIES, "qwen3_next"]:
                assert got == "skipped", (family, verb, row[verb])
            else:
                assert got == "pass", (family, verb, row[verb])
