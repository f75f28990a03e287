"""SCE in bfloat16 against mergekit-yaml (issue 27, item 5): mergekit's own test recipe
(``test_sce_merge``: sce, a base, two models weighted 0.6 / 0.4, ``select_topk: 0.5``) in
bfloat16 on the tiny llama trio.

The two outputs differ in a few entries, and only because of ties. The select step keeps the
``k`` entries of largest variance across the task vectors; in bf16 a variance has 8 significant
bits, so among thousands of entries several share the value at the cut, and which of them are
kept is a choice: splice keeps the later ones by flat position (the same on every device),
mergekit whatever ``torch.topk`` returns. Given mergekit's selection, splice's SCE is
bit-identical to mergekit's (:func:`test_given_mergekits_selection_splice_is_bit_identical`);
the selections differ only among tied variances; an entry of the output differs only where its
selection flipped, or in a tensor where the flips changed a model's bf16 weight (``mean(d²)``
over the kept entries, normalised), which shifts that tensor's other entries slightly.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from test_merge_vs_mergekit import concrete, needs_mergekit, run_mergekit, tensors

import splice.merge as sm
import splice.merge.methods.sce as sce_module
from splice.merge.methods.sce import variance_mask

pytestmark = [
    needs_mergekit,
    pytest.mark.filterwarnings("ignore:parameters of model"),  # weight: not sce's, in both
]

#: mergekit's tests/test_basic_merges.py test_sce_merge (two_model_config), BASE/FT1/FT2 for
#: the trio's base and fine-tunes
RECIPE = {
    "merge_method": "sce",
    "base_model": "BASE",
    "models": [
        {"model": "FT1", "parameters": {"weight": 0.6}},
        {"model": "FT2", "parameters": {"weight": 0.4}},
    ],
    "parameters": {"select_topk": 0.5},
}
TOPK = 0.5


def mergekit_selection(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """mergekit's select step (``sce_mask``, torch.topk), as a bool mask like splice's."""
    from mergekit.merge_methods.sce import sce_mask

    return sce_mask(torch.stack(deltas), fraction).bool()


@pytest.fixture(scope="module")
def outputs(trio, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """The recipe in bf16 through mergekit-yaml, splice, and splice selecting as mergekit."""
    root = tmp_path_factory.mktemp("sce_bf16")
    recipe = concrete(RECIPE, trio, "bfloat16")
    theirs = run_mergekit({"sce": recipe}, root)["sce"]
    opts = sm.MergeOptions(show_progress=False)
    sm.run(recipe, root / "splice", opts)
    with mock.patch.object(sce_module, "variance_mask", mergekit_selection):
        sm.run(recipe, root / "splice-topk", opts)
    return {
        "mergekit": tensors(theirs),
        "splice": tensors(root / "splice"),
        "splice-topk": tensors(root / "splice-topk"),
    }


@pytest.fixture(scope="module")
def selections(trio) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per tensor: the bf16 task vectors ``[2, ...]``, their variance, mergekit's and splice's
    selections."""
    base, fts = tensors(trio["base"]), [tensors(trio[k]) for k in ("ft1", "ft2")]
    found = {}
    for name, b in base.items():
        b = b.to(torch.bfloat16)
        deltas = [ft[name].to(torch.bfloat16) - b for ft in fts]
        var = torch.var(torch.stack(deltas), dim=0, correction=0)
        theirs, ours = mergekit_selection(deltas, TOPK), variance_mask(deltas, TOPK)
        found[name] = (torch.stack(deltas), var, theirs, ours)
    return found


def test_given_mergekits_selection_splice_is_bit_identical(outputs):
    theirs, ours = outputs["mergekit"], outputs["splice-topk"]
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert t.dtype == ours[name].dtype == torch.bfloat16, name
        assert torch.equal(ours[name], t), name


def test_selections_differ_only_among_tied_variances(selections):
    flipped = 0
    for name, (_, var, theirs, ours) in selections.items():
        assert int(ours.sum()) == int(theirs.sum()), name  # both keep k entries
        if not theirs.any():
            continue
        cut = var[theirs].min()  # the k-th largest variance
        tied = var == cut
        assert torch.equal(ours & ~tied, var > cut) and torch.equal(theirs & ~tied, var > cut)
        # splice keeps the last tied entries by flat position
        kept = ours.reshape(-1)[tied.reshape(-1)].int()
        assert torch.equal(kept, kept.sort(stable=True).values), name
        flipped += int((ours != theirs).sum())
    assert flipped > 0  # ties at the cut do happen here: the point of this file


def test_outputs_differ_only_where_a_selection_flipped(outputs, selections):
    from mergekit.merge_methods.sce import sce_weight

    theirs, ours = outputs["mergekit"], outputs["splice"]
    differ = moved = 0
    for name, (tvs, _, mk_sel, sp_sel) in selections.items():
        off = ours[name] != theirs[name]
        flips = mk_sel != sp_sel
        differ += int(off.sum())
        if not flips.any():
            assert not off.any(), name
            continue
        mk_w, sp_w = sce_weight(tvs * mk_sel), sce_weight(tvs * sp_sel)
        if torch.equal(mk_w, sp_w):  # the same model weights: only the flipped entries change
            assert not (off & ~flips).any(), name
        else:  # the flips moved the models' weights: every entry may shift a little
            moved += 1
    assert differ > 0 and moved > 0  # both kinds occur on the trio
    total = sum(t.numel() for t in theirs.values())
    assert differ < 0.01 * total
