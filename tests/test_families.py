"""Every verb of splice on each of the 25 families of ``families.FAMILIES``, the MoE
families of ``families.MOE_FAMILIES`` and the multimodal ones of ``mm_families.MM_FAMILIES``
(their language model; the vision tower and projector kept byte for byte), against
transformers' own model of the family built independently (``family_checks``): inspect,
a linear merge, upscale ``--duplicate``, prune ``--drop``, slice at 0% and 25% (multimodal:
``--basis shared``), collapse (MoE) and evolve's data-flow path model.

Each family's sources are built once per session (under one shared tmp folder). A family the
installed transformers does not know is skipped. ``scripts/arch_table.py`` runs the same
checks into ``docs/architectures.json`` and README's architecture table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from families import FAMILIES, MOE_FAMILIES, known
from family_checks import VERBS, check
from mm_families import MM_FAMILIES

#: every family the battery runs, in README's order: dense, MoE, multimodal
ALL_FAMILIES = [*FAMILIES, *MOE_FAMILIES, *MM_FAMILIES]

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
    # multimodal (--basis shared): Gemma 3's language model is post-norm like gemma3_text;
    # Mistral 3's projector has the language model's width inside, behind an activation;
    # Qwen2.5-VL's text config has no head_dim (a narrower stream would narrow every head)
    "gemma3": POST_NORM,
    "gemma4": POST_NORM,
    "mistral3": "projector's inner width",
    "qwen2_5_vl": "no head_dim",
}


#: family -> a substring of the one-line refusal ``splice collapse`` may give for it
COLLAPSE_REFUSED: dict[str, str] = {
    # its router scales the experts' inputs, not their outputs: no routing described for it
    "llama4_text": "is not supported",
    "llama4": "is not supported",  # its language model is llama4_text
}


#: family -> a substring of the one-line refusal of every verb that maps layers (upscale,
#: prune, evolve's layer paths): Gemma 4 keeps one block per layer inside global tensors
LAYER_MAP_REFUSED: dict[str, str] = {"gemma4": "per-layer input embeddings"}


def moe(family: str) -> bool:
    """Whether collapse applies: an MoE family, or a multimodal one whose language model is."""
    text = MM_FAMILIES[family]["text"] if family in MM_FAMILIES else family
    return text in [*MOE_FAMILIES, "qwen3_next"]


@pytest.fixture(scope="session")
def family_work(tmp_path_factory) -> Path:
    """One folder for the whole session: ``sources/<family>/seed<k>`` are built once there."""
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_verb_on_family(family: str, verb: str, family_work: Path) -> None:
    if not known(family):
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no model type {family!r}")
    outcome = check(family, verb, family_work)
    maps = dict.fromkeys(("upscale", "prune", "evolve-dfs"), LAYER_MAP_REFUSED)
    refused = {"slice": SLICE_REFUSED, "collapse": COLLAPSE_REFUSED, **maps}.get(verb, {})
    if outcome.status == "refused" and family in refused:
        assert refused[family] in outcome.detail, outcome.detail
        return
    if verb == "collapse" and not moe(family):
        assert outcome.status == "skipped", outcome
        return
    assert outcome.status == "pass", f"{family} {verb}: {outcome.status}: {outcome.detail}"


def test_the_refusals_allowed_are_of_known_families() -> None:
    assert set(SLICE_REFUSED) <= set(ALL_FAMILIES)
    assert all(SLICE_REFUSED.values())
    assert set(LAYER_MAP_REFUSED) <= set(ALL_FAMILIES)
    assert set(COLLAPSE_REFUSED) <= {f for f in ALL_FAMILIES if moe(f)}
    assert all(COLLAPSE_REFUSED.values())
