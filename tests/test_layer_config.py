"""Interval rules through a layer map (splice/layer_config.py): which layers are MoE follows
from the index (``decoder_sparse_step``, ``first_k_dense_replace``, ``moe_layer_start_index``).
After upscale or prune the rule is kept where it still describes every output layer, made
explicit where the family has an explicit form (Qwen's ``mlp_only_layers``), and refused in
one line naming the field where it has none. The reference for the written outputs is
transformers' own model of the family, built from the config the test writes by hand with the
source's layers in the new order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from families import BASE
from family_checks import (
    Refused,
    compare,
    distinct,
    load_checked,
    logits,
    mapped_config,
    mapped_tensors,
    quiet,
    read_config,
    read_tensors,
    run_cli,
    write_reference,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

MOE = {
    # MoE at layers 1 and 3: every second layer
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        decoder_sparse_step=2,
    ),
    # MoE from layer 1 on
    "ernie4_5_moe": dict(
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=16,
        moe_layer_start_index=1,
        moe_layer_interval=1,
        moe_num_shared_experts=0,
    ),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        head_dim=4,  # the rotary part's
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
}


def _build(family: str, folder: Path) -> Path:
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers has no {family}")
    torch.manual_seed(0)
    with quiet():
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(family, **{**BASE, **MOE[family]})
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {f: _build(f, root / f) for f in MOE}


def _check_map(src: Path, tmp: Path, argv: list[str], mapping: list[int], **explicit) -> Path:
    """Run the verb, then compare with transformers' model of the mapped layers whose config
    is the source's with ``explicit`` fields (written by hand here)."""
    out = tmp / "out"
    run_cli([*argv[:1], src, out, *argv[1:], "--dtype", "float32", "--no-progress"])
    cfg = {**mapped_config(read_config(src), mapping), **explicit}
    ref = load_checked(
        write_reference(tmp / "ref", cfg, mapped_tensors(read_tensors(src), mapping))
    )
    want = logits(ref)
    distinct(want, logits(load_checked(src, "source")), "source")
    compare(logits(load_checked(out)), want)
    return out


def test_a_rule_that_no_longer_fits_is_made_explicit(sources, tmp_path):
    # drop layer 2 of [dense, MoE, dense, MoE]: [dense, MoE, MoE], which no step describes
    out = _check_map(
        sources["qwen2_moe"],
        tmp_path,
        ["prune", "--drop", "2"],
        [0, 1, 3],
        decoder_sparse_step=1,
        mlp_only_layers=[0],
    )
    cfg = read_config(out)
    assert cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == [0]


def test_a_rule_that_still_fits_is_kept(sources, tmp_path):
    # [0, 1, 2, 1, 2, 3]: dense, MoE, dense, MoE, dense, MoE is still every second layer
    out = _check_map(
        sources["qwen2_moe"], tmp_path, ["upscale", "--duplicate", "1:3"], [0, 1, 2, 1, 2, 3]
    )
    cfg = read_config(out)
    assert cfg["decoder_sparse_step"] == 2 and cfg["mlp_only_layers"] == []


def test_ernie_upscale_refits_its_last_moe_layer(sources, tmp_path):
    # MoE from layer 1 to its last: after growing to 6 layers the end index moves to 5
    out = _check_map(
        sources["ernie4_5_moe"],
        tmp_path,
        ["upscale", "--duplicate", "1:3"],
        [0, 1, 2, 1, 2, 3],
        moe_layer_start_index=1,
        moe_layer_end_index=5,
        moe_layer_interval=1,
    )
    assert read_config(out)["moe_layer_end_index"] == 5


@pytest.mark.parametrize(
    ("family", "field"),
    [("ernie4_5_moe", "moe_layer_start_index"), ("deepseek_v3", "first_k_dense_replace")],
)
def test_a_rule_with_no_explicit_form_is_refused(sources, tmp_path, family, field):
    # [0, 1, 0, 1, 2, 3]: dense, MoE, dense, MoE, MoE, MoE, which no start / step describes
    out = tmp_path / "out"
    with pytest.raises(Refused) as refused:
        run_cli(["upscale", sources[family], out, "--duplicate", "0:2", "--no-progress"])
    assert field in str(refused.value) and "MoE layers at [1, 3, 4, 5]" in str(refused.value)
    assert not out.exists()


@pytest.mark.parametrize("family", ["ernie4_5_moe", "deepseek_v3"])
def test_dropping_the_dense_first_layer_refits_the_start(sources, tmp_path, family):
    fields = (
        {"moe_layer_start_index": 0, "moe_layer_end_index": 2}
        if family == "ernie4_5_moe"
        else {"first_k_dense_replace": 0}
    )
    _check_map(sources[family], tmp_path, ["prune", "--drop", "0"], [1, 2, 3], **fields)
