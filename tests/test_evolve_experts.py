"""Merge and prune experts in one search (``genome.prune: experts | layers+experts``,
``splice.evolve.pruning``), on every MoE family whose router the specs describe per expert.

Each family's trio is a tiny MoE (``test_collapse_families.build``: routers sharpened,
selection biases not zero, DeepSeek-V3 with two expert groups, a dense layer and shared experts
where the family has them) and two "fine-tunes" of it (small deltas). The reference for a
candidate is the model ``splice merge`` writes from its recipe, loaded by transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import families
import family_checks as fc
import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from evolve_helpers import config_dict, write_tasks
from safetensors.torch import load_file, save_file
from test_keep_experts import FAMILIES, build_moe

from splice.arch import ArchSpec
from splice.errors import SpliceError
from splice.evolve import EvolveConfig, evolve
from splice.evolve.search import Candidates, prepare
from splice.merge import MergeOptions, run

pytest.importorskip("cma")
pytest.importorskip("lm_eval")

torch.set_num_threads(1)
IDS = torch.tensor([[1, 5, 9, 14, 3, 22, 7, 11, 30, 2, 17, 8]])


def make_trio(root: Path, family: str, **overrides: Any) -> dict[str, Path]:
    """A tiny MoE ``base`` and two fine-tunes of it (every tensor + 0.01 N(0, 1))."""
    base = build_moe(family, root / "base", seed=1, **overrides)
    make_tokenizer(96).save_pretrained(base)
    out = {"base": base}
    for i, name in enumerate(["ft1", "ft2"], start=1):
        dst = root / name
        shutil.copytree(base, dst)
        for f in dst.glob("*.safetensors"):
            sd = load_file(f)
            g = torch.Generator().manual_seed(i)
            noisy = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
            save_file(noisy, f, metadata={"format": "pt"})
        out[name] = dst
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("expert_tasks"))


def experts_config(trio: dict[str, Path], tasks: Path, prune: str, **genome: Any) -> EvolveConfig:
    data = config_dict(trio, tasks)
    data["genome"].update(merge_method="task_arithmetic", prune=prune, **genome)
    return EvolveConfig.from_dict(data)


def _logits(model_or_folder: Any) -> torch.Tensor:
    model = model_or_folder
    if isinstance(model_or_folder, Path):
        from transformers import AutoModelForCausalLM

        with fc.quiet():
            model = AutoModelForCausalLM.from_pretrained(model_or_folder, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(IDS).logits


def genes(g: Any, keep: list[float] | None, count: float, ranks: Any, seed: int = 0) -> np.ndarray:
    merge = np.random.default_rng(seed).uniform(0, 1, g.merge_dim)
    return np.r_[merge, [] if keep is None else keep, [count], np.asarray(ranks, dtype=float)]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory) -> dict[str, Any]:
    family = request.param
    if not families.known(family):
        pytest.skip(f"transformers has no {family!r}")
    return {"family": family, "trio": make_trio(tmp_path_factory.mktemp(family), family)}


def test_a_candidate_is_the_model_its_recipe_writes(fam, tasks, tmp_path):
    """Layers and experts pruned, in memory = ``splice merge`` of the recipe; then fewer
    experts, then every layer and expert kept (each view undoes the last). Gemma 4, whose
    layers differ in shape (its layer maps are refused), prunes experts only."""
    layers = fam["family"] != "gemma4_text"
    cfg = experts_config(fam["trio"], tasks, "layers+experts" if layers else "experts")
    g, sources, options = prepare(cfg)
    moe = g.moe
    n, e = g.num_layers, moe.experts
    assert g.dim == g.merge_dim + (n if layers else 0) + 1 + len(moe.layers) * e
    assert moe.counts == (2, 3) and e == 4
    cand = Candidates(cfg, g, sources, None, options)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    ranks = rng.uniform(0, 1, len(moe.layers) * e)
    keep = [1.0] * n
    keep[moe.layers[0]] = 0.0  # drop the first MoE layer
    every = [1.0] * n if layers else None
    points = [
        ("drop", genes(g, keep if layers else None, 0.1, ranks)),  # 2 experts kept
        ("three", genes(g, every, 0.4, ranks[::-1])),  # 3 experts, every layer
        ("all", genes(g, every, 0.9, ranks)),
    ]
    for what, x in points:
        cand.merge(x)
        recipe = g.recipe(x)
        out = run(recipe, tmp_path / what, MergeOptions(show_progress=False))
        torch.testing.assert_close(_logits(cand.module), _logits(out), atol=1e-5, rtol=1e-5)
        written = json.loads((out / "config.json").read_text())
        assert ArchSpec.load(fam["family"]).num_experts(written) == g.expert_count(x)
    assert "keep_experts" not in recipe  # the plain merge


def test_expert_genes_decode_to_the_highest_ranks(tmp_path, tasks):
    trio = make_trio(tmp_path, "mixtral")
    g, _, _ = prepare(experts_config(trio, tasks, "experts"))
    assert g.keep_dim == 0 and g.moe.layers == (0, 1, 2, 3) and g.moe.counts == (2, 3)
    names = g.names()[g.merge_dim :]
    assert names[:3] == ["experts", "expert.0.0", "expert.0.1"] and len(names) == 1 + 16
    ranks = np.tile([0.2, 0.9, 0.5, 0.9], 4)
    assert g.expert_count(genes(g, None, 0.51, ranks)) == 4
    assert g.kept_experts(genes(g, None, 0.51, ranks)) is None
    assert g.expert_count(genes(g, None, 0.24, ranks)) == 2
    assert g.expert_count(genes(g, None, 0.26, ranks)) == 3
    assert g.kept_experts(genes(g, None, 0.1, ranks)) == {i: (1, 3) for i in range(4)}  # ties
    assert g.kept_experts(genes(g, None, 0.3, ranks)) == {i: (1, 2, 3) for i in range(4)}
    recipe = g.recipe(genes(g, None, 0.1, ranks))
    assert recipe["keep_experts"] == [[1, 3]] * 4
    start = g.start(0.5)
    assert g.kept_experts(start) is None and g.recipe(start) == g.recipe(g.keep_all(start))


def test_size_counts_the_kept_experts(tmp_path, tasks):
    """Mixtral by hand (``families.SMALL``): hidden 32, expert width 64, 4 experts."""
    trio = make_trio(tmp_path, "mixtral")
    g, _, _ = prepare(experts_config(trio, tasks, "layers+experts"))
    cfg = json.loads((trio["base"] / "config.json").read_text())
    h, i, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    per_expert = 3 * h * i + h  # w1 w3 w2, and the router's row
    assert g.moe.params == (e * per_expert,) * 4
    x = genes(g, [1, 0, 1, 1], 0.1, np.zeros(16))  # 3 layers, 2 experts each
    total = g.other_params + sum(g.layer_params)
    want = g.other_params + 3 * (g.layer_params[0] - 2 * per_expert)
    assert g.params(x) == want and g.size(x) == pytest.approx(want / total)


def test_validation(trio, tasks, tmp_path):
    with pytest.raises(SpliceError, match="has no routed experts"):
        prepare(experts_config(trio, tasks, "experts"))  # the conftest trio is a llama
    moe = make_trio(tmp_path, "deepseek_v2", num_experts_per_tok=4)  # every token to all 4
    with pytest.raises(SpliceError, match="routes every token to all its 4 experts"):
        prepare(experts_config(moe, tasks, "experts"))
    data = config_dict(trio, tasks)
    data["genome"]["prune"] = "heads"
    with pytest.raises(SpliceError, match="prune"):
        EvolveConfig.from_dict(data)


def test_a_search_trades_score_for_experts(tmp_path, tasks):
    """size_weight over expert genes: candidates of fewer experts are scored and recorded."""
    trio = make_trio(tmp_path / "trio", "mixtral")
    data = config_dict(trio, tasks)
    data["genome"].update(merge_method="task_arithmetic", prune="experts", layer_granularity=0)
    data["search"].update(size_weight=0.5, generations=3)
    data["random_init"] = True
    data["tasks"] = [{"name": "tiny_mc"}]
    evolve(EvolveConfig.from_dict(data), tmp_path / "run")
    lines = (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()
    records = [json.loads(r) for r in lines]
    assert all(r["error"] is None for r in records)
    fewer = [r for r in records if "keep_experts" in r["recipe"]]
    assert fewer and all(r["size"] < 1 for r in fewer)
    for r in records:
        assert r["fitness"] == pytest.approx(r["scores"]["tiny_mc"] - 0.5 * r["size"])
