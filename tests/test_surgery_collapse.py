"""Expert collapsing against independent references: transformers' own Mixtral and Mistral
modules, MoE block inputs/outputs captured with forward hooks, numpy's lstsq, and identities
(identical experts are one dense MLP; a permutation of an expert's neurons is a symmetry)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from surgery_helpers import IDS, word_text
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from splice.cli import main
from splice.errors import SpliceError
from splice.surgery import Calibration, collapse, plan_collapse

torch.set_num_threads(1)
CALIB = Calibration(seq_len=16, max_samples=16, batch_size=8)
E, K, FF, H = 4, 2, 24, 32  # experts, top-k, expert width, hidden


def tiny_mixtral(path: Path, *, seed: int, same: bool = False, permute: bool = False, **cfg):
    """A random tiny Mixtral saved by transformers; ``same``: every expert of a layer equals
    its expert 0; ``permute``: then each expert's intermediate neurons shuffled (the same
    function)."""
    from conftest import make_tokenizer

    config = AutoConfig.for_model(
        "mixtral", vocab_size=96, hidden_size=H, intermediate_size=FF, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=E, num_experts_per_tok=K, bos_token_id=1, eos_token_id=2, **cfg,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            if "gate.weight" in name:  # a router that prefers some experts
                p.mul_(20.0)
        for layer in model.model.layers:
            ex = layer.mlp.experts
            if same:
                ex.gate_up_proj[:] = ex.gate_up_proj[0].clone()
                ex.down_proj[:] = ex.down_proj[0].clone()
            if permute:
                for e in range(E):
                    p = torch.randperm(FF, generator=g)
                    gate, up = ex.gate_up_proj[e, :FF].clone(), ex.gate_up_proj[e, FF:].clone()
                    ex.gate_up_proj[e] = torch.cat([gate[p], up[p]])
                    ex.down_proj[e] = ex.down_proj[e][:, p].clone()
    model.save_pretrained(path)
    make_tokenizer(96).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("collapse")
    text = root / "text.txt"
    text.write_text(word_text(words=6000))
    return {
        "random": tiny_mixtral(root / "random", seed=0),
        "same": tiny_mixtral(root / "same", seed=1, same=True, sliding_window=8),
        "permuted": tiny_mixtral(root / "permuted", seed=2, same=True, permute=True),
        "text": text,
    }


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load(folder)(IDS).logits


def block_rows(folder: Path, calib: Calibration = CALIB) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the MoE block's input and output rows ``[n, H]`` on the calibration windows,
    captured by hooks on transformers' own Mixtral (float64 copies)."""
    from splice.calib import calibration_text, token_windows
    from splice.modeling import load_tokenizer

    model = load(folder)
    text = calibration_text(Path(folder).parent / "text.txt")
    ids = token_windows(load_tokenizer(folder), text, calib.seq_len, calib.max_samples)
    seen: dict[int, tuple] = {}
    hooks = [
        layer.mlp.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, (a[0].reshape(-1, H), o.reshape(-1, H)))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [(seen[i][0].double().numpy(), seen[i][1].double().numpy()) for i in sorted(seen)]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})  # noqa: SIM118
    return out


def experts_of(model: torch.nn.Module, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ex = model.model.layers[layer].mlp.experts
    gu = ex.gate_up_proj.detach().double().numpy()
    return gu[:, :FF], gu[:, FF:], ex.down_proj.detach().double().numpy()


DENSE = [
    dict(method="uniform"),
    dict(method="frequency"),
    dict(method="slice"),
]


@pytest.mark.parametrize("kw", DENSE, ids=lambda k: k["method"])
def test_identical_experts_collapse_to_the_dense_mlp(kw, models, tmp_path):
    src = models["same"]
    res = collapse(src, tmp_path / "o", calibration=models["text"], calib=CALIB, **kw)
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]
    assert cfg["sliding_window"] == 8 and "num_local_experts" not in cfg
    assert cfg["intermediate_size"] == FF
    out = load(res.out)
    assert isinstance(out, MistralForCausalLM)
    # the reference: a Mistral built by hand from the source's attention and expert 0
    moe = load(src)
    mixtral_cfg = {k: v for k, v in moe.config.to_dict().items() if k != "model_type"}
    ref = MistralForCausalLM(MistralConfig(**mixtral_cfg))  # same attention, window, rope
    sd = {k: v for k, v in moe.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(moe.model.layers):
        ex = layer.mlp.experts
        sd[f"model.layers.{i}.mlp.gate_proj.weight"] = ex.gate_up_proj[0, :FF]
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = ex.gate_up_proj[0, FF:]
        sd[f"model.layers.{i}.mlp.down_proj.weight"] = ex.down_proj[0]
    ref.load_state_dict(sd)
    with torch.no_grad():
        want = ref.eval()(IDS).logits
        got = out(IDS).logits
        theirs = moe(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want, theirs, atol=1e-5, rtol=1e-5)  # the fixture is what it says
    assert all(r.error < 1e-5 for r in res.report.layers)


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="uniform", align=True),
        dict(method="frequency", align=True),
        dict(method="slice"),
        dict(keep_experts=2, align=True),
    ],
    ids=["uniform", "frequency", "slice", "keep2"],
)
def test_permuted_identical_experts_collapse_exactly_with_align(kw, models, tmp_path):
    src = models["permuted"]
    res = collapse(src, tmp_path / "o", calibration=models["text"], calib=CALIB, **kw)
    torch.testing.assert_close(logits(res.out), logits(src), atol=1e-5, rtol=1e-5)
    for r in res.report.layers:
        assert r.error < 1e-5
        if kw.get("align"):
            assert r.moved > 0.8 and r.spread_after < 1e-10 < r.spread_before
            assert r.error_unaligned > 0.05  # averaging unaligned neurons destroys the MLP


def test_unaligned_average_of_permuted_experts_is_wrong(models, tmp_path):
    res = collapse(models["permuted"], tmp_path / "o", method="uniform")
    assert res.report.layers[0].error is None  # no calibration: no error to report
    diff = (logits(res.out) - logits(models["permuted"])).abs().max()
    assert diff > 1e-2


@pytest.mark.parametrize("prune", [False, True], ids=["merge", "prune"])
def test_keeping_every_expert_leaves_the_logits_unchanged(prune, models, tmp_path):
    src = models["random"]
    res = collapse(src, tmp_path / "o", keep_experts=E, prune=prune,
                   calibration=models["text"], calib=CALIB)  # fmt: skip
    assert [r.groups for r in res.report.layers] == [[[0], [1], [2], [3]]] * 2
    torch.testing.assert_close(logits(res.out), logits(src), atol=1e-6, rtol=0)


def test_keep_k_rewrites_the_config_and_the_router(models, tmp_path):
    src = models["random"]
    for prune in (False, True):
        out = tmp_path / f"o{prune}"
        res = collapse(src, out, keep_experts=2, top_k=1, prune=prune,
                       calibration=models["text"], calib=CALIB)  # fmt: skip
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 1
        assert cfg["model_type"] == "mixtral"
        model = load(out)
        src_t, out_t = tensors(src), tensors(out)
        for i, r in enumerate(res.report.layers):
            members = sorted(e for g in r.groups for e in g)
            if prune:  # two distinct experts, one per group
                assert len(set(members)) == 2 and all(len(g) == 1 for g in r.groups)
            else:  # the groups partition the experts
                assert members == list(range(E))
            router = model.model.layers[i].mlp.gate.weight.detach()
            assert router.shape == (2, H)
            if prune:  # the kept experts' own router rows and weights
                kept = [g[0] for g in r.groups]
                src_router = src_t[f"model.layers.{i}.block_sparse_moe.gate.weight"]
                torch.testing.assert_close(router, src_router[kept])
                for j, e in enumerate(kept):
                    name = f"model.layers.{i}.block_sparse_moe.experts.{{}}.w2.weight"
                    torch.testing.assert_close(out_t[name.format(j)], src_t[name.format(e)])
            else:
                p = np.array(r.probability)
                for g, members in enumerate(r.groups):
                    w = p[members] / p[members].sum()
                    rows = src_t[f"model.layers.{i}.block_sparse_moe.gate.weight"].double()
                    want = (torch.tensor(w)[:, None] * rows[members]).sum(0)
                    torch.testing.assert_close(router[g].double(), want, atol=1e-6, rtol=1e-6)
        assert np.isfinite(logits(out).numpy()).all()


def test_prune_keeps_the_best_subset_by_hand(models, tmp_path):
    """NAEE: every pair of experts tried by hand, on the hooked MoE inputs / outputs."""
    from itertools import combinations

    src = models["random"]
    res = plan_collapse(src, keep_experts=2, prune=True, calibration=models["text"], calib=CALIB)
    model = load(src)
    act = torch.nn.functional.silu
    for i, (x, y) in enumerate(block_rows(src)):
        w1, w3, w2 = experts_of(model, i)
        router = model.model.layers[i].mlp.gate.weight.detach().double().numpy()
        logits_ = x @ router.T
        outs = np.stack([(act(torch.tensor(x @ w1[e].T)).numpy() * (x @ w3[e].T)) @ w2[e].T
                         for e in range(E)])  # fmt: skip

        def err(keep, logits_=logits_, outs=outs, y=y):
            z = logits_[:, keep]
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = np.zeros_like(p)
            top = np.argsort(-p, axis=1)[:, :K]
            np.put_along_axis(g, top, np.take_along_axis(p, top, 1), 1)
            g /= g.sum(1, keepdims=True)
            yh = np.einsum("ne,enh->nh", g, outs[keep])
            return np.linalg.norm(y - yh) / np.linalg.norm(y)

        best = min(combinations(range(E), 2), key=lambda c: err(list(c)))
        assert [g[0] for g in res.report.layers[i].groups] == list(best)
        assert res.report.layers[i].error == pytest.approx(err(list(best)), rel=1e-4)


def test_frequency_weights_equal_a_hand_computation(models, tmp_path):
    src = models["random"]
    res = collapse(src, tmp_path / "o", method="frequency", calibration=models["text"], calib=CALIB)
    model, out = load(src), tensors(res.out)
    for i, (x, _) in enumerate(block_rows(src)):
        router = model.model.layers[i].mlp.gate.weight.detach().double().numpy()
        z = x @ router.T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mass = p.sum(0)
        w = mass / mass.sum()
        rec = res.report.layers[i]
        np.testing.assert_allclose(rec.probability, p.mean(0), rtol=1e-5)
        np.testing.assert_allclose(rec.weights, w, rtol=1e-5)
        assert rec.tokens == x.shape[0]
        w1, w3, w2 = experts_of(model, i)
        for name, stack in (("gate_proj", w1), ("up_proj", w3), ("down_proj", w2)):
            want = np.einsum("e,e...->...", w, stack)
            got = out[f"model.layers.{i}.mlp.{name}.weight"].double().numpy()
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
        assert rec.probability != pytest.approx([1 / E] * E, abs=1e-3)  # a real weighting


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_slice_refit_matches_numpy_lstsq(ridge, models, tmp_path):
    src, width = models["random"], 2 * FF
    res = collapse(src, tmp_path / "o", method="slice", intermediate_size=width, ridge=ridge,
                   calibration=models["text"], calib=CALIB)  # fmt: skip
    model, out = load(src), tensors(res.out)
    act = torch.nn.functional.silu
    for i, (x, y) in enumerate(block_rows(src)):
        w1, w3, _ = experts_of(model, i)
        stacked = w1.reshape(E * FF, H)
        gate = out[f"model.layers.{i}.mlp.gate_proj.weight"].double().numpy()
        up = out[f"model.layers.{i}.mlp.up_proj.weight"].double().numpy()
        # which of the E*FF neurons were kept: the rows of the output's gate_proj
        picks = [int(np.flatnonzero((stacked == row).all(1))[0]) for row in gate]
        assert len(set(picks)) == width
        np.testing.assert_array_equal(up, w3.reshape(E * FF, H)[picks])
        h = act(torch.tensor(x @ gate.T)).numpy() * (x @ up.T)  # [n, width]
        lam = ridge * np.trace(h.T @ h) / width
        a = np.vstack([h, np.sqrt(lam) * np.eye(width)])
        b = np.vstack([y, np.zeros((width, H))])
        want = np.linalg.lstsq(a, b, rcond=None)[0].T  # [H, width]
        got = out[f"model.layers.{i}.mlp.down_proj.weight"].double().numpy()
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=1e-3)
        err = np.linalg.norm(y - h @ want.T) / np.linalg.norm(y)
        assert res.report.layers[i].error == pytest.approx(err, rel=1e-3, abs=1e-6)
        assert sum(res.report.layers[i].neurons) == width


def test_slice_beats_uniform_on_a_random_moe(models, tmp_path):
    kw = dict(calibration=models["text"], calib=CALIB)
    uni = plan_collapse(models["random"], method="uniform", **kw).report
    sl = plan_collapse(models["random"], method="slice", **kw).report
    assert sl.mean_error() < uni.mean_error()
    assert all(r.error < r.error_before_refit for r in sl.layers)


def test_dry_run_and_json(models, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["collapse", str(models["random"]), str(out), "--method", "slice",
            "--calibration", str(models["text"]), "--seq-len", "16", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dense mistral MLP of 24" in text and "mlp.down_proj.weight" in text
    assert not out.exists()
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["out"] == str(out) and len(data["layers"]) == 2
    assert json.loads((out / "splice_surgery.json").read_text())["method"] == "slice"


def test_streaming_never_loads_the_model_whole(models, monkeypatch):
    """The calibration run reads each expert tensor for one layer at a time: a model built by
    from_pretrained is never made."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("from_pretrained called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    res = plan_collapse(models["random"], method="frequency", calibration=models["text"],
                        calib=CALIB)  # fmt: skip
    assert len(res.report.layers) == 2


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, models) -> dict[str, Path]:
    from conftest import make_tiny, make_tokenizer

    root = tmp_path_factory.mktemp("bad")
    short = root / "short.txt"
    short.write_text("w1 w2 w3")
    cfg = AutoConfig.for_model(
        "qwen2_moe", vocab_size=96, hidden_size=H, intermediate_size=FF, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16,
    )  # fmt: skip
    qwen = root / "qwen"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(qwen)
    make_tokenizer(96).save_pretrained(qwen)
    biased = root / "gpt_oss"
    cfg = AutoConfig.for_model(
        "gpt_oss", vocab_size=96, hidden_size=H, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        head_dim=8, layer_types=["full_attention"],
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(biased)
    make_tokenizer(96).save_pretrained(biased)
    return {"dense": make_tiny(root / "dense", "mistral", layers=1), "short": short, "qwen": qwen,
            "biased": biased}  # fmt: skip


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("dense", [], "is a dense model"),
        ("biased", ["--method", "slice", "--calibration", "TEXT"], "experts have biases"),
        ("qwen", [], "norm_topk_prob false), so a token's routed experts add up"),
        ("moe", ["--keep-experts", "5", "--calibration", "TEXT"], "has only 4 experts"),
        ("moe", ["--keep-experts", "1", "--calibration", "TEXT"], "give --top-k"),
        ("moe", ["--keep-experts", "2", "--top-k", "3", "--calibration", "TEXT"], "more than the 2"),
        ("moe", ["--method", "slice"], "needs --calibration"),
        ("moe", ["--method", "frequency", "--calibration", "/no/such.txt"], "no such calibration"),
        ("moe", ["--method", "slice", "--calibration", "SHORT"], "too short"),
        ("moe", ["--method", "slice", "--align", "--calibration", "TEXT"], "--align is for"),
        ("moe", ["--prune"], "give --keep-experts"),
        ("moe", ["--method", "uniform", "--intermediate-size", "8"], "for --method slice"),
        ("moe", ["--method", "slice", "--intermediate-size", "97", "--calibration", "TEXT"],
         "more than the 96 neurons"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(which, extra, message, models, bad_models,
                                               tmp_path, capsys):  # fmt: skip
    src = models["random"] if which == "moe" else bad_models[which]
    swap = {"TEXT": str(models["text"]), "SHORT": str(bad_models["short"])}
    extra = [swap.get(a, a) for a in extra]
    out = tmp_path / "o"
    code = main(["collapse", str(src), str(out), *extra, "--seq-len", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_api_errors_are_splice_errors(models):
    with pytest.raises(SpliceError, match="choose from"):
        plan_collapse(models["random"], method="mean")
    text = models["text"]
    for kw, message in [
        (dict(keep_experts=2, by="reap", calibration=text), "give --prune"),
        (
            dict(keep_experts=2, prune=True, by="size", calibration=text),
            "choose from frequency, naee, reap",
        ),
        (dict(shared_gate="mean"), "give --calibration"),
        (dict(shared_gate="half", calibration=text), "choose from keep, mean"),
        (dict(keep_experts=2, shared_gate="mean", calibration=text), "for a dense result"),
    ]:
        with pytest.raises(SpliceError, match=message):
            plan_collapse(models["random"], **kw)


def test_neuron_selection_is_scipys_pivoted_qr():
    """The greedy pick order equals column-pivoted QR's (scipy), up to which of two identical
    columns comes first, with the Gram matrix formed or each column computed on demand; a
    duplicated column is never picked twice."""
    from scipy.linalg import qr

    from splice.surgery.collapse_math import select_neurons

    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 120, generator=g, dtype=torch.float64)
    h = torch.cat([h, h[:, :40]], dim=1)  # 40 neurons duplicated (as in identical experts)
    scale = torch.rand(160, generator=g, dtype=torch.float64) + 0.5
    scale[120:] = scale[:40]
    _, piv = qr((h * scale).numpy(), mode="r", pivoting=True)
    twin = 120  # column j >= 120 is column j - 120: a pair ties exactly, and which of the
    # two a QR takes first is decided by rounding (LAPACK builds differ), so compare neurons
    for limit in (8192, 0):
        picks, gains = select_neurons(h, scale, 100, gram_limit=limit)
        assert [p % twin for p in picks] == [int(p) % twin for p in piv[:100]]
        assert len({p % twin for p in picks}) == 100 and all(x > 0 for x in gains)


def test_packed_checkpoints_collapse_as_the_per_expert_layout(models, tmp_path):
    from test_packed_experts import pack

    packed = pack(models["random"], tmp_path / "packed")
    (tmp_path / "text.txt").write_text(models["text"].read_text())
    kw = dict(method="slice", calibration=models["text"], calib=CALIB)
    a = collapse(models["random"], tmp_path / "a", **kw)
    b = collapse(packed, tmp_path / "b", **kw)
    assert [r.error for r in a.report.layers] == [r.error for r in b.report.layers]
    torch.testing.assert_close(logits(a.out), logits(b.out), rtol=0, atol=0)


def test_upcycled_experts_keep_their_neurons(models, tmp_path):
    """Experts up-cycled from one dense MLP (plus noise) already correspond neuron for neuron:
    alignment moves nothing and uniform lands on the dense MLP up to the noise's mean."""
    from analysis_helpers import upcycle_moe
    from conftest import make_tiny

    dense = make_tiny(tmp_path / "dense", "mistral", layers=2, seed=5)
    moe = upcycle_moe(dense, tmp_path / "moe", experts=4, noise=0.05)
    res = collapse(moe, tmp_path / "o", method="uniform", align=True,
                   calibration=models["text"], calib=CALIB)  # fmt: skip
    assert all(r.moved == 0.0 and r.error < 0.05 for r in res.report.layers)
    torch.testing.assert_close(logits(res.out), logits(dense), atol=0.05, rtol=0)


def test_a_summary_without_calibration_shows_no_empty_rows(models):
    """uniform without calibration measures nothing per layer: one line says so, instead of
    a row of dashes per layer."""
    text = plan_collapse(models["random"], method="uniform").report.summary()
    assert "error -" not in text and "[-]" not in text
    assert "MoE layer" in text and "collapsed from the weights alone" in text
