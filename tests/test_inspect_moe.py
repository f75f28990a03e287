"""``splice inspect`` of MoE families: expert count and top-k from each family's own config key
(or either spelling of it), the shared experts, and which layers are dense."""

from __future__ import annotations

import json
import os

import pytest
from family_checks import run_cli
from test_layer_config import MOE, _build

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    ("family", "dense", "shared"),
    [
        ("qwen2_moe", [0, 2], ["mlp.shared_expert"]),  # decoder_sparse_step 2
        ("deepseek_v3", [0], ["mlp.shared_experts"]),  # first_k_dense_replace 1
        ("ernie4_5_moe", [0], []),  # moe_layer_start_index 1, no shared experts
    ],
)
def test_inspect_reports_experts_shared_experts_and_dense_layers(family, dense, shared, tmp_path):
    src = _build(family, tmp_path / family)
    data = json.loads(run_cli(["inspect", src, "--json"]))
    assert (data["num_experts"], data["experts_per_token"]) == (4, 2)
    assert data["dense_layers"] == dense and data["shared_experts"] == shared
    text = run_cli(["inspect", src])
    assert "experts 4 (top-2)" in text and "dense layers" in text


def test_either_spelling_of_the_expert_count_is_read(tmp_path):
    """Qwen3-MoE: transformers 5 writes num_local_experts, hub configs say num_experts."""
    from splice.arch import ArchSpec

    spec = ArchSpec.load("qwen3_moe")
    assert spec.num_experts({"num_experts": 128}) == 128
    assert spec.num_experts({"num_local_experts": 64}) == 64
    assert spec.config_with_experts({"num_experts": 128}, 8)["num_experts"] == 8
    assert MOE  # the shared tiny configs
