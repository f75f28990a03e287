"""``splice collapse`` on every MoE family, against transformers' own modules: tiny models (4 layers, hidden 32, 4 experts, ``families.SMALL``) built
with a dense layer and shared experts where the family has them (``test_arch_moe.DEFAULT``),
DeepSeek-V3 with two expert groups and selection biases that are not zero.

- identical routed experts collapse to a model with the MoE's logits (routing weights that sum
  to a constant: ``norm_topk_prob: true``; DeepSeek-V2, which never renormalises, routes every
  token to all 4 experts; ``routed_scaling_factor`` 2.5 / 2.0 where the family has it), in the
  family's most compact exact form (a dense sibling, one routed expert, or experts every token
  chooses), and the output loads with no missing or unexpected key;
- ``--keep-experts E`` (merge and prune) leaves the logits unchanged;
- a pruned model loads, its routers are the kept experts' rows (and selection biases), its
  experts the kept ones, and its config counts them;
- REAP's saliency equals a hand computation on transformers' own router and experts;
- gpt-oss and GraniteMoE, whose experts are packed on disk, read and written packed the same
  way (gpt-oss's biased experts and router bias included; its ``slice`` refused in one line).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import families
import family_checks as fc
import numpy as np
import pytest
import test_arch_moe as arch_moe
import torch

from splice.arch import ArchSpec
from splice.errors import SpliceError
from splice.surgery import Calibration, collapse, plan_collapse

torch.set_num_threads(1)
CALIB = Calibration(seq_len=16, max_samples=8, batch_size=8)
E = families.SMALL["num_experts"]

#: config beyond families.SMALL / test_arch_moe.DEFAULT: weights that sum to a constant
ROUTING: dict[str, dict[str, Any]] = {
    "mixtral": {},
    "qwen2_moe": dict(norm_topk_prob=True),
    "qwen3_moe": dict(norm_topk_prob=True),
    "qwen3_next": dict(families.FAMILIES["qwen3_next"], mlp_only_layers=[0], norm_topk_prob=True),
    "olmoe": dict(norm_topk_prob=True),
    "deepseek_v2": dict(num_experts_per_tok=E, routed_scaling_factor=2.0),  # never renormalised
    "deepseek_v3": dict(n_group=2, topk_group=1),  # norm_topk_prob and 2.5 by default
    "glm4_moe": dict(norm_topk_prob=True, routed_scaling_factor=1.5),
    "dots1": dict(norm_topk_prob=True),
    "ernie4_5_moe": {},  # always renormalised
    "granitemoe": {},  # the softmax of the top-k logits
    "gpt_oss": {},
}
#: the written form of a dense collapse of each family's main build, and its model type
FORM = {
    "mixtral": ("sibling", "mistral"),
    "qwen2_moe": ("one-expert", "qwen2_moe"),  # the shared expert's sigmoid gate kept exact
    "qwen3_moe": ("one-expert", "qwen3_moe"),  # layer 0 is a dense MLP of another width
    "qwen3_next": ("one-expert", "qwen3_next"),
    "olmoe": ("one-expert", "olmoe"),
    "deepseek_v2": ("one-expert", "deepseek_v2"),
    "deepseek_v3": ("split", "deepseek_v3"),  # one expert cannot run its group top-2
    "glm4_moe": ("split", "glm4_moe"),
    "dots1": ("split", "dots1"),
    "ernie4_5_moe": ("one-expert", "ernie4_5_moe"),
    "granitemoe": ("sibling", "granite"),
    "gpt_oss": ("one-expert", "gpt_oss"),  # no dense gpt-oss exists
}
#: the router and selection-bias kinds (layer-relative) of each family
ROUTER = {f: "block_sparse_moe.gate.weight" if f == "mixtral" else "mlp.gate.weight" for f in FORM}
ROUTER.update(granitemoe="block_sparse_moe.router.layer.weight", gpt_oss="mlp.router.weight")
BIAS = {
    "gpt_oss": "mlp.router.bias",  # added to the logits
    "deepseek_v3": "mlp.gate.e_score_correction_bias",
    "glm4_moe": "mlp.gate.e_score_correction_bias",
    "dots1": "mlp.gate.e_score_correction_bias",
    "ernie4_5_moe": "mlp.moe_statics.e_score_correction_bias",
}


def config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    default = AutoConfig.for_model(family)
    aliases = getattr(default, "attribute_map", {})
    fields = {k: v for k, v in families.SMALL.items() if hasattr(default, k) or k in aliases}
    fields.update(arch_moe.DEFAULT.get(family, {}))
    fields.update(ROUTING[family])
    fields.update(overrides)
    cfg = AutoConfig.for_model(family, **fields)
    n = fields["num_hidden_layers"]
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) != n:
        cfg.layer_types = cfg.layer_types[:n]
    return cfg


def build(family: str, folder: Path, *, same: bool, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random model (every weight perturbed, routers sharpened, selection biases not
    zero); ``same``: every routed expert of a layer equal to its expert 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with fc.quiet():
        model = AutoModelForCausalLM.from_config(config(family, **overrides), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            if name.endswith((".gate.weight", ".router.weight")) and "shared" not in name:
                p.mul_(20.0)  # a router that prefers some experts
        for layer in model.model.layers:
            mlp = moe_block(layer)
            if not hasattr(mlp, "experts"):
                continue
            for name, b in [*mlp.named_buffers(), *mlp.named_parameters()]:
                if name.endswith("e_score_correction_bias"):
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
            if same:
                for p in mlp.experts.parameters():
                    p[:] = p[0].clone()  # gpt-oss's biases too
        with fc.quiet():
            model.save_pretrained(folder)
            fc.tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collapse_families")
    fc.calibration_file(root)
    return root


@pytest.fixture(scope="module", params=list(FORM))
def fam(request, work) -> dict[str, Any]:
    family = request.param
    if not families.known(family):
        pytest.skip(f"transformers has no {family!r}")
    start = time.perf_counter()
    built = {
        "family": family,
        "same": build(family, work / family / "same", same=True),
        "random": build(family, work / family / "random", same=False, seed=1),
        "text": work / "sources" / "calibration.txt",
    }
    built["seconds"] = time.perf_counter() - start
    return built


def moe_block(layer: Any) -> Any:
    """A decoder layer's MLP block (GraniteMoE calls it ``block_sparse_moe``)."""
    return layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe


def source_logits(folder: Path) -> torch.Tensor:
    return fc.logits(fc.load_checked(folder, "source"))


def block_inputs(model: Any, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per MoE layer, the input of its MoE block on ``ids`` (a forward hook on transformers'
    module)."""
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Any:
        return lambda module, args, output: seen.__setitem__(i, args[0])

    hooks = [
        layer.mlp.register_forward_hook(keep(i))
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "experts")
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def run(src: Path, out: Path, **kw: Any) -> Any:
    with fc.quiet():
        return collapse(src, out, **kw)


# ---- dense results ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["uniform", "frequency"])
def test_identical_experts_collapse_to_the_same_logits(fam, method, tmp_path):
    family, src = fam["family"], fam["same"]
    kw = {} if method == "uniform" else dict(calibration=fam["text"], calib=CALIB)
    res = run(src, tmp_path / "o", method=method, **kw)
    report = res.report
    cfg = fc.read_config(res.out)
    assert (report.form, cfg["model_type"]) == FORM[family]
    out = fc.load_checked(res.out)  # nothing missing, unexpected or of another shape
    want = source_logits(src)
    diff = (fc.logits(out) - want).abs().max().item()
    assert diff < 1e-5, f"{family} {method}: max abs logit diff {diff:.3g}"
    assert report.params_after < report.params_before
    if method == "frequency":
        assert all(r.error < 1e-5 for r in report.layers), [r.error for r in report.layers]
    moe = fc.read_config(src)
    if report.form == "sibling":
        assert (
            "num_local_experts" not in cfg and cfg["intermediate_size"] == report.intermediate_size
        )
        return
    written = ArchSpec.load(family).num_experts(cfg)
    if report.form == "one-expert":
        assert written == 1
    else:  # two experts of 8 neurons, both chosen, the shared experts counted in 8s
        assert written == 2 and cfg["moe_intermediate_size"] == 8 and cfg["n_shared_experts"] == 2
        assert cfg["n_group"] == 1 and cfg["topk_group"] == 1
    for key in ("mlp_only_layers", "first_k_dense_replace", "moe_layer_start_index"):
        assert cfg.get(key) == moe.get(key), key  # the dense layers stay where they were


def test_slice_of_identical_experts_is_exact_too(fam, tmp_path):
    """slice keeps one expert's neurons and refits the down projection to the routed experts'
    part of the block output (shared experts taken out): exact up to the ridge. gpt-oss's
    biased experts are refused (the refit has no bias term)."""
    src = fam["same"]
    if fam["family"] == "gpt_oss":
        with pytest.raises(SpliceError, match=r"experts have biases.*use uniform or frequency"):
            plan_collapse(src, method="slice", calibration=fam["text"], calib=CALIB)
        return
    res = run(src, tmp_path / "o", method="slice", calibration=fam["text"], calib=CALIB)
    got = fc.logits(fc.load_checked(res.out))
    torch.testing.assert_close(got, source_logits(src), atol=1e-4, rtol=0)


def test_uniform_needs_calibration_when_the_routed_mass_varies(tmp_path):
    """OLMoE with norm_topk_prob false: a token's top-2 softmax probabilities sum to less than
    1, by how much depends on the token; frequency scales the mean by its calibration mean."""
    family = "olmoe"
    src = build(family, tmp_path / "src", same=True, norm_topk_prob=False)
    with pytest.raises(SpliceError, match=r"norm_topk_prob false.*give one"):
        plan_collapse(src)
    text = fc.calibration_file(tmp_path)
    res = run(src, tmp_path / "o", method="frequency", calibration=text, calib=CALIB)
    for r in res.report.layers:
        assert 0.5 < r.mass < 1.0 and r.mass == r.mass_measured
        assert r.error < 0.1  # identical experts: only the token-dependent mass is lost
    assert any("routed mass not constant" in n for n in res.report.notes)


def test_a_dense_sibling_where_the_widths_agree(tmp_path):
    """Qwen3-MoE with no dense layer (or dense layers of the experts' width) is written as
    Qwen3, with the MoE attention's head_dim (Qwen3's default would be 128)."""
    text = fc.calibration_file(tmp_path)
    for name, over in (
        ("no_dense", dict(mlp_only_layers=[])),
        ("same", dict(intermediate_size=16)),
    ):
        src = build("qwen3_moe", tmp_path / name, same=True, **over)
        res = run(src, tmp_path / f"o_{name}", method="frequency", calibration=text, calib=CALIB)
        cfg = fc.read_config(res.out)
        assert res.report.form == "sibling" and cfg["model_type"] == "qwen3"
        assert cfg["intermediate_size"] == 16 and cfg["head_dim"] == 8
        assert "mlp_only_layers" not in cfg and "num_local_experts" not in cfg
        got = fc.logits(fc.load_checked(res.out))
        torch.testing.assert_close(got, source_logits(src), atol=1e-5, rtol=0)


def test_qwen2_shared_gate_folded_at_its_mean(tmp_path):
    """``shared_gate="mean"``: Qwen2-MoE written as Qwen2, the shared expert's neurons
    concatenated after the collapsed experts' with its down projection times the sigmoid gate's
    calibration mean (hooked on transformers' own module), the approximation's cost reported."""
    from splice.calib import calibration_text, token_windows
    from splice.modeling import load_tokenizer

    text = fc.calibration_file(tmp_path)
    src = build("qwen2_moe", tmp_path / "src", same=True, mlp_only_layers=[])
    res = run(src, tmp_path / "o", method="frequency", calibration=text, calib=CALIB,
              shared_gate="mean")  # fmt: skip
    cfg = fc.read_config(res.out)
    assert res.report.form == "sibling" and cfg["model_type"] == "qwen2"
    assert cfg["intermediate_size"] == 16 + 16
    model = fc.load_checked(src, "source")
    ids = token_windows(load_tokenizer(src), calibration_text(text), 16, 8)
    seen = block_inputs(model, ids)
    out = fc.read_tensors(res.out)
    for i, layer in enumerate(model.model.layers):
        x = seen[i].reshape(-1, 32)
        mean_gate = torch.sigmoid(layer.mlp.shared_expert_gate(x)).mean().item()
        rec = res.report.layers[i]
        assert rec.shared_gate_mean == pytest.approx(mean_gate, rel=1e-4)
        # identical experts collapse exactly: the gate's mean is all the layer's error
        assert rec.shared_gate_error == pytest.approx(rec.error, rel=1e-4) and rec.error > 1e-3
        down = out[f"model.layers.{i}.mlp.down_proj.weight"]
        shared_down = layer.mlp.shared_expert.down_proj.weight.detach()
        torch.testing.assert_close(down[:, 16:], shared_down * mean_gate, atol=1e-5, rtol=1e-4)
        expert_down = layer.mlp.experts.down_proj[0].detach()  # every expert alike; mass 1
        torch.testing.assert_close(down[:, :16], expert_down, atol=1e-6, rtol=1e-5)
    got = fc.logits(fc.load_checked(res.out))
    assert (got - source_logits(src)).abs().max() < 0.5  # close, not exact: the gate varies
    assert any("mean sigmoid gate" in n for n in res.report.notes)
    with pytest.raises(SpliceError, match=r"layers \[0\] are dense MLPs of 64 neurons, not 32"):
        plan_collapse(build("qwen2_moe", tmp_path / "dense", same=True), method="frequency",
                      calibration=text, calib=CALIB, shared_gate="mean")  # fmt: skip


# ---- fewer experts ------------------------------------------------------------------------------
@pytest.mark.parametrize("prune", [False, True], ids=["merge", "prune"])
def test_keeping_every_expert_leaves_the_logits(fam, prune, tmp_path):
    src = fam["random"]
    res = run(src, tmp_path / "o", keep_experts=E, prune=prune, calibration=fam["text"],
              calib=CALIB)  # fmt: skip
    assert all(r.groups == [[e] for e in range(E)] for r in res.report.layers)
    assert not res.report.notes  # DeepSeek-V3's two expert groups stay
    got = fc.logits(fc.load_checked(res.out))
    torch.testing.assert_close(got, source_logits(src), atol=1e-5, rtol=0)


@pytest.mark.parametrize("by", ["naee", "frequency", "reap"])
def test_a_pruned_model_routes_only_to_the_kept_experts(fam, by, tmp_path):
    family, src = fam["family"], fam["random"]
    res = run(src, tmp_path / "o", keep_experts=2, top_k=2, prune=True, by=by, calibration=fam["text"],
              calib=CALIB)  # fmt: skip
    model = fc.load_checked(res.out)  # nothing missing or unexpected
    cfg = model.config
    assert ArchSpec.load(family).num_experts(fc.read_config(res.out)) == 2
    src_t, out_t = fc.read_tensors(src), fc.read_tensors(res.out)
    for rec in res.report.layers:
        kept = [g[0] for g in rec.groups]
        assert len(set(kept)) == 2 and all(len(g) == 1 for g in rec.groups)
        i = rec.layer
        router = f"model.layers.{i}.{ROUTER[family]}"
        torch.testing.assert_close(out_t[router], src_t[router][kept], rtol=0, atol=0)
        mlp = moe_block(model.model.layers[i])  # transformers' module routes among the 2 kept
        router_module = mlp.gate if hasattr(mlp, "gate") else mlp.router
        assert router_module.weight.shape[0] == 2 and mlp.experts.gate_up_proj.shape[0] == 2
        if family in BIAS:
            bias = f"model.layers.{i}.{BIAS[family]}"
            torch.testing.assert_close(out_t[bias], src_t[bias][..., kept], rtol=0, atol=0)
        kinds = [n for n in src_t if n.startswith(f"model.layers.{i}.") and ".experts.0." in n]
        for j, e in enumerate(kept):
            for name in kinds:
                torch.testing.assert_close(
                    out_t[name.replace(".experts.0.", f".experts.{j}.")],
                    src_t[name.replace(".experts.0.", f".experts.{e}.")],
                    rtol=0,
                    atol=0,
                )
        stored = ArchSpec.load(family).experts.stored  # packed on disk: expert e is row e
        for kind in stored:
            name = f"model.layers.{i}.{kind}"
            torch.testing.assert_close(out_t[name], src_t[name][kept], rtol=0, atol=0)
        assert kinds or stored, "no expert tensor compared"
        assert not any(f".layers.{i}." in n and ".experts.2." in n for n in out_t)
        if by == "frequency":  # the 2 experts in the most tokens' top-k
            order = sorted(range(E), key=lambda e: (-rec.frequency[e], e))
            assert kept == sorted(order[:2])
    if family == "deepseek_v3":  # 1 expert left per group: the groups go, the report says so
        assert cfg.n_group == 1 and cfg.topk_group == 1
        assert any("expert groups dropped" in n for n in res.report.notes)
    assert torch.isfinite(fc.logits(model)).all()


def test_keep_one_expert_is_refused_where_the_router_needs_two(tmp_path):
    src = build("glm4_moe", tmp_path / "src", same=False)
    text = fc.calibration_file(tmp_path)
    with pytest.raises(SpliceError, match="needs at least 2 experts"):
        plan_collapse(src, keep_experts=1, top_k=1, prune=True, calibration=text, calib=CALIB)


def test_reap_saliency_is_the_hand_computation(tmp_path):
    """REAP on transformers' own modules: the MoE block inputs hooked on the calibration windows,
    the router's own top-k weights (OLMoE, not renormalised; DeepSeek-V3: sigmoid scores chosen
    with their bias, renormalised, times 2.5), each expert's output norm from its weights, the
    mean of weight x norm over the tokens routed to it; the k highest are kept. DeepSeek-V2's
    group-limited greedy routing and ERNIE's selection bias and clamped renormalisation too."""
    from splice.calib import calibration_text, token_windows
    from splice.modeling import load_tokenizer

    text = fc.calibration_file(tmp_path)
    v2_groups = dict(topk_method="group_limited_greedy", n_group=2, topk_group=1)
    for family, over in (
        ("olmoe", dict(norm_topk_prob=False)),
        ("deepseek_v3", {}),
        ("deepseek_v2", dict(v2_groups, num_experts_per_tok=2)),
        ("ernie4_5_moe", {}),
    ):
        src = build(family, tmp_path / family, same=False, seed=4, **over)
        res = plan_collapse(src, keep_experts=2, prune=True, by="reap", calibration=text,
                            calib=CALIB)  # fmt: skip
        model = fc.load_checked(src, "source")
        ids = token_windows(load_tokenizer(src), calibration_text(text), 16, 8)
        seen = block_inputs(model, ids)
        assert [r.layer for r in res.report.layers] == sorted(seen)
        for rec in res.report.layers:
            mlp = model.model.layers[rec.layer].mlp
            x = seen[rec.layer].reshape(-1, 32).double()
            with torch.no_grad():
                _, weights, index = mlp.gate(seen[rec.layer].reshape(-1, 32))
            weights, index = weights.double().numpy(), index.numpy()
            gu, down = mlp.experts.gate_up_proj.detach().double(), mlp.experts.down_proj.detach()
            want = np.zeros(E)
            for e in range(E):
                rows, slot = np.nonzero(index == e)
                if len(rows) == 0:
                    continue
                gate, up = (x[rows] @ gu[e].T).chunk(2, dim=-1)
                out = (torch.nn.functional.silu(gate) * up) @ down[e].double().T
                want[e] = np.mean(weights[rows, slot] * torch.linalg.norm(out, dim=-1).numpy())
            np.testing.assert_allclose(rec.saliency, want, rtol=1e-4, atol=1e-7)
            assert [g[0] for g in rec.groups] == sorted(np.argsort(-want, kind="stable")[:2])
            assert len(set(np.round(want, 6))) == E  # no ties: the choice is meaningful
        assert res.report.prune_by == "reap" and "--by reap" in res.report.operation


# ---- the report ---------------------------------------------------------------------------------
def test_the_report_and_the_record(fam, tmp_path):
    """The parameter counts are the files', the summary says the form, the record reads back."""
    src = fam["same"]
    res = run(src, tmp_path / "o", method="uniform")
    count = sum(t.numel() for t in fc.read_tensors(src).values())
    assert res.report.params_before == count
    assert res.report.params_after == sum(t.numel() for t in fc.read_tensors(res.out).values())
    text = res.report.summary()
    assert "parameters" in text and res.report.out_model_type in text
    record = json.loads((res.out / "splice_surgery.json").read_text())
    assert record["form"] == res.report.form and record["params_after"] == res.report.params_after


def test_the_cli_takes_by_and_shared_gate(tmp_path):
    """``collapse --prune --by reap`` and ``--shared-gate mean`` reach the Python API."""
    text = fc.calibration_file(tmp_path)
    calib = ["--calibration", text, "--seq-len", "24", "--max-samples", "8", "--device", "cpu"]
    src = build("qwen2_moe", tmp_path / "src", same=False, mlp_only_layers=[])
    fc.run_cli(["collapse", src, tmp_path / "reap", "--keep-experts", "2", "--prune",
                "--by", "reap", "--json", *calib])  # fmt: skip
    record = json.loads((tmp_path / "reap" / "splice_surgery.json").read_text())
    assert "--by reap" in json.dumps(record)
    assert fc.read_config(tmp_path / "reap")["num_experts"] == 2
    fc.run_cli(["collapse", src, tmp_path / "mean", "--method", "frequency",
                "--shared-gate", "mean", *calib])  # fmt: skip
    assert fc.read_config(tmp_path / "mean")["model_type"] == "qwen2"
