"""``merge_method: moe`` writes every layout mergekit-moe writes, chosen as mergekit chooses.

Tiny dense llama / qwen2 / qwen3 models (tests/families.py) go through mergekit-moe 0.1.5 (its
Python API, on CPU) and splice on the same recipe; every tensor is compared by name, shape and
value. The random routers are equal bit for bit (mergekit draws from torch's global generator,
seeded here as splice seeds its own); ``cheap_embed`` routers agree to float32 rounding. Where
mergekit writes transformers 5's packed experts (Mixtral, Qwen3-MoE) splice writes the per-expert
layout, which splice reads mergekit's as (views of the same bytes). Every output but DeepSeek's
loads into transformers with no missing, unexpected or mismatched key; DeepSeek-MoE has no
transformers class (it needs DeepSeek's own code), so splice writes it only unverified.

mergekit quirks met here: it opens only the base and expert models, so a shared expert's model
must be one of those (it fails on any other); and its Qwen2-MoE config drops a Qwen2 base's
sliding window (splice keeps the base's attention).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import logits, make_tokenizer
from families import build

from splice import SpliceError, open_checkpoint
from splice.errors import SpliceWarning
from splice.merge import MergeOptions, plan, run
from splice.merge.moe_layouts import LAYOUTS, choose
from splice.merge.recipe import Recipe

OPTS = MergeOptions(show_progress=False)
UNVERIFIED = MergeOptions(show_progress=False, verify=False)
needs_mergekit = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="'mergekit' is not installed"
)
needs_shared = pytest.mark.skipif(
    "shared_experts" not in Recipe.model_fields,
    reason="the recipe schema has no shared_experts yet (merge/recipe.py)",
)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    """``{family}_{role}``: a base and two other models per family, each with a tokenizer
    (mergekit-moe loads the base model's even for random routers). Qwen2 slides its attention
    window on alternate layers, as Qwen2-MoE can; Qwen3-MoE slides it on every layer or none,
    so the Qwen3 models do not (as released Qwen3 models do not), except ``qwen3_sliding``."""
    root = tmp_path_factory.mktemp("dense")
    out = {}
    plain = {"qwen3": dict(use_sliding_window=False, layer_types=None)}
    for family in ("llama", "qwen2", "qwen3"):
        for seed, role in enumerate(("base", "a", "b")):
            path = build(family, root / f"{family}_{role}", seed=seed, **plain.get(family, {}))
            make_tokenizer(96).save_pretrained(path)
            out[f"{family}_{role}"] = path
    out["qwen3_sliding"] = build("qwen3", root / "qwen3_sliding")
    out["mistral_base"] = build("mistral", root / "mistral_base")  # sliding window 3
    return out


def recipe(dense, family, gate_mode="random", shared=None, **extra):
    prompts = gate_mode != "random"
    experts = [
        {"source_model": str(dense[f"{family}_a"])},
        {"source_model": str(dense[f"{family}_b"]), "residual_scale": 0.5},
    ]
    if prompts:
        # prompts of one length per list: no padding, which mergekit's hidden router reads
        experts[0]["positive_prompts"] = ["w1 w2 w3", "w4 w5 w6"]
        experts[1]["positive_prompts"] = ["w40 w41 w42"]
        experts[1]["negative_prompts"] = ["w7 w8 w9"]
    out = {
        "base_model": str(dense[f"{family}_base"]),
        "gate_mode": gate_mode,
        "experts_per_token": 2,
        "experts": experts,
        **extra,
    }
    if shared is not None:
        out["shared_experts"] = [{"source_model": str(dense[f"{family}_base"]), **shared}]
    return out


def mergekit_moe(config: dict, out: Path, seed: int = 0) -> Path:
    """mergekit-moe's own build on CPU; torch's global generator seeded as splice seeds its
    router's (``seed``), so random routers are drawn alike."""
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions as MkOptions
    from mergekit.scripts.moe import build as mk_build

    torch.manual_seed(seed)
    mk_build(
        MoEMergeConfig.model_validate(config),
        str(out),
        MkOptions(device="cpu"),
        device="cpu",
        allow_all_same=True,
    )
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor as splice lists it (packed experts as per-expert views)."""
    with warnings.catch_warnings():  # model_type deepseek: no spec, layers inferred
        warnings.simplefilter("ignore")
        ckpt = open_checkpoint(path)
    return {name: ckpt.load(name) for name in ckpt}


def loads_cleanly(path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


# model_type, family, gate_mode, shared expert, architecture key (the Qwen2 models' prompts
# would all read as <s> alone: transformers 5 gives a qwen2 folder its Qwen2Tokenizer, which
# drops the test tokenizer's words, so prompt routers are tested from llama and qwen3 bases)
SHARED = {"positive_prompts": ["w60 w61", "w62 w63"], "residual_scale": 0.25}
CASES = {
    "mixtral": ("mixtral", "llama", "random", None, None),
    "deepseek": ("deepseek", "llama", "random", {"residual_scale": 0.25}, None),
    "qwen2_moe-llama-random": ("qwen2_moe", "llama", "random", {"residual_scale": 0.25}, "qwen"),
    "qwen2_moe-llama-cheap_embed": ("qwen2_moe", "llama", "cheap_embed", SHARED, None),
    "qwen2_moe-llama-hidden": ("qwen2_moe", "llama", "hidden", SHARED, None),
    "qwen2_moe": ("qwen2_moe", "qwen2", "random", {"residual_scale": 0.25}, None),
    "qwen3_moe": ("qwen3_moe", "qwen3", "cheap_embed", None, None),
    "qwen3_moe-uniform": ("qwen3_moe", "qwen3", "uniform_random", None, "Qwen3"),
}
ROUTERS = ("block_sparse_moe.gate.weight", "mlp.gate.weight", "mlp.shared_expert_gate.weight")


@needs_mergekit
@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_mergekit_moe(case, dense, tmp_path):
    model_type, family, gate_mode, shared, arch = CASES[case]
    if shared is not None and "shared_experts" not in Recipe.model_fields:
        pytest.skip("the recipe schema has no shared_experts yet (merge/recipe.py)")
    extra = {"architecture": arch} if arch else {}
    r = recipe(dense, family, gate_mode, shared, **extra)
    theirs = tensors(mergekit_moe(r, tmp_path / "mk"))
    deepseek = model_type == "deepseek"
    if deepseek:
        with pytest.warns(SpliceWarning, match="DeepSeek's own model code"):
            out = run(r, tmp_path / "sp", UNVERIFIED)
    else:
        out = run(r, tmp_path / "sp", OPTS)
    ours = tensors(out)
    assert sorted(ours) == sorted(theirs)
    for name, a in ours.items():
        b = theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name.endswith(ROUTERS) and gate_mode != "random":  # the prompts tell experts apart
            assert torch.linalg.matrix_rank(a) == a.shape[0], name
        if name.endswith(ROUTERS) and gate_mode == "cheap_embed":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        elif name.endswith(ROUTERS) and gate_mode == "hidden":  # mergekit's states are bf16
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
            assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.9999
        else:
            assert torch.equal(a, b), name
    cfg = json.loads((out / "config.json").read_text())
    mk = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert cfg["model_type"] == mk["model_type"] == model_type
    same = ("architectures", "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size")
    same += ("shared_expert_intermediate_size", "n_routed_experts", "n_shared_experts", "auto_map")
    same += ("first_k_dense_replace", "moe_layer_freq", "scoring_func", "decoder_sparse_step")
    for key in same:
        assert cfg.get(key) == mk.get(key), key
    if deepseek:  # transformers has no class for it: written only unverified
        with (
            pytest.raises(SpliceError, match=r"auto_map.*--no-verify"),
            pytest.warns(SpliceWarning),
        ):
            run(r, tmp_path / "checked", OPTS)
        assert cfg["rope_theta"] == 10000.0  # DeepSeek's code reads it, not rope_parameters
        assert cfg["torch_dtype"] == mk["torch_dtype"] == "float32"
    else:
        loads_cleanly(out)


# base family, architecture key, output: every layout transformers loads
COPIES = {
    "llama": (None, "mixtral"),
    "mistral": (None, "mixtral"),
    "qwen3": (None, "qwen3_moe"),
    "qwen2": (None, "qwen2_moe"),
    "llama-qwen": ("qwen", "qwen2_moe"),  # zero q/k/v biases
    "mistral-qwen": ("qwen", "qwen2_moe"),  # its window slides on every layer
}


@pytest.mark.parametrize("case", list(COPIES))
def test_moe_of_base_copies_equals_the_base(case, dense, tmp_path):
    """Experts all copies of the base, routing weights normalized to sum to 1 (Mixtral always,
    Qwen-MoE by norm_topk_prob): the base's logits, so the attention (biases, sliding windows)
    is the base's. Qwen2-MoE adds its shared expert through a sigmoid gate: scaled to 0 here."""
    arch, model_type = COPIES[case]
    base = str(dense[f"{case.split('-')[0]}_base"])
    r = {
        "base_model": base,
        "gate_mode": "random",
        "experts_per_token": 2,
        "experts": [{"source_model": base}] * 3,
    }
    if arch:
        r["architecture"] = arch
    if model_type == "qwen2_moe":
        if "shared_experts" not in Recipe.model_fields:
            pytest.skip("the recipe schema has no shared_experts yet (merge/recipe.py)")
        r["shared_experts"] = [{"source_model": base, "residual_scale": 0.0}]
    out = run(r, tmp_path / "moe", OPTS)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    loads_cleanly(out)
    torch.testing.assert_close(logits(out), logits(base), rtol=1e-5, atol=1e-5)


def _mergekit_choice(config: dict) -> str | None:
    """The output architecture mergekit-moe selects (None: it refuses)."""
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions as MkOptions
    from mergekit.scripts.moe import select_output_arch

    try:
        return select_output_arch(MoEMergeConfig.model_validate(config), MkOptions()).name()
    except SystemExit:
        return None


@needs_mergekit
def test_layout_choice_is_mergekits(dense):
    """Every base family x shared experts (none, unprompted, prompted, two) x gate mode x
    ``architecture``: splice picks the layout mergekit-moe picks, or refuses where it does."""
    arches = [None, "mixtral", "deepseek", "qwen", "Qwen3", "dbrx"]
    shared_cases = [[], [{}], [{"positive_prompts": ["w9"]}], [{}, {}]]
    for family in ("llama", "qwen2", "qwen3"):
        base = str(dense[f"{family}_base"])
        for gate_mode in ("random", "cheap_embed"):
            for shared in shared_cases:
                for arch in arches:
                    cfg = recipe(dense, family, gate_mode, architecture=arch)
                    cfg["shared_experts"] = [{"source_model": base, **s} for s in shared]
                    theirs = _mergekit_choice(cfg)
                    ours, why = choose(arch, family, [_Shared(**s) for s in shared], gate_mode)
                    assert (ours.name if ours else None) == theirs, (cfg, why)
                    assert (why is None) == (ours is not None)


class _Shared:
    def __init__(self, positive_prompts=None, negative_prompts=None):
        self.positive_prompts, self.negative_prompts = positive_prompts, negative_prompts


def test_layout_names_are_the_model_types_too():
    assert [lay.model_type for lay in LAYOUTS] == ["mixtral", "deepseek", "qwen2_moe", "qwen3_moe"]
    assert choose("qwen2_moe", "llama", [_Shared()], "random")[0].model_type == "qwen2_moe"
    assert choose("qwen3_moe", "qwen3", [], "random")[0].model_type == "qwen3_moe"


@needs_shared
@pytest.mark.parametrize(
    "family, change, message",
    [
        ("qwen3", {"shared_experts": [{}]}, "Qwen3 MoE has no shared experts"),
        ("qwen2", {}, "Qwen MoE needs exactly 1 shared expert"),
        ("llama", {"architecture": "dbrx"}, "architecture 'dbrx' names no output layout"),
        ("llama", {"architecture": "mixtral", "shared_experts": [{}]}, "Mixtral has no shared"),
        (
            "llama",
            {"architecture": "deepseek", "shared_experts": [{"positive_prompts": ["w3"]}]},
            "cannot gate a shared expert",
        ),
        (
            "llama",
            {"architecture": "qwen", "gate_mode": "cheap_embed", "shared_experts": [{}]},
            "needs positive_prompts on the shared expert",
        ),
    ],
)
def test_refusals_are_one_line(family, change, message, dense):
    r = recipe(dense, family, change.get("gate_mode", "random"))
    base = str(dense[f"{family}_base"])
    r.update({k: v for k, v in change.items() if k != "shared_experts"})
    if "shared_experts" in change:
        r["shared_experts"] = [{"source_model": base, **s} for s in change["shared_experts"]]
    with pytest.raises(SpliceError, match=message) as err:
        plan(r)
    assert len(str(err.value).splitlines()) == 1


def test_qwen3_moe_refuses_a_window_on_some_layers(dense):
    base = str(dense["qwen3_sliding"])
    r = {"base_model": base, "gate_mode": "random", "experts": [{"source_model": base}] * 2}
    with pytest.raises(SpliceError, match="slides it over layers 0, 2 of 4"):
        plan(r)


@needs_shared
def test_shared_expert_noise_and_scale(dense, tmp_path):
    """The shared expert takes noise_scale (seeded per tensor) and residual_scale like an
    expert; the Qwen2-MoE shared gate's row comes with the experts' draws."""
    r = recipe(dense, "qwen2", "random", {"noise_scale": 0.01, "residual_scale": 0.5})
    out = tensors(run(r, tmp_path / "a", OPTS))
    again = tensors(run(r, tmp_path / "b", OPTS))
    src = tensors(dense["qwen2_base"])
    name = "model.layers.1.mlp.shared_expert."
    up, down = out[name + "up_proj.weight"], out[name + "down_proj.weight"]
    delta = up - src["model.layers.1.mlp.up_proj.weight"]
    assert 0.005 < delta.std() < 0.015
    torch.testing.assert_close(
        down / 0.5, src["model.layers.1.mlp.down_proj.weight"], atol=0.1, rtol=0
    )
    assert all(torch.equal(out[k], again[k]) for k in out)
    g = torch.Generator().manual_seed(0)
    draws = torch.randn((4, 3, 32), generator=g)
    assert torch.equal(out["model.layers.2.mlp.gate.weight"], draws[2, :2])
    assert torch.equal(out["model.layers.2.mlp.shared_expert_gate.weight"], draws[2, 2:])


def test_experts_of_another_dense_type(dense, tmp_path):
    """Beyond mergekit (which wants one model type for all): an expert may be any dense model
    of the base's sizes and activation, so a Qwen3 MLP goes into a Llama-based Mixtral; a Gemma
    one (GELU) is refused."""
    base = str(dense["llama_base"])
    r = {
        "base_model": base,
        "gate_mode": "random",
        "experts": [{"source_model": base}, {"source_model": str(dense["qwen3_a"])}],
    }
    got = tensors(run(r, tmp_path / "moe", OPTS))
    src = tensors(dense["qwen3_a"])
    name = "model.layers.3.block_sparse_moe.experts.1.w3.weight"
    assert torch.equal(got[name], src["model.layers.3.mlp.up_proj.weight"])
    gemma = build("gemma", tmp_path / "gemma", tie_word_embeddings=False)
    r["experts"][1]["source_model"] = str(gemma)
    with pytest.raises(SpliceError, match="hidden_act gelu_pytorch_tanh vs silu"):
        plan(r)


def test_splice_reads_its_own_deepseek_output(dense, tmp_path):
    """The DeepSeek-MoE layout (remote code, written unverified) has a spec: inspect reads its
    routed and shared experts and dense layers with no inferred-architecture warning, and a
    layer-moving verb keeps the experts."""
    from splice.cli import main
    from splice.summary import summarize

    r = recipe(dense, "llama", "random", {"residual_scale": 0.25})
    with pytest.warns(SpliceWarning, match="DeepSeek's own model code"):
        out = run(r, tmp_path / "ds", UNVERIFIED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no spec for model_type" inference
        s = summarize(open_checkpoint(out))
    assert s.model_type == "deepseek" and s.num_experts == len(r["experts"])
    assert s.shared_experts == ["mlp.shared_experts"] and not s.dense_layers
    up = tmp_path / "up"
    assert main(["upscale", str(out), str(up), "--layers", "0,0,1", "--no-verify",
                 "--no-progress"]) == 0  # fmt: skip
    t = summarize(open_checkpoint(up))
    assert t.num_layers == 3 and t.num_experts == s.num_experts
