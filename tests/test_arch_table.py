"""README's architecture table is the battery's result, not typed: the table is what
``docs/architectures.json`` gives, and the JSON says what ``tests/test_families.py`` asserts
(every verb passes on every family, dense, MoE and multimodal, slicing, collapse and layer maps refused
exactly where the battery allows it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from families import known
from family_checks import VERBS
from test_families import ALL_FAMILIES, COLLAPSE_REFUSED, LAYER_MAP_REFUSED, SLICE_REFUSED, moe

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
    assert list(data["families"]) == ALL_FAMILIES
    assert list(data["verbs"]) == list(VERBS)
    for family, row in data["families"].items():
        for verb in VERBS:
            got = row[verb]["status"]
            if not known(family):
                continue
            maps = dict.fromkeys(("upscale", "prune", "evolve-dfs"), LAYER_MAP_REFUSED)
            refused = {"slice": SLICE_REFUSED, "collapse": COLLAPSE_REFUSED, **maps}.get(verb, {})
            if family in refused:
                assert got == "refused", (family, verb, row[verb])
                assert refused[family] in row[verb]["detail"]
            elif verb == "collapse" and not moe(family):
                assert got == "skipped", (family, verb, row[verb])
            else:
                assert got == "pass", (family, verb, row[verb])
