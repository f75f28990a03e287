"""The recipes in examples/recipes run on the zoo from any folder (their paths are relative to
their own folder) and make what they say: each output loads with transformers, and its tensors
are checked against the sources by formula (slerp's endpoints and a middle layer, TIES' trimmed
task vector, DARE's seeded drops, the frankenmerge's layer map, the MoE's experts)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import logits
from test_checkpoint import reference_tensors

from splice.merge import MergeOptions, run

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "recipes"
ZOO = ROOT / "assets" / "zoo"
OPTS = MergeOptions(show_progress=False)


@pytest.fixture(scope="module")
def zoo_tensors() -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.float() for k, v in reference_tensors(ZOO / n).items()}
            for n in ("base", "math", "lang")}  # fmt: skip


def merged(name: str, tmp_path: Path, monkeypatch, **opts) -> tuple[Path, dict]:
    """Run ``examples/recipes/NAME.yml`` from ``tmp_path`` (not the repository) into it."""
    monkeypatch.chdir(tmp_path)
    out = run(RECIPES / f"{name}.yml", tmp_path / name, MergeOptions(show_progress=False, **opts))
    return out, reference_tensors(out)


def test_every_recipe_is_tested():
    assert sorted(p.stem for p in RECIPES.glob("*.yml")) == [
        "dare_ties", "moe", "passthrough", "slerp_gradient", "ties"
    ]  # fmt: skip


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's SLERP of two whole tensors, in float64."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(a64 @ b64 / (a64.norm() * b64.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        theta = math.acos(cos)
        s = math.sin(theta)
        out = math.sin((1 - t) * theta) / s * a64 + math.sin(t * theta) / s * b64
    return out.reshape(a.shape)


def test_slerp_gradient(tmp_path, monkeypatch, zoo_tensors):
    out, got = merged("slerp_gradient", tmp_path, monkeypatch)
    math_, lang = zoo_tensors["math"], zoo_tensors["lang"]
    q, up = "self_attn.q_proj.weight", "mlp.up_proj.weight"
    # t = 0 is math (the base model), t = 1 lang: the gradients' ends are exact copies
    for layer, kind, src in ((0, q, math_), (7, q, lang), (0, up, lang), (7, up, math_)):
        name = f"model.layers.{layer}.{kind}"
        assert torch.equal(got[name], src[name]), name
    # layer 3 of 8 sits at 3/7 along [0, 0.5, 0.3, 0.7, 1] (attention), [1, 0.5, 0.7, 0.3, 0]
    for kind, values in ((q, [0, 0.5, 0.3, 0.7, 1]), (up, [1, 0.5, 0.7, 0.3, 0])):
        at = 3 / 7 * (len(values) - 1)
        t = values[int(at)] + (at - int(at)) * (values[int(at) + 1] - values[int(at)])
        name = f"model.layers.3.{kind}"
        want = slerp_reference(math_[name], lang[name], t).float()
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
        assert not torch.equal(got[name], math_[name]) and not torch.equal(got[name], lang[name])
    ours = logits(out)
    for src in ("math", "lang"):
        assert (ours - logits(ZOO / src)).abs().max() > 1e-2, src


def test_ties(tmp_path, monkeypatch, zoo_tensors):
    """math never changed the embeddings, so there TIES is lang's task vector alone: its top
    30% by magnitude (lang's density at t = 0), times lang's weight 0.8 (normalize: false)."""
    out, got = merged("ties", tmp_path, monkeypatch)
    name = "model.embed_tokens.weight"
    base, lang = zoo_tensors["base"][name], zoo_tensors["lang"][name]
    assert torch.equal(zoo_tensors["math"][name], base)
    delta = lang - base
    changed = got[name] != base
    assert changed.sum().item() == round(0.3 * delta.numel())
    torch.testing.assert_close(got[name][changed], (base + 0.8 * delta)[changed])
    assert delta.abs()[changed].min() >= delta.abs()[~changed].max()  # the largest kept
    assert torch.equal(got[name][~changed], base[~changed])
    logits(out)  # loads and runs


def test_dare_ties_is_seeded(tmp_path, monkeypatch, zoo_tensors):
    """lang left layer 3's MLP as the base's, so there DARE-TIES is math's task vector with
    40% of its entries dropped at random, the rest scaled to keep its L1 norm."""
    out, got = merged("dare_ties", tmp_path, monkeypatch)
    name = "model.layers.3.mlp.down_proj.weight"
    base = zoo_tensors["base"][name]
    assert torch.equal(zoo_tensors["lang"][name], base)
    delta = zoo_tensors["math"][name] - base
    kept = got[name] != base
    assert abs(kept.float().mean().item() - 0.6) < 0.03
    scale = delta.abs().sum() / delta[kept].abs().sum()
    torch.testing.assert_close(got[name][kept], (base + scale * delta)[kept])
    again = reference_tensors(run(RECIPES / "dare_ties.yml", tmp_path / "again", OPTS))
    assert all(torch.equal(got[k], again[k]) for k in got)  # the recipe's seed: the same drops
    other = reference_tensors(
        run(RECIPES / "dare_ties.yml", tmp_path / "s1", MergeOptions(show_progress=False, seed=1))
    )
    assert not torch.equal(got[name], other[name])
    logits(out)


def test_passthrough_frankenmerge(tmp_path, monkeypatch, zoo_tensors):
    from transformers import AutoConfig

    out, got = merged("passthrough", tmp_path, monkeypatch)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 12
    math_, lang = zoo_tensors["math"], zoo_tensors["lang"]
    for layer in range(12):
        src, at = (math_, layer) if layer < 6 else (lang, layer - 4)
        for kind in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(
                got[f"model.layers.{layer}.{kind}"], src[f"model.layers.{at}.{kind}"]
            )
    assert torch.equal(got["model.embed_tokens.weight"], math_["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], lang["lm_head.weight"])
    assert logits(out).shape[-1] == 380


def test_moe(tmp_path, monkeypatch, zoo_tensors):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    out, got = merged("moe", tmp_path, monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(model, MixtralForCausalLM) and model.config.num_local_experts == 2
    base = zoo_tensors["base"]
    for layer in (0, 5):
        pre = f"model.layers.{layer}."
        q = pre + "self_attn.q_proj.weight"
        assert torch.equal(got[q], base[q])
        for e, src in enumerate(("math", "lang")):
            ex = f"{pre}block_sparse_moe.experts.{e}."
            mlp = zoo_tensors[src]
            assert torch.equal(got[ex + "w1.weight"], mlp[pre + "mlp.gate_proj.weight"])
            assert torch.equal(got[ex + "w2.weight"], mlp[pre + "mlp.down_proj.weight"])
        router = got[pre + "block_sparse_moe.gate.weight"]
        assert router.shape == (2, 96)
        torch.testing.assert_close(router.norm(dim=-1), torch.ones(2))  # normalized states
        assert (router[0] - router[1]).abs().max() > 1e-3  # the prompts tell them apart
    logits(model)
