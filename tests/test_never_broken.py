"""Never a broken output, on every causal-LM type users meet: each verb that writes a model
either exits 0 with an output transformers loads with no missing, unexpected or misshapen
tensor and no input tensor lost, or exits 2 with one line and nothing at OUT. The 25 families
of tests/families.py must also pass (tests/test_families.py checks their numbers); the others
(MoE families, GPT-2-style naming) may refuse, never break."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from families import FAMILIES, OTHERS, build_any, known
from family_checks import (
    Failed,
    Refused,
    load_checked,
    mapped_name,
    no_tensor_lost,
    quiet,
    run_cli,
    tensor_names,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TYPES = [*FAMILIES, *OTHERS]
#: verb -> (arguments after SRC OUT, the source layer of each output layer)
VERBS = {
    "upscale": (["--duplicate", "1:3"], [0, 1, 2, 1, 2, 3]),
    "prune": (["--drop", "2"], [0, 1, 3]),
    "merge": ([], [0, 1, 2, 3]),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return {}


def _source(model_type: str, built: dict[str, Path], root: Path) -> Path:
    if model_type not in built:
        with quiet():
            built[model_type] = build_any(model_type, root / model_type)
    return built[model_type]


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("model_type", TYPES)
def test_an_output_loads_or_nothing_is_written(model_type, verb, built, tmp_path_factory):
    if not known(model_type):
        pytest.skip(f"transformers has no {model_type}")
    src = _source(model_type, built, tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp(f"{model_type}-{verb}") / "out"
    args, mapping = VERBS[verb]
    if verb == "merge":
        recipe = out.parent / "recipe.yml"
        recipe.write_text(
            f"merge_method: linear\nmodels:\n  - model: {src}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {src}\n    parameters: {{weight: 0.5}}\n"
        )
        argv = ["merge", recipe, out, "--no-progress"]
    else:
        argv = [verb, src, out, *args, "--device", "cpu", "--no-progress"]
    try:
        run_cli(argv)
    except Refused as e:
        assert model_type not in FAMILIES, f"{model_type} {verb} refused: {e}"
        assert "\n" not in str(e) and not out.exists()
        return
    except Failed as e:
        pytest.fail(f"{model_type} {verb}: {e}")
    expected = {new for name in tensor_names(src) for new in mapped_name(name, mapping)}
    no_tensor_lost(expected, out)
    load_checked(out)
