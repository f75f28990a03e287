"""Every verb of splice on each of the 25 families of ``families.FAMILIES`` and the MoE
families of ``families.MOE_FAMILIES``, against
transformers' own model of the family built independently (``family_checks``): inspect,
a linear merge, upscale ``--duplicate``, prune ``--drop`` and slice at 0% and 25%.

Each family's sources are built once per session (under one shared tmp folder). A family the
installed transformers does not know is skipped. ``scripts/arch_table.py`` runs the same
checks into ``docs/architectures.json`` and README's architecture table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from families import FAMILIES, MOE_FAMILIES, known
from family_checks import VERBS, check

#: family -> a substring of the one-line refusal ``splice slice`` may give for it (at 25%
#: sparsity, or at 0% where slicing does not support the family at all); any other refusal,
#: and a refusal of any other verb, fails
POST_NORM = "post-norm"
SLICE_REFUSED: dict[str, str] = {
    # no exact slicing exists: a norm on each block's output does not commute with a rotation
    "gemma2": POST_NORM,
    "gemma3_text": POST_NORM,
    "olmo2": POST_NORM,
    "olmo3": POST_NORM,
    "glm4": POST_NORM,
    "exaone4": POST_NORM,
    # no residual roles described (attention sinks, biased experts)
    "gpt_oss": "no residual-stream roles",
    # at 25%: OLMoE's q/k norms span all heads, a width slicing cannot map
    "olmoe": "k_norm.weight",
}


#: family -> a substring of the one-line refusal ``splice collapse`` may give for it
COLLAPSE_REFUSED: dict[str, str] = {
    # its router scales the experts' inputs, not their outputs: no routing described for it
    "llama4_text": "is not supported",
}


@pytest.fixture(scope="session")
def family_work(tmp_path_factory) -> Path:
    """One folder for the whole session: ``sources/<family>/seed<k>`` are built once there."""
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_verb_on_family(family: str, verb: str, family_work: Path) -> None:
    if not known(family):
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no model type {family!r}")
    outcome = check(family, verb, family_work)
    refused = {"slice": SLICE_REFUSED, "collapse": COLLAPSE_REFUSED}.get(verb, {})
    if outcome.status == "refused" and family in refused:
        assert refused[family] in outcome.detail, outcome.detail
        return
    if verb == "collapse" and family not in [*MOE_FAMILIES, "qwen3_next"]:
        assert outcome.status == "skipped", outcome
        return
    assert outcome.status == "pass", f"{family} {verb}: {outcome.status}: {outcome.detail}"


def test_the_refusals_allowed_are_of_known_families() -> None:
    assert set(SLICE_REFUSED) <= {*FAMILIES, *MOE_FAMILIES}
    assert all(SLICE_REFUSED.values())
