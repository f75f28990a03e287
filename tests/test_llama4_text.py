"""Llama 4's text model (``llama4_text``, transformers' ``Llama4ForCausalLM``) as splice reads and
writes it, beyond the family battery (tests/test_families.py, tests/test_arch_moe.py):

- its experts are stored packed as transformers keeps them in memory and saves them:
  ``feed_forward.experts.gate_up_proj`` ``[E, H, 2I]`` (input-major, the gate's columns then the
  up projection's: ``chunk(2)``, not interleaved) and ``feed_forward.experts.down_proj``
  ``[E, I, H]``; the spec's per-expert views compute what transformers' experts compute;
- a linear merge writes them packed again, the mix of the sources' tensors; a layer map moves
  them byte for byte; dense layers (``intermediate_size_mlp`` wide) and MoE layers (a router, a
  shared expert) follow ``moe_layers``, ``no_rope_layers`` and ``layer_types`` through the map;
- collapse refuses in one line (exit code 2, nothing written): the router scales each chosen
  expert's *input* by the sigmoid of its logit (checked here on transformers' module), which
  collapse's ``sum g_e(x) E_e(x)`` cannot express; slicing runs (the family battery);
- Maverick's config as transformers saves it (``interleave_moe_layer_step: 2`` beside the
  ``moe_layers`` it implies): a map that keeps the alternation keeps the step, one that breaks it
  rewrites ``moe_layers``, which transformers reads first.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import families
import family_checks as fc
import pytest
import torch

from splice import ArchSpec, open_checkpoint
from splice.cli import main

torch.set_num_threads(1)
FAMILY = "llama4_text"
BASE = ["--device", "cpu", "--threads", "1", "--dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llama4")


@pytest.fixture(scope="module")
def src(work) -> Path:
    """The battery's build: dense layers 0 and 2, MoE layers 1 and 3 (``moe_layers``)."""
    return fc.source(FAMILY, work)


@pytest.fixture(scope="module")
def maverick(work) -> Path:
    """Every second layer MoE by ``interleave_moe_layer_step: 2`` (moe_layers computed)."""
    with fc.quiet():
        return families.build(
            FAMILY, work / "maverick", moe_layers=None, interleave_moe_layer_step=2
        )


def _cli(argv: list) -> tuple[int, str]:
    err = io.StringIO()
    with fc.quiet(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def test_the_files_hold_packed_experts_and_splice_lists_them_per_expert(src):
    spec = ArchSpec.load(FAMILY)
    cfg = fc.read_config(src)
    assert cfg["moe_layers"] == [1, 3] and cfg["intermediate_size_mlp"] != cfg["intermediate_size"]
    names = fc.tensor_names(src)
    assert not [n for n in names if spec.parse(n).group == "other"]
    ckpt = open_checkpoint(src)
    ckpt.validate()
    assert sorted(ckpt.packed) == sorted(
        spec.layer_name(i, k) for i in (1, 3) for k in spec.experts.stored
    )
    per_expert = {n for n in ckpt if spec.parse(n).expert is not None}
    assert {spec.parse(n).layer for n in per_expert} == {1, 3}
    assert len(per_expert) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    intermediate, hidden = cfg["intermediate_size"], cfg["hidden_size"]
    for kind in spec.experts.tensors:
        shape = (hidden, intermediate) if kind.startswith("down") else (intermediate, hidden)
        assert ckpt[spec.layer_name(1, kind, 2)].shape == shape, kind
    for i in (0, 2):  # dense layers: the MLP, no router, no shared expert
        assert ckpt[spec.layer_name(i, "feed_forward.gate_proj.weight")].shape == (
            cfg["intermediate_size_mlp"],
            hidden,
        )
        assert spec.layer_name(i, "feed_forward.router.weight") not in ckpt


def test_the_views_compute_what_transformers_experts_compute(src):
    """Each expert's gate / up / down views, as Linear weights ``[out, in]``, give transformers'
    ``Llama4TextExperts`` output for that expert (a wrong half, an interleave or a missing
    transpose would not)."""
    spec = ArchSpec.load(FAMILY)
    ckpt = open_checkpoint(src)
    model = fc.load_checked(src, "source")
    experts = model.model.layers[1].feed_forward.experts
    n, tokens = spec.num_experts(ckpt.config), 5
    x = torch.randn(tokens, ckpt.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = experts(x.repeat(n, 1)).view(n, tokens, -1)
    for e in range(n):
        w = {k.split("_")[0]: ckpt.load(spec.layer_name(1, k, e)) for k in spec.experts.tensors}
        want = (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
        torch.testing.assert_close(got[e], want, rtol=1e-5, atol=1e-6)


def test_inspect(src):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["inspect", str(src), "--json"]) == 0
    report = json.loads(out.getvalue())
    assert report["model_type"] == FAMILY and not report["arch_inferred"]
    assert (report["num_experts"], report["experts_per_token"]) == (4, 2)
    assert report["packed"] == sorted(ArchSpec.load(FAMILY).experts.stored)
    assert report["dense_layers"] == [0, 2]
    for block in report["layer_blocks"]:  # dense and MoE layers never share a block
        assert len({i in (1, 3) for i in block["layers"]}) == 1, block["layers"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["inspect", str(src)]) == 0


def test_a_linear_merge_writes_the_mix_packed(work, src):
    other = fc.source(FAMILY, work, seed=1)
    out = work / "merged"
    recipe = work / "merge.yml"
    recipe.write_text(
        "merge_method: linear\ndtype: float32\nparameters: {normalize: false}\nmodels:\n"
        f"  - model: {src}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {other}\n    parameters: {{weight: 0.7}}\n"
    )
    fc.run_cli(["merge", recipe, out, "--no-progress"])
    a, b, got = fc.read_tensors(src), fc.read_tensors(other), fc.read_tensors(out)
    assert set(got) == set(a)  # packed as the sources, no per-expert name written
    mixed = {k: 0.3 * a[k] + 0.7 * b[k] for k in a}
    for name, t in got.items():
        torch.testing.assert_close(t, mixed[name], rtol=0, atol=1e-6)
    model = fc.load_checked(out)
    ref = fc.load_checked(fc.write_reference(work / "mixed", fc.read_config(src), mixed))
    want = fc.logits(ref)
    fc.distinct(want, fc.logits(fc.load_checked(src, "source")), "source")
    fc.compare(fc.logits(model), want)


@pytest.mark.parametrize(
    ("verb", "args", "mapping"),
    [
        ("prune", ["--drop", "0"], [1, 2, 3]),
        ("upscale", ["--layers", "0,1,1,2,3"], [0, 1, 1, 2, 3]),
    ],
    ids=["prune", "upscale"],
)
def test_a_layer_map_moves_packed_experts_and_the_layer_fields(work, src, verb, args, mapping):
    out = work / f"{verb}-out"
    fc.run_cli([verb, src, out, *args, *BASE])
    cfg, source_cfg = fc.read_config(out), fc.read_config(src)
    assert cfg["moe_layers"] == [j for j, i in enumerate(mapping) if i in source_cfg["moe_layers"]]
    for key in ("no_rope_layers", "layer_types"):
        assert cfg[key] == [source_cfg[key][i] for i in mapping], key
    a, got = fc.read_tensors(src), fc.read_tensors(out)
    want = fc.mapped_tensors(a, mapping)
    assert set(got) == set(want)
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    model = fc.load_checked(out)
    fc.config_follows(model, fc.mapped_config(source_cfg, mapping))
    ref = fc.load_checked(fc.write_reference(work / f"{verb}-ref", cfg, want), "reference")
    fc.compare(fc.logits(model), fc.logits(ref))


@pytest.mark.parametrize("verb", ["collapse"])
def test_collapse_refuses_in_one_line(work, src, verb):
    out = work / f"{verb}-refused"
    text = fc.calibration_file(work)
    args = ["--calibration", text, *fc.SLICE_CALIB] if verb == "slice" else []
    code, err = _cli([verb, src, out, *args, *BASE])
    errors = [ln for ln in err.splitlines() if ln.startswith("splice: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "llama4_text" in errors[0] and "not supported" in errors[0]
    assert not out.exists()


def test_the_router_scales_the_experts_inputs(src):
    """The fact behind collapse's refusal: with every expert equal, the MoE block is
    ``shared(x) + sum_k E(sigmoid(l_k) x)`` over the top-k logits, not ``shared(x) + (sum_k
    sigmoid(l_k)) E(x)``, the form a dense MLP (a mean of experts) can stand for."""
    model = fc.load_checked(src, "source")
    block = model.model.layers[1].feed_forward
    with torch.no_grad():
        for p in (block.experts.gate_up_proj, block.experts.down_proj):
            p.copy_(p[:1].expand_as(p))
        x = torch.randn(6, block.hidden_dim, generator=torch.Generator().manual_seed(1))
        got, _ = block(x)
        top = torch.topk(block.router(x)[1], block.top_k, dim=1).values.sigmoid()
        w = block.experts.gate_up_proj[0]
        gate_w, up_w = w.chunk(2, dim=-1)

        def expert(h):
            return (torch.nn.functional.silu(h @ gate_w) * (h @ up_w)) @ block.experts.down_proj[0]

        shared = block.shared_expert(x)
        scaled_inputs = shared + sum(expert(top[:, k : k + 1] * x) for k in range(block.top_k))
        scaled_outputs = shared + top.sum(1, keepdim=True) * expert(x)
    torch.testing.assert_close(got, scaled_inputs, rtol=1e-5, atol=1e-6)
    assert (got - scaled_outputs).abs().max() > 1e-3


def test_maverick_keeps_its_alternation_through_a_map(work, maverick):
    cfg = fc.read_config(maverick)
    assert cfg["interleave_moe_layer_step"] == 2 and cfg["moe_layers"] == [1, 3]
    out = work / "maverick-up"
    fc.run_cli(["upscale", maverick, out, "--duplicate", "1:3", *BASE])  # [0, 1, 2, 1, 2, 3]
    assert fc.read_config(out)["moe_layers"] == [1, 3, 5]
    fc.load_checked(out)


def test_maverick_prunes_a_dense_layer(work, maverick):
    out = work / "maverick-pruned"
    fc.run_cli(["prune", maverick, out, "--drop", "2", *BASE])  # MoE layers [1, 2]
    assert fc.read_config(out)["moe_layers"] == [1, 2]
    fc.load_checked(out)
