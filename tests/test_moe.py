"""MoE from dense models: tensors land where they should, routers match a direct computation,
and an MoE of copies of the base model computes exactly what the base computes."""

from __future__ import annotations

import pytest
import torch
from conftest import logits
from test_checkpoint import reference_tensors

from splice import SpliceError
from splice.merge import MergeOptions, plan, run

OPTS = MergeOptions(show_progress=False)


def moe_recipe(trio, experts, gate_mode="hidden", **extra):
    return {
        "merge_method": "moe",
        "base_model": str(trio["base"]),
        "gate_mode": gate_mode,
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(trio[m]), "positive_prompts": p, **extra} for m, p in experts
        ],
    }


def test_experts_come_from_their_models_and_routers_from_hidden_states(trio, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    experts = [("ft1", ["w1 w2 w3", "w4 w5"]), ("ft2", ["w40 w41 w42 w43"]), ("base", ["w7"])]
    out = run(moe_recipe(trio, experts), tmp_path / "moe", OPTS)
    got = reference_tensors(out)
    base = reference_tensors(trio["base"])
    srcs = [reference_tensors(trio[m]) for m, _ in experts]
    for layer in range(4):
        pre = f"model.layers.{layer}."
        assert torch.equal(
            got[pre + "self_attn.q_proj.weight"], base[pre + "self_attn.q_proj.weight"]
        )
        for e, src in enumerate(srcs):
            ex = f"{pre}block_sparse_moe.experts.{e}."
            assert torch.equal(got[ex + "w1.weight"], src[pre + "mlp.gate_proj.weight"])
            assert torch.equal(got[ex + "w3.weight"], src[pre + "mlp.up_proj.weight"])
            assert torch.equal(got[ex + "w2.weight"], src[pre + "mlp.down_proj.weight"])
    # routers: hidden state entering each layer at each prompt's last token, mean, normalized
    model = AutoModelForCausalLM.from_pretrained(trio["base"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(trio["base"])
    for e, (_, prompts) in enumerate(experts):
        states = []
        for p in prompts:  # one prompt at a time: no padding involved
            ids = tok(tok.bos_token + p, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                hs = model(**ids, output_hidden_states=True).hidden_states
            states.append(torch.stack([h[0, -1] for h in hs[:-1]]))
        v = torch.stack(states).mean(0)
        v = v / v.norm(dim=-1, keepdim=True)
        for layer in range(4):
            row = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e]
            torch.testing.assert_close(row, v[layer], rtol=1e-5, atol=1e-6)
    moe = MixtralForCausalLM.from_pretrained(out)
    assert moe.config.num_local_experts == 3 and moe.config.num_experts_per_tok == 2


def test_moe_of_base_copies_equals_the_base(trio, tmp_path):
    recipe = moe_recipe(trio, [("base", None), ("base", None), ("base", None)], gate_mode="random")
    out = run(recipe, tmp_path / "moe", OPTS)
    torch.testing.assert_close(logits(out), logits(trio["base"]), rtol=1e-5, atol=1e-5)


def test_noise_and_residual_scale(trio, tmp_path):
    recipe = moe_recipe(
        trio, [("ft1", None), ("ft2", None)], gate_mode="random", residual_scale=0.5
    )
    out = run(recipe, tmp_path / "moe", OPTS)
    got, src = reference_tensors(out), reference_tensors(trio["ft1"])
    torch.testing.assert_close(
        got["model.layers.1.block_sparse_moe.experts.0.w2.weight"],
        0.5 * src["model.layers.1.mlp.down_proj.weight"],
    )


def test_residual_scale_zero_is_zero(trio, tmp_path):
    """``residual_scale: 0`` silences an expert (mergekit multiplies by it whenever it is set);
    it is not the default 1."""
    recipe = moe_recipe(trio, [("ft1", None), ("ft2", None)], gate_mode="random")
    recipe["experts"][1]["residual_scale"] = 0.0
    got = reference_tensors(run(recipe, tmp_path / "moe", OPTS))
    assert not got["model.layers.2.block_sparse_moe.experts.1.w2.weight"].any()
    assert got["model.layers.2.block_sparse_moe.experts.0.w2.weight"].any()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"experts_per_token": 3}, "experts_per_token must be between 1"),
        ({"gate_mode": "psychic"}, "unknown gate_mode"),
        ({"experts": None}, "needs an `experts` list"),
    ],
)
def test_bad_moe_recipes(trio, change, message):
    recipe = moe_recipe(trio, [("ft1", ["a"]), ("ft2", ["b"])])
    recipe.update(change)
    with pytest.raises(SpliceError, match=message):
        plan(recipe)


def test_identical_prompts_and_missing_prompts_are_refused(trio):
    with pytest.raises(SpliceError, match="same prompts"):
        plan(moe_recipe(trio, [("ft1", ["a"]), ("ft2", ["a"])]))
    with pytest.raises(SpliceError, match="no positive_prompts"):
        plan(moe_recipe(trio, [("ft1", ["a"]), ("ft2", None)]))
