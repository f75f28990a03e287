"""Experts stored packed on disk (gpt-oss, GraniteMoE; splice.stored): every expert tensor read
as the module's own parameter slice, written packed again, and moved byte for byte.

References: transformers' own modules (the parameter a view must equal), the stored tensors
read with safetensors (the written files), and the layout's inverse (pack of take).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import build
from safetensors import safe_open

from splice import SpliceError
from splice.checkpoint import Checkpoint
from splice.cli import main
from splice.execute import TensorTask
from splice.stored import StoredLayout, pack_tasks


def stored(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stored")
    return {
        "gpt_oss": build("gpt_oss", root / "gpt_oss"),
        "gpt_oss_b": build("gpt_oss", root / "gpt_oss_b", seed=1),
        "granitemoe": build("granitemoe", root / "granitemoe"),
    }


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("parts", [1, 2])
def test_pack_inverts_take(interleaved: bool, transposed: bool, parts: int) -> None:
    layout = StoredLayout(tuple(f"p{j}" for j in range(parts)), interleaved, transposed)
    block = torch.randn(6, 4 * parts) if transposed else torch.randn(4 * parts, 6)
    taken = [layout.take(block, j) for j in range(parts)]
    assert all(t.shape == layout.part_shape(tuple(block.shape)) for t in taken)
    assert torch.equal(layout.pack(taken), block)
    assert layout.block_shape(taken[0].shape) == tuple(block.shape)


def test_views_are_the_modules_experts(models) -> None:
    """Every per-expert view equals the slice of transformers' packed parameter the module uses
    (gpt-oss: ``gate_up[..., ::2]`` is gate, input-major; GraniteMoE: ``chunk(2)``)."""
    from transformers import AutoModelForCausalLM

    for family, prefix in (("gpt_oss", "mlp.experts"), ("granitemoe", "block_sparse_moe.experts")):
        ckpt = Checkpoint(models[family])
        sd = AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32).state_dict()
        layer = "model.layers.1."
        gate_up, down = sd[f"{layer}{prefix}.gate_up_proj"], sd[f"{layer}{prefix}.down_proj"]
        assert ckpt.packed and all(n not in ckpt.tensors for n in ckpt.packed)
        for e in range(gate_up.shape[0]):

            def view(kind: str, e: int = e, at: str = f"{layer}{prefix}") -> torch.Tensor:
                return ckpt.load(f"{at}.{e}.{kind}", dtype="float32")  # noqa: B023

            if family == "gpt_oss":
                want = {
                    "gate_proj.weight": gate_up[e][:, ::2].T,
                    "up_proj.weight": gate_up[e][:, 1::2].T,
                    "down_proj.weight": down[e].T,
                    "gate_proj.bias": sd[f"{layer}{prefix}.gate_up_proj_bias"][e][::2],
                    "up_proj.bias": sd[f"{layer}{prefix}.gate_up_proj_bias"][e][1::2],
                    "down_proj.bias": sd[f"{layer}{prefix}.down_proj_bias"][e],
                }
            else:
                gate, up = gate_up[e].chunk(2)
                want = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down[e]}
            for kind, w in want.items():
                assert torch.equal(view(kind), w), (family, e, kind)


def test_upscale_moves_stored_experts_byte_for_byte(models, tmp_path) -> None:
    src = models["gpt_oss"]
    out = tmp_path / "up"
    assert main(["upscale", str(src), str(out), "--layers", "0,1,1", "--no-progress"]) == 0
    a, b = stored(src), stored(out)
    for kind in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        for j, i in enumerate((0, 1, 1)):
            name = f"mlp.experts.{kind}"
            assert torch.equal(b[f"model.layers.{j}.{name}"], a[f"model.layers.{i}.{name}"])
    assert not any(".experts.0." in n for n in b), "per-expert names written"
    from splice.surgery.upscale import plan_upscale
    from splice.verify import stored_plan

    plan = stored_plan(plan_upscale(src, layers="0,1,1").plan)
    packed = [t for t in plan.tasks if ".experts." in t.name]
    assert len(packed) == 3 * 4 and all(t.is_plain_copy(plan.models) for t in packed)


def test_merge_writes_stored_experts_packed(models, tmp_path) -> None:
    """A linear merge of two gpt-oss models: each packed tensor is the mix of the stored ones."""
    a, b = models["gpt_oss"], models["gpt_oss_b"]
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: linear\ndtype: float32\nparameters: {normalize: false}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.7}}\n"
    )
    out = tmp_path / "m"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    sa, sb, so = stored(a), stored(b), stored(out)
    assert set(so) == set(sa)
    for name in so:
        want = 0.3 * sa[name].float() + 0.7 * sb[name].float()
        torch.testing.assert_close(so[name], want, rtol=1e-6, atol=1e-6)


def test_an_incomplete_expert_set_is_refused(models) -> None:
    ckpt = Checkpoint(models["granitemoe"])
    spec, key = ckpt.arch, str(ckpt.path)
    tasks = [
        TensorTask.copy(n, key, n, info)
        for n, info in ckpt.tensors.items()
        if ".experts.1." not in n or "up_proj" not in n
    ]
    with pytest.raises(SpliceError, match=r"cannot be packed.*no up_proj\.weight of expert 1"):
        pack_tasks(tasks, spec, {key: ckpt})
