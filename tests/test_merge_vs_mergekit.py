"""End to end against mergekit: the same YAML recipe through ``mergekit-yaml`` and
``splice.merge.run`` on tiny float32 checkpoints (a base and two fine-tunes), every tensor compared.

mergekit runs once per recipe, all recipes in one subprocess (its import alone takes seconds).
Deterministic methods: max abs diff <= 1e-6 in float32; in bf16 at most one rounding step, except
that TIES / breadcrumbs may keep different members of a group of equal magnitudes at the trimming
cut (splice breaks such ties by position, mergekit by an unstable sort). DARE / DELLA draw
different random numbers, so their statistics are compared, and splice's own runs must repeat
bit for bit from the seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import splice.merge as sm

needs_mergekit = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed"
)

ATTN_GRADIENT = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]

# name -> recipe with placeholders BASE / FT1 / FT2 for the model paths
RECIPES: dict[str, dict] = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {
                "model": "FT1",
                "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.6}]},
            },
            {"model": "FT2", "parameters": {"weight": [0.2, 0.8]}},
            {"model": "BASE", "parameters": {"weight": 0.3}},
        ],
    },
    "linear_unnormalized": {
        "merge_method": "linear",
        "models": [
            {"model": "FT1", "parameters": {"weight": 0.7}},
            {"model": "FT2", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"normalize": False},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": [1.0, 0.2]}},
            {"model": "FT2", "parameters": {"weight": 0.4}},
        ],
        "parameters": {"lambda": 0.8},
    },
    "task_arithmetic_slices": {
        "merge_method": "task_arithmetic",
        "base_model": "BASE",
        "slices": [
            {
                "sources": [
                    {"model": "BASE", "layer_range": [0, 4]},
                    {"model": "FT1", "layer_range": [0, 4], "parameters": {"weight": 0.5}},
                    {"model": "FT2", "layer_range": [0, 4], "parameters": {"weight": [0.0, 1.0]}},
                ],
                "parameters": {"normalize": True},
            }
        ],
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "BASE",
        "models": [{"model": "BASE"}, {"model": "FT1"}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 1]},
                {"filter": "mlp", "value": [1, 0.2]},
                {"value": 0.4},
            ]
        },
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "models": [
            {"model": "FT1", "parameters": {"weight": 0.3}},
            {"model": "FT2", "parameters": {"weight": [0.2, 0.9]}},
        ],
    },
    "nuslerp_base_rows": {
        "merge_method": "nuslerp",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": 0.3}},
            {"model": "FT2", "parameters": {"weight": 0.7}},
        ],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": ATTN_GRADIENT}},
            {"model": "FT2", "parameters": {"weight": 0.5}},
        ],
    },
    "multislerp_nobase": {
        "merge_method": "multislerp",
        "models": [
            {"model": m, "parameters": {"weight": w}}
            for m, w in (("FT1", 1.0), ("FT2", 2.0), ("BASE", 0.5))
        ],
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": "FT1"}, {"model": "FT2"}, {"model": "BASE"}],
        "parameters": {"max_iter": 20, "tol": 1e-6},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "BASE",
        "models": [{"model": "FT1"}, {"model": "FT2"}],
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": "BASE",
        "models": [{"model": "FT1"}, {"model": "FT2"}],
        "parameters": {"filter_wise": True},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "BASE",
        "models": [
            {
                "model": "FT1",
                "parameters": {
                    "weight": 0.6,
                    "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.5}],
                },
            },
            {"model": "FT2", "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
        ],
    },
    "ties_options": {
        "merge_method": "ties",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": 1.0, "density": 0.4}},
            {"model": "FT2", "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "parameters": {"rescale": True, "lambda": 0.7, "int8_mask": True, "normalize": False},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
            {"model": "FT2", "parameters": {"weight": 0.5, "density": [0.5, 0.9]}},
        ],
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.1}},
            {"model": "FT2", "parameters": {"weight": 0.8, "density": 0.6}},
        ],
        "parameters": {"normalize": True},
    },
    "sce": {
        "merge_method": "sce",
        "base_model": "BASE",
        "models": [{"model": "FT1"}, {"model": "FT2"}],
    },
    "sce_topk": {
        "merge_method": "sce",
        "base_model": "BASE",
        "models": [{"model": "FT1"}, {"model": "FT2"}, {"model": "BASE"}],
        "parameters": {"select_topk": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]},
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "BASE",
        "models": [{"model": "BASE"}, {"model": "FT1"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.001, 0.02]}, {"value": 0.005}]},
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": "BASE",
        "models": [{"model": "BASE"}, {"model": "FT2"}],
    },
    "ram": {  # |task vector| ~ 0.01: epsilon 0.01 leaves about a third of the entries out
        "merge_method": "ram",
        "base_model": "BASE",
        "models": [{"model": "FT1"}, {"model": "FT2"}],
        "parameters": {"epsilon": 0.01},
    },
    "ram_default": {
        "merge_method": "ram",
        "base_model": "BASE",
        "models": [{"model": "FT1"}, {"model": "FT2"}],
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": "BASE",
        "models": [{"model": "FT1"}, {"model": "FT2"}],
        "parameters": {"epsilon": 0.012, "r": 0.5, "alpha": [0.1, 1.0]},
    },
    "ramplus_tl_default": {
        "merge_method": "ramplus_tl",
        "base_model": "BASE",
        "models": [{"model": "FT1"}, {"model": "FT2"}],
        "parameters": {"epsilon": 0.01},
    },
    "passthrough": {  # a frankenmerge: 3 base layers then 3 of FT1, FT1's o_proj scaled
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "BASE", "layer_range": [0, 3]}]},
            {
                "sources": [
                    {
                        "model": "FT1",
                        "layer_range": [1, 4],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1}]},
                    }
                ]
            },
        ],
    },
}
DETERMINISTIC = list(RECIPES)

# bf16: the recipe's dtype is the computation dtype in both tools; for the trimming methods
# constant densities, so that the cuts where ties may fall are known (see ``trim_ties``)
BF16: dict[str, dict] = {
    n: RECIPES[n]
    for n in (
        "linear",
        "task_arithmetic",
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "model_stock",
        "sce",
        "nearswap",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
    )
}
# methods whose mergekit code returns float32 for bf16 inputs (a float32 mask or coefficient
# promotes the result), which mergekit-yaml then writes without casting to the recipe's dtype
PROMOTED = ("arcee_fusion", "ramplus_tl")
BF16["ties"] = RECIPES["ties_options"]
BF16["breadcrumbs"] = {
    "merge_method": "breadcrumbs",
    "base_model": "BASE",
    "models": [
        {"model": "FT1", "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
        {"model": "FT2", "parameters": {"weight": 0.7, "density": 0.6, "gamma": 0.1}},
    ],
}

# one fine-tune, so that the output minus the base is that model's sparsified task vector
DENSITY, EPSILON = 0.4, 0.2
STOCHASTIC: dict[str, dict] = {
    "dare_linear": {
        "merge_method": "dare_linear",
        "base_model": "BASE",
        "models": [{"model": "FT1", "parameters": {"weight": 1.0, "density": DENSITY}}],
    },
    "della_linear": {
        "merge_method": "della_linear",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": 1.0, "density": DENSITY, "epsilon": EPSILON}}
        ],
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": 0.6, "density": DENSITY}},
            {"model": "FT2", "parameters": {"weight": 0.4, "density": DENSITY}},
        ],
    },
    "della": {
        "merge_method": "della",
        "base_model": "BASE",
        "models": [
            {"model": "FT1", "parameters": {"weight": 0.6, "density": DENSITY, "epsilon": EPSILON}},
            {"model": "FT2", "parameters": {"weight": 0.4, "density": DENSITY, "epsilon": EPSILON}},
        ],
    },
}


def concrete(recipe: dict, models: dict[str, Path], dtype: str = "float32") -> dict:
    """The recipe with real model paths and a computation dtype."""
    paths = {"BASE": str(models["base"]), "FT1": str(models["ft1"]), "FT2": str(models["ft2"])}
    text = json.dumps(recipe)
    for key, path in paths.items():
        text = text.replace(f'"{key}"', json.dumps(path))
    return {**json.loads(text), "dtype": dtype}


MERGEKIT_DRIVER = """
import json, sys
from mergekit.scripts.run_yaml import main
for config, out in json.loads(sys.argv[1]):
    main.main([config, out, "--no-write-model-card", "--no-copy-tokenizer", "--quiet",
               "--random-seed", "0"], standalone_mode=False)
"""


@pytest.fixture(scope="session")
def mergekit_outputs(trio, tmp_path_factory) -> dict[str, Path]:
    """Every recipe (float32, bf16 variants, stochastic) merged by mergekit in one process."""
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is not installed")
    root = tmp_path_factory.mktemp("mergekit")
    jobs: dict[str, dict] = {n: concrete(r, trio) for n, r in {**RECIPES, **STOCHASTIC}.items()}
    jobs.update({f"{n}-bf16": concrete(r, trio, "bfloat16") for n, r in BF16.items()})
    return run_mergekit(jobs, root)


def run_mergekit(jobs: dict[str, dict], root: Path, copy_tokenizer: bool = False) -> dict:
    """Every recipe through mergekit-yaml in one process; ``{name: output folder}``."""
    pairs = []
    for name, recipe in jobs.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(recipe))
        pairs.append((str(root / f"{name}.yml"), str(root / name)))
    driver = MERGEKIT_DRIVER
    if copy_tokenizer:
        driver = driver.replace('"--no-copy-tokenizer", ', "")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(pairs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: root / name for name in jobs}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def splice_merge(recipe: dict, out: Path, seed: int | None = None) -> dict[str, torch.Tensor]:
    sm.run(recipe, out, sm.MergeOptions(show_progress=False, seed=seed))
    return tensors(out)


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding step (ulp) at each entry's magnitude."""
    x = x.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name
        assert ours[name].dtype == theirs[name].dtype, name


@needs_mergekit
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_float32_matches_mergekit(name, trio, mergekit_outputs, tmp_path):
    theirs = tensors(mergekit_outputs[name])
    ours = splice_merge(concrete(RECIPES[name], trio), tmp_path / "out")
    assert_same_tensors(ours, theirs)
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in theirs)
    assert worst <= 1e-6, f"{name}: max abs diff {worst:.3g}"
    base = tensors(trio["base"])  # the merge did something
    assert any(not torch.equal(ours[k], base[k]) for k in base)


def trim_ties(recipe: dict, trio, name: str) -> torch.Tensor:
    """Entries whose bf16 task-vector magnitude equals a trimming cut of some model: the only
    places where splice and mergekit may keep different members of a group of equal values."""
    base = tensors(trio["base"])[name].to(torch.bfloat16)
    tie = torch.zeros(base.shape, dtype=torch.bool)
    for entry, key in zip(recipe["models"], ("ft1", "ft2"), strict=True):
        p = entry["parameters"]
        w = (tensors(trio[key])[name].to(torch.bfloat16) - base).float().abs()
        s, n = w.reshape(-1).sort().values, w.numel()
        if recipe["merge_method"] == "ties":
            cuts = [s[n - max(1, int(p["density"] * n))]]
        else:  # breadcrumbs: the smallest and the largest magnitude kept
            keep_n = int(p["density"] * n)
            bottom = max(0, n - keep_n - int(p["gamma"] * n))
            cuts = [s[bottom], s[bottom + keep_n - 1]]
        tie |= torch.isin(w, torch.stack(cuts))
    return tie


@needs_mergekit
@pytest.mark.parametrize("name", list(BF16))
def test_bf16_within_one_rounding_step(name, trio, mergekit_outputs, tmp_path):
    theirs = tensors(mergekit_outputs[f"{name}-bf16"])
    ours = splice_merge(concrete(BF16[name], trio, "bfloat16"), tmp_path / "out")
    if name in PROMOTED:  # mergekit writes the float32 its method returns; splice the dtype
        assert all(t.dtype == torch.float32 for t in theirs.values())
        theirs = {k: t.to(torch.bfloat16) for k, t in theirs.items()}
    assert_same_tensors(ours, theirs)
    for k in theirs:
        assert ours[k].dtype == torch.bfloat16
        diff = (ours[k].float() - theirs[k].float()).abs()
        off = diff > bf16_step(torch.maximum(ours[k].float().abs(), theirs[k].float().abs()))
        if name in ("ties", "breadcrumbs"):
            off &= ~trim_ties(BF16[name], trio, k)
        assert not off.any(), f"{name} {k}: {int(off.sum())} entries off by more than one step"


def kept_stats(out: dict, base: dict, ft: dict) -> tuple[float, float, float]:
    """(fraction of task-vector entries kept, max relative L1 mismatch per tensor,
    kept fraction among each row's larger-than-median magnitudes minus the smaller)."""
    kept = total = 0
    l1_err = 0.0
    hi = lo = hi_n = lo_n = 0
    for k in base:
        delta = ft[k].double() - base[k].double()
        moved = out[k].double() - base[k].double()
        keep = moved != 0
        kept += int(keep.sum())
        total += keep.numel()
        l1_err = max(l1_err, abs(moved.abs().sum().item() / delta.abs().sum().item() - 1))
        rows = delta.abs().reshape(1, -1) if delta.dim() < 2 else delta.abs()
        big = rows > rows.median(dim=1, keepdim=True).values
        keep = keep.reshape(rows.shape)
        hi, hi_n = hi + int((keep & big).sum()), hi_n + int(big.sum())
        lo, lo_n = lo + int((keep & ~big).sum()), lo_n + int((~big).sum())
    return kept / total, l1_err, hi / hi_n - lo / lo_n


@needs_mergekit
@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_sparsification_statistics_match_mergekit(name, trio, mergekit_outputs, tmp_path):
    base, ft = tensors(trio["base"]), tensors(trio["ft1"])
    theirs = tensors(mergekit_outputs[name])
    ours = splice_merge(concrete(STOCHASTIC[name], trio), tmp_path / "out", seed=1)
    assert_same_tensors(ours, theirs)
    n = sum(t.numel() for t in base.values())
    sigma = (DENSITY * (1 - DENSITY) / n) ** 0.5
    ramp = EPSILON if name == "della_linear" else 0.0  # keep probability: top half minus bottom
    for out in (ours, theirs):
        fraction, l1_err, slope = kept_stats(out, base, ft)
        assert abs(fraction - DENSITY) < 5 * sigma
        assert l1_err < 1e-5  # rescale: the task vector keeps its L1 norm, tensor by tensor
        assert abs(slope - ramp) < 0.03


@needs_mergekit
@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_random_ties_statistics_match_mergekit(name, trio, mergekit_outputs, tmp_path):
    base = tensors(trio["base"])
    theirs = tensors(mergekit_outputs[name])
    ours = splice_merge(concrete(STOCHASTIC[name], trio), tmp_path / "out", seed=1)
    assert_same_tensors(ours, theirs)

    def stats(out):
        moved = torch.cat([(out[k].double() - base[k].double()).reshape(-1) for k in base])
        return (moved != 0).double().mean().item(), moved.abs().mean().item()

    (f_ours, m_ours), (f_theirs, m_theirs) = stats(ours), stats(theirs)
    assert abs(f_ours - f_theirs) < 0.02
    assert m_ours == pytest.approx(m_theirs, rel=0.05)


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_merges_repeat_from_the_seed(name, trio, tmp_path):
    recipe = concrete(STOCHASTIC[name], trio)
    a = splice_merge(recipe, tmp_path / "a", seed=5)
    b = splice_merge(recipe, tmp_path / "b", seed=5)
    c = splice_merge(recipe, tmp_path / "c", seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@needs_mergekit
def test_moe_matches_mergekit_moe(trio, tmp_path):
    """mergekit-moe on the same recipe: every tensor but the routers identical, routers equal to
    bf16 precision (mergekit runs the base model in bfloat16 for the prompts' hidden states,
    splice in float32). Prompts of one length each, so no padding is involved (where padding
    is, splice reads each prompt's last real token and mergekit position -1). mergekit 0.1.5
    writes transformers 5's packed expert layout, which splice reads as per-expert views. splice
    reads mergekit-moe's own file (no ``merge_method``) as ``merge_method: moe``."""
    from splice import open_checkpoint

    recipe = {
        "base_model": str(trio["base"]),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(trio["ft1"]), "positive_prompts": ["w1 w2 w3", "w4 w5 w6"]},
            {
                "source_model": str(trio["ft2"]),
                "positive_prompts": ["w40 w41 w42"],
                "negative_prompts": ["w7 w8 w9"],
            },
            {"source_model": str(trio["base"]), "positive_prompts": ["w10 w11 w12 w13"]},
        ],
    }
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [str(Path(sys.executable).with_name("mergekit-moe")), str(path), str(tmp_path / "mk")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [*cmd, "--device", "cpu", "--no-write-model-card"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sm.run(path, tmp_path / "sp", sm.MergeOptions(show_progress=False))  # the same file, unchanged
    theirs, ours = open_checkpoint(tmp_path / "mk"), open_checkpoint(tmp_path / "sp")
    assert sorted(theirs) == sorted(ours)
    routers = [n for n in ours if n.endswith("block_sparse_moe.gate.weight")]
    assert len(routers) == 4
    for name in ours:
        a, b = ours.load(name), theirs.load(name)
        if name in routers:  # unit rows; bf16 hidden states are good to ~3 significant digits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
            assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.9999
        else:
            assert torch.equal(a, b), name


# ---- different vocabularies (tokenizer_source) ----------------------------------------------
def vocab_recipes(m: dict[str, Path]) -> dict[str, dict]:
    """Recipes over models with added tokens (``*_chat``) and a permuted vocabulary."""

    def entry(key: str, **p) -> dict:
        return {"model": str(m[key]), "parameters": {"weight": 0.6, "density": 0.7, **p}}

    return {
        # both fine-tunes add the same tokens, the base lacks them: their rows are the mean
        "ties-union": {
            "merge_method": "ties",
            "base_model": str(m["base"]),
            "models": [entry("ft1_chat"), entry("ft2_chat", weight=0.4)],
            "tokenizer_source": "union",
        },
        "linear-union-permuted": {
            "merge_method": "linear",
            "models": [entry("ft1_chat"), entry("ft2_perm", weight=0.4)],
            "tokenizer_source": "union",
        },
        "task_arithmetic-base": {
            "merge_method": "task_arithmetic",
            "base_model": str(m["base"]),
            "models": [entry("ft1_chat"), entry("ft2_perm", weight=0.4)],
            "tokenizer_source": "base",
        },
        # the tokenizer section's source defaults to union. Not TIES: every padding row is the
        # model's mean row, so equal magnitudes meet at its trimming cut (broken differently)
        "task_arithmetic-padded": {
            "merge_method": "task_arithmetic",
            "base_model": str(m["base"]),
            "models": [entry("ft1_chat"), entry("ft2_perm", weight=0.4)],
            "tokenizer": {"pad_to_multiple_of": 64},
        },
        # tokens with configured sources: rows of another token, zeros for every model, a
        # token added by the recipe, another model's row for every model
        "ties-tokens": {
            "merge_method": "ties",
            "base_model": str(m["base"]),
            "models": [entry("ft1_chat"), entry("ft2", weight=0.4)],
            "tokenizer": {
                "source": "union",
                "tokens": {
                    "<|im_start|>": {
                        "source": {
                            "kind": "model_token",
                            "model": str(m["ft1_chat"]),
                            "token": "w5",
                        }
                    },
                    "<x>": {"source": {"kind": "zero"}, "force": True},
                    "<brand_new>": {
                        "source": {"kind": "model_token", "model": str(m["ft2"]), "token_id": 7}
                    },
                    "w9": {"source": str(m["ft2"]), "force": True},
                },
            },
        },
        "passthrough-union": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(m["base"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(m["ft1_chat"]), "layer_range": [2, 4]}]},
            ],
            "tokenizer_source": "union",
        },
    }


@pytest.fixture(scope="module")
def vocab_outputs(trio, tmp_path_factory):
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is not installed")
    from test_vocab import permuted, with_tokens

    root = tmp_path_factory.mktemp("vocab-mk")
    models = {
        **trio,
        "ft2_perm": permuted(trio["ft2"], root / "ft2_perm", seed=5),
        "ft1_chat": with_tokens(trio["ft1"], root / "ft1_chat", ["<|im_start|>", "<x>"], seed=6),
        "ft2_chat": with_tokens(trio["ft2"], root / "ft2_chat", ["<|im_start|>", "<x>"], seed=7),
    }
    recipes = {n: {**r, "dtype": "float32"} for n, r in vocab_recipes(models).items()}
    return recipes, run_mergekit(recipes, root, copy_tokenizer=True)


@needs_mergekit
@pytest.mark.parametrize(
    "name",
    [
        "ties-union",
        "linear-union-permuted",
        "task_arithmetic-base",
        "task_arithmetic-padded",
        "ties-tokens",
        "passthrough-union",
    ],
)
def test_different_vocabularies_match_mergekit(name, vocab_outputs, tmp_path):
    from transformers import AutoTokenizer

    recipes, outs = vocab_outputs
    theirs = tensors(outs[name])
    ours = splice_merge(recipes[name], tmp_path / "out")
    assert_same_tensors(ours, theirs)
    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    their_vocab = AutoTokenizer.from_pretrained(outs[name]).get_vocab()
    if "base_model" in recipes[name]:
        assert vocab == their_vocab
    else:  # mergekit's donor is list(set(models))[0], hash order: compare token by token
        assert vocab.keys() == their_vocab.keys()
        order = torch.tensor([their_vocab[t] for t in sorted(vocab, key=vocab.__getitem__)])
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            theirs[k] = theirs[k][order]
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in theirs)
    assert worst <= 1e-6, f"{name}: max abs diff {worst:.3g}"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        config["vocab_size"] == json.loads((outs[name] / "config.json").read_text())["vocab_size"]
    )
