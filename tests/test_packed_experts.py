"""Mixtral checkpoints with packed experts (transformers >= 5's layout, which mergekit-moe writes):
``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]`` and the
router as ``mlp.gate.weight``. splice lists them as per-expert views of the same bytes.

The packed fixture is built here from a legacy tiny Mixtral with safetensors' own writer; the
reference for what the layout means is transformers' loader (same logits as the legacy folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import logits
from safetensors.torch import save_file
from test_checkpoint import reference_tensors

from splice import SpliceError, open_checkpoint
from splice.cli import main
from splice.convert import convert

LEGACY = "model.layers.{i}.block_sparse_moe."


def pack(src: Path, dst: Path, rows_extra: int = 0) -> Path:
    """``src`` (legacy per-expert Mixtral) with every layer's experts packed; ``rows_extra``
    appends rows to gate_up_proj to make a malformed file."""
    ref = reference_tensors(src)
    cfg = json.loads((src / "config.json").read_text())
    out = {n: t for n, t in ref.items() if ".block_sparse_moe." not in n}
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", LEGACY.format(i=i)
        experts = range(cfg["num_local_experts"])
        gate_up = [torch.cat([ref[f"{q}experts.{e}.w1.weight"], ref[f"{q}experts.{e}.w3.weight"]])
                   for e in experts]  # fmt: skip
        if rows_extra:
            gate_up = [torch.cat([g, g[:rows_extra]]) for g in gate_up]
        out[p + "mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[p + "mlp.experts.down_proj"] = torch.stack(
            [ref[f"{q}experts.{e}.w2.weight"] for e in experts]
        )
        out[p + "mlp.gate.weight"] = ref[q + "gate.weight"]
    dst.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in out.items()}, dst / "model.safetensors")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def packed(tiny_models, tmp_path_factory) -> Path:
    return pack(tiny_models["mixtral"], tmp_path_factory.mktemp("packed") / "moe")


def test_packed_experts_read_as_the_per_expert_layout(tiny_models, packed):
    legacy, ckpt = open_checkpoint(tiny_models["mixtral"]), open_checkpoint(packed)
    assert sorted(ckpt) == sorted(legacy)
    for name in legacy:
        assert ckpt[name].shape == legacy[name].shape, name
        assert torch.equal(ckpt.load(name), legacy.load(name)), name
    layers = legacy.num_layers
    assert len(ckpt.packed) == 3 * layers and all(
        n.startswith("model.layers.") for n in ckpt.packed
    )
    assert legacy.packed == []
    ckpt.validate()


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="transformers < 5 has no packed layout"
)
def test_transformers_reads_the_packed_layout_as_splice_does(tiny_models, packed):
    torch.testing.assert_close(logits(packed), logits(tiny_models["mixtral"]), rtol=0, atol=0)


def test_convert_writes_the_per_expert_layout_bit_for_bit(tiny_models, packed, tmp_path):
    out = convert(packed, tmp_path / "out")
    ours, ref = reference_tensors(out), reference_tensors(tiny_models["mixtral"])
    assert sorted(ours) == sorted(ref)
    assert all(torch.equal(ours[n], ref[n]) for n in ref)


def test_inspect_says_the_experts_are_packed(packed, capsys):
    assert main(["inspect", str(packed)]) == 0
    text = capsys.readouterr().out
    assert (
        "experts packed (mlp.experts.down_proj, mlp.experts.gate_up_proj, mlp.gate.weight)" in text
    )
    assert "block_sparse_moe.experts.{e}.w1.weight" in text


def test_unsplittable_packed_tensor_is_a_clear_error(tiny_models, tmp_path, capsys):
    bad = pack(tiny_models["mixtral"], tmp_path / "bad", rows_extra=1)
    with pytest.raises(SpliceError, match=r"cannot be split into w1\.weight, w3\.weight"):
        open_checkpoint(bad)
    assert main(["inspect", str(bad)]) == 2
    assert "mlp.experts.gate_up_proj: packed experts of shape" in capsys.readouterr().err
