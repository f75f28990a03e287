"""splice against mergekit outputs frozen as golden tensors: parity without mergekit installed.

``tests/golden/make_golden.py`` (run by hand) merged tiny seeded models with mergekit and kept a
few tensors per recipe (``golden/mergekit_golden.safetensors``) plus the recipe texts and input
fingerprint (``golden/recipes.json``). Here the same models are rebuilt by the same code
(``golden/inputs.py``), bit for bit, and merged by splice; every golden tensor must match with
the tolerance ``test_merge_vs_mergekit.py`` uses against a live mergekit: max abs diff <= 1e-6
in float32, at most one rounding step in bf16. The output's layout (tensor names, shapes,
dtypes) must be mergekit's too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden import inputs
from safetensors.torch import load_file

import splice.merge as sm

GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = json.loads((GOLDEN / "recipes.json").read_text())
FLOAT32_ATOL = 1e-6


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "mergekit_golden.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folders, fingerprint = inputs.write_models(tmp_path_factory.mktemp("golden-inputs"))
    assert fingerprint == RECORD["inputs"]["fingerprint"], (
        "this machine's torch draws other input weights than those the goldens were made from: "
        "the goldens cannot be compared here (rerun tests/golden/make_golden.py where they can)"
    )
    return folders


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding step (ulp) at each entry's magnitude."""
    x = x.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def test_goldens_are_of_these_inputs_and_recipes(golden):
    """``inputs.py`` is what the goldens were made from (else: rerun make_golden.py)."""
    assert RECORD["inputs"]["config"] == inputs.CONFIG
    assert RECORD["inputs"]["seeds"] == inputs.SEEDS
    assert inputs.fingerprint(inputs.state_dicts()) == RECORD["inputs"]["fingerprint"]
    assert {n: r["text"] for n, r in RECORD["recipes"].items()} == inputs.RECIPES
    expected = {f"{n}/{t}" for n in inputs.RECIPES for t in inputs.saved(n)}
    assert set(golden) == expected


@pytest.mark.parametrize("name", list(RECORD["recipes"]))
def test_splice_matches_frozen_mergekit(name, models, golden, tmp_path):
    recorded = RECORD["recipes"][name]
    recipe = inputs.concrete(recorded["text"], models)
    sm.run(recipe, tmp_path / "out", sm.MergeOptions(show_progress=False))
    ours = tensors(tmp_path / "out")
    layout = [f"{k} {tuple(t.shape)} {t.dtype}" for k, t in sorted(ours.items())]
    assert len(ours) == recorded["tensors"], layout
    assert inputs.layout(ours) == recorded["layout"], layout
    keys = [k for k in golden if k.startswith(f"{name}/")]
    assert keys
    for key in keys:
        theirs, mine = golden[key], ours[key.split("/", 1)[1]]
        assert mine.shape == theirs.shape, key
        assert mine.dtype == theirs.dtype, key
        diff = (mine.double() - theirs.double()).abs()
        if theirs.dtype == torch.float32:
            worst = diff.max().item()
            assert worst <= FLOAT32_ATOL, f"{key}: max abs diff {worst:.3g}"
        else:
            step = bf16_step(torch.maximum(mine.float().abs(), theirs.float().abs()))
            off = diff > step.double()
            assert not off.any(), f"{key}: {int(off.sum())} entries off by more than one step"
