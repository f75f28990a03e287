"""``splice extract-lora``: a fine-tune's difference from its base as a PEFT LoRA adapter.

The references are independent of splice's code: fine-tunes built as base + a planted low-rank
delta (so a rank-R adapter must reproduce them exactly), PEFT itself loading the adapter onto
the base (its logits against the fine-tune's, float32), singular values from
``torch.linalg.svdvals`` for the retained energy, and mergekit-extract-lora run on the same
inputs (compared module by module through ``B @ A``: singular vectors' signs are arbitrary).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import logits
from families import build
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from splice.cli import main
from splice.merge.extract_lora import extract_lora, lora_factors, low_rank
from splice.st_format import read_header

peft = pytest.importorskip("peft", reason="peft (the lora extra) is needed to load adapters")

needs_mergekit = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed"
)
MERGEKIT = Path(sys.executable).with_name("mergekit-extract-lora")


# ---- fine-tunes with planted deltas -----------------------------------------------------------
def planted(m: int, n: int, rank: int, seed: int, scales: list[float] | None = None):
    """A delta ``[m, n]`` of exactly ``rank``, singular values ``scales`` (default 0.3, 0.2, ...)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    s = torch.tensor(scales or [0.3 - 0.1 * i for i in range(rank)], dtype=torch.float64)
    return ((u * s) @ v.T).float()


def finetune(base: Path, dst: Path, deltas: dict) -> Path:
    """A copy of ``base`` whose tensors get ``deltas[name]`` added (a tensor, or a function of
    the name's shape)."""
    shutil.copytree(base, dst)
    sd = load_file(dst / "model.safetensors")
    for i, (name, d) in enumerate(deltas.items()):
        sd[name] = sd[name] + (d(sd[name].shape, i) if callable(d) else d)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def rank_k(k: int, scales: list[float] | None = None):
    return lambda shape, seed: planted(shape[0], shape[1], k, 100 + seed, scales)


LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.up_proj")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extract")
    base = build("llama", root / "base")
    two = {f"model.layers.{i}.{m}.weight": rank_k(2) for i in range(4) for m in LINEARS}
    mixed = {f"model.layers.{i}.self_attn.q_proj.weight": rank_k(1, [0.3]) for i in range(4)}
    mixed |= {f"model.layers.{i}.mlp.down_proj.weight": rank_k(3) for i in range(4)}
    embed = dict(two, **{"model.embed_tokens.weight": rank_k(2), "lm_head.weight": rank_k(2)})
    norm = dict(two, **{"model.layers.1.input_layernorm.weight": torch.full((32,), 0.25)})
    tied = build("llama", root / "tied", tie_word_embeddings=True)
    qwen = build("qwen2", root / "qwen2")
    bias = {
        f"model.layers.{i}.self_attn.{p}_proj.bias": lambda s, i: (
            0.1 * torch.randn(s, generator=torch.Generator().manual_seed(i))
        )
        for p in "qkv"
        for i in range(4)
    }
    return {
        "base": base,
        "two": finetune(base, root / "two", two),
        "mixed": finetune(base, root / "mixed", mixed),
        "embed": finetune(base, root / "embed", embed),
        "norm": finetune(base, root / "norm", norm),
        "tied": tied,
        "tied_ft": finetune(tied, root / "tied_ft", dict(two, **{"model.embed_tokens.weight": rank_k(2)})),
        "qwen2": qwen,
        "qwen2_ft": finetune(qwen, root / "qwen2_ft", dict(two, **bias)),
    }  # fmt: skip


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    """Logits of ``base`` with the adapter loaded by PEFT; PEFT must not report missing keys."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model, adapter)
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    assert not bad, bad
    return logits(model)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def products(folder: Path) -> dict[str, torch.Tensor]:
    """Module -> ``B @ A`` (the weight delta ``[out, in]`` its LoRA adds; embeddings transposed
    back to ``[vocab, hidden]``)."""
    t = adapter_tensors(folder)
    out = {}
    for key, a in t.items():
        for kind, b_key, transpose in (
            ("lora_A.weight", "lora_B.weight", False),
            ("lora_embedding_A", "lora_embedding_B", True),
        ):
            if key.endswith(kind):
                module = key.removeprefix("base_model.model.").removesuffix("." + kind)
                ba = t[key.replace(kind, b_key)].double() @ a.double()
                out[module] = ba.T if transpose else ba
    return out


def delta(ft: Path, base: Path, name: str) -> torch.Tensor:
    return (
        load_file(ft / "model.safetensors")[name].double()
        - load_file(base / "model.safetensors")[name].double()
    )


# ---- the identity: a planted rank-2 change comes back exactly ---------------------------------
def test_rank_2_reproduces_the_finetune(models, tmp_path):
    out = tmp_path / "lora"
    report = extract_lora(models["two"], models["base"], out, rank=2)
    ref = logits(models["two"])
    assert (peft_logits(models["base"], out) - ref).abs().max() < 1e-4
    assert (logits(models["base"]) - ref).abs().max() > 1e-2  # the change shows in the logits
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2
    assert sorted(config["target_modules"]) == sorted(m.split(".")[1] for m in LINEARS)
    assert config["rank_pattern"] == {} and not config["modules_to_save"]
    lora = report.by_action("lora")
    assert len(lora) == 16 and all(m.rank == 2 and m.energy > 1 - 1e-9 for m in lora)
    assert {m.module for m in report.by_action("unchanged")} >= {"model.embed_tokens", "lm_head"}
    for module, ba in products(out).items():
        assert torch.allclose(
            ba, delta(models["two"], models["base"], f"{module}.weight"), atol=1e-6
        )
    # PEFT's key names; splice's own reader and safetensors' accept the padded header
    keys = set(adapter_tensors(out))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight" in keys
    infos, _ = read_header(out / "adapter_model.safetensors")
    assert set(infos) == keys
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert set(f.keys()) == keys


def test_rank_1_keeps_the_energy_of_the_first_singular_value(models, tmp_path):
    out = tmp_path / "lora"
    report = extract_lora(models["two"], models["base"], out, rank=1)
    assert len(report.by_action("lora")) == 16
    products_ = products(out)
    for m in report.by_action("lora"):
        d = delta(models["two"], models["base"], f"{m.module}.weight")
        s = torch.linalg.svdvals(d)
        assert m.rank == 1
        assert m.energy < 1
        assert m.energy == pytest.approx(float(s[0] ** 2 / (s**2).sum()), rel=1e-6)
        residual = torch.linalg.matrix_norm(d - products_[m.module]) / torch.linalg.matrix_norm(d)
        assert float(residual) == pytest.approx(m.error, rel=1e-5)
        assert m.norm == pytest.approx(float(torch.linalg.matrix_norm(d)), rel=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1


def test_sv_epsilon_gives_per_module_ranks(models, tmp_path):
    out = tmp_path / "lora"
    report = extract_lora(models["mixed"], models["base"], out, rank=8, sv_epsilon=1e-3)
    ranks = {m.module: m.rank for m in report.by_action("lora")}
    assert ranks == {
        **{f"model.layers.{i}.self_attn.q_proj": 1 for i in range(4)},
        **{f"model.layers.{i}.mlp.down_proj": 3 for i in range(4)},
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.q_proj": 1 for i in range(4)}
    assert config["alpha_pattern"] == config["rank_pattern"]  # scale 1 everywhere
    assert (peft_logits(models["base"], out) - logits(models["mixed"])).abs().max() < 1e-4
    # without the threshold every module keeps rank 8 (numerical noise past the planted rank)
    plain = extract_lora(models["mixed"], models["base"], tmp_path / "plain", rank=8)
    assert {m.rank for m in plain.by_action("lora")} == {8}


# ---- embeddings, head, norms, biases ----------------------------------------------------------
def test_changed_embeddings_are_saved_whole(models, tmp_path):
    out = tmp_path / "lora"
    report = extract_lora(models["embed"], models["base"], out, rank=2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    saved = adapter_tensors(out)
    ft = load_file(models["embed"] / "model.safetensors")
    assert torch.equal(
        saved["base_model.model.model.embed_tokens.weight"], ft["model.embed_tokens.weight"]
    )
    assert torch.equal(saved["base_model.model.lm_head.weight"], ft["lm_head.weight"])
    assert [m.module for m in report.by_action("saved")] == ["lm_head", "model.embed_tokens"]
    assert (peft_logits(models["base"], out) - logits(models["embed"])).abs().max() < 1e-4


def test_embed_lora_decomposes_embedding_and_head(models, tmp_path):
    out = tmp_path / "lora"
    report = extract_lora(models["embed"], models["base"], out, rank=2, embed_lora=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config["modules_to_save"]
    assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    assert [m.module for m in report.by_action("lora-embedding")] == ["model.embed_tokens"]
    t = adapter_tensors(out)
    assert t["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (2, 96)
    assert t["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 2)
    ba = products(out)["model.embed_tokens"]
    assert torch.allclose(
        ba, delta(models["embed"], models["base"], "model.embed_tokens.weight"), atol=1e-6
    )
    assert (peft_logits(models["base"], out) - logits(models["embed"])).abs().max() < 1e-4


@pytest.mark.parametrize("embed_lora", [False, True])
def test_tied_embeddings_change_the_head_too(models, tmp_path, embed_lora):
    out = tmp_path / "lora"
    extract_lora(models["tied_ft"], models["tied"], out, rank=2, embed_lora=embed_lora)
    config = json.loads((out / "adapter_config.json").read_text())
    if embed_lora:
        assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    else:
        assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    ref = logits(models["tied_ft"])
    assert (logits(models["tied"]) - ref).abs().max() > 1e-2
    assert (peft_logits(models["tied"], out) - ref).abs().max() < 1e-4


def test_changed_norm_is_saved_or_skipped(models, tmp_path):
    out = tmp_path / "lora"
    extract_lora(models["norm"], models["base"], out, rank=2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.layers.1.input_layernorm"]
    assert (peft_logits(models["base"], out) - logits(models["norm"])).abs().max() < 1e-4
    skipped = extract_lora(
        models["norm"], models["base"], tmp_path / "skip", rank=2, skip_undecomposable=True
    )
    assert [m.module for m in skipped.by_action("skipped")] == ["model.layers.1.input_layernorm"]
    assert not json.loads((tmp_path / "skip" / "adapter_config.json").read_text())[
        "modules_to_save"
    ]


def test_changed_biases_become_lora_bias(models, tmp_path):
    out = tmp_path / "lora"
    extract_lora(models["qwen2_ft"], models["qwen2"], out, rank=2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    t = adapter_tensors(out)
    key = "base_model.model.model.layers.2.self_attn.k_proj.lora_B.bias"
    assert torch.allclose(t[key].double(), delta(models["qwen2_ft"], models["qwen2"], key.replace("base_model.model.", "").replace("lora_B.", "")), atol=1e-7)  # fmt: skip
    assert not t["base_model.model.model.layers.2.mlp.up_proj.lora_B.bias"].any()
    assert (peft_logits(models["qwen2"], out) - logits(models["qwen2_ft"])).abs().max() < 1e-4


def test_include_exclude_and_save_module(models, tmp_path):
    out = tmp_path / "inc"
    report = extract_lora(models["two"], models["base"], out, rank=2, include=[r"layers\.[01]\."], exclude=["up_proj"])  # fmt: skip
    assert sorted(m.module for m in report.by_action("lora")) == sorted(
        f"model.layers.{i}.{m}" for i in (0, 1) for m in LINEARS if m != "mlp.up_proj"
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]  # not every q_proj
    saved = extract_lora(models["two"], models["base"], tmp_path / "save", rank=2, save_modules=["lm_head", "model.layers.0.mlp.down_proj"])  # fmt: skip
    assert sorted(m.module for m in saved.by_action("saved")) == ["lm_head", "model.layers.0.mlp.down_proj"]  # fmt: skip
    assert (
        peft_logits(models["base"], tmp_path / "save") - logits(models["two"])
    ).abs().max() < 1e-4


# ---- the decomposition itself -----------------------------------------------------------------
def test_randomized_svd_reports_its_error():
    g = torch.Generator().manual_seed(0)
    m, n = 1100, 1030
    u, _ = torch.linalg.qr(torch.randn(m, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, 64, generator=g, dtype=torch.float64))
    s = 0.9 ** torch.arange(64, dtype=torch.float64)
    d = ((u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()
    fast = low_rank(d, 8)
    exact = low_rank(d, 8, method="exact")
    assert fast.method.startswith("randomized") and exact.method.startswith("exact")
    assert (
        fast.energy == pytest.approx(exact.energy, abs=2e-3) and fast.energy <= exact.energy + 1e-6
    )
    a, b = lora_factors(fast)
    residual = torch.linalg.matrix_norm(d.double() - b.double() @ a.double()) / torch.linalg.matrix_norm(d.double())  # fmt: skip
    assert float(residual) == pytest.approx(fast.error, rel=1e-3)


def test_distribute_scale_choices():
    d = planted(20, 12, 3, 7, [3.0, 2.0, 1.0]).double()
    lr = low_rank(d, 3)
    a, b = lora_factors(lr)
    assert torch.allclose(b.T @ b, a @ a.T, atol=1e-10)  # sqrt(S) on both sides
    a, b = lora_factors(lr, distribute_scale=False)
    assert torch.allclose(b.T @ b, torch.eye(3, dtype=b.dtype), atol=1e-10)  # B = U
    assert torch.allclose(torch.linalg.vector_norm(a, dim=1), lr.s, atol=1e-10)  # A = S V^T
    assert torch.allclose(b @ a, d, atol=1e-10)
    ae, be = lora_factors(lr, embedding=True)
    assert torch.allclose(be @ ae, d.T, atol=1e-10)


# ---- the CLI ----------------------------------------------------------------------------------
def test_cli_report_and_json(models, tmp_path, capsys):
    out = tmp_path / "lora"
    argv = ["extract-lora", str(models["mixed"]), str(models["base"]), str(out), "--rank", "4"]
    assert main([*argv, "--sv-epsilon", "1e-3", "--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {m["module"]: m for m in data["modules"]}
    assert rows["model.layers.0.mlp.down_proj"]["rank"] == 3
    assert rows["model.layers.0.mlp.down_proj"]["energy"] == pytest.approx(1.0)
    assert rows["lm_head"]["action"] == "unchanged"
    assert data["config"]["r"] == 3
    assert main([*argv, "--rank", "1", "--overwrite", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in text and "retained energy" in text
    assert f"wrote {out}" in text
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = (Path(root) / name).lstat()
            out[str(Path(root) / name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def odd_models(tmp_path_factory, models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    return {
        "qwen2": models["qwen2"],
        "wide": build("llama", root / "wide", intermediate_size=48),
        "bad_json": root,  # a folder without config.json
    }


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--rank", "0"], "--rank must be a whole number of 1 or more"),
        (["--rank", "-3"], "--rank must be"),
        (["--rank", "2", "--sv-epsilon", "-1"], "--sv-epsilon must be"),
        (["--rank", "2", "--sv-epsilon", "nan"], "--sv-epsilon must be"),
        (["--rank", "2", "--include", "layers.(["], "--include 'layers.([': not a regular"),
        (["--rank", "2", "--exclude", "*"], "--exclude '*': not a regular expression"),
        (["--rank", "2", "--save-module", "nope"], "--save-module 'nope': the model has no module"),
        (["--rank", "2", "--adapter-dtype", "int8"], "--adapter-dtype int8"),
        (["--rank", "2", "--svd", "fast"], "invalid choice"),
    ],
)
def test_refusals_before_any_read(models, tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setattr("splice.checkpoint.Checkpoint.load", _no_read)
    out = tmp_path / "out"
    fails(capsys, ["extract-lora", models["two"], models["base"], out, *extra], needle, out)


def _no_read(*args, **kwargs):
    raise AssertionError("a tensor was read before the input was checked")


@pytest.mark.parametrize(
    "which, needle",
    [
        ("missing", "no such folder"),
        ("bad_json", "not a model folder (no config.json)"),
        ("qwen2", "is 'qwen2' and the base"),
        ("wide", "not a fine-tune of this base"),
    ],
)
def test_refused_pairs(models, odd_models, tmp_path, capsys, monkeypatch, which, needle):
    monkeypatch.setattr("splice.checkpoint.Checkpoint.load", _no_read)
    ft = tmp_path / "nowhere" if which == "missing" else odd_models[which]
    out = tmp_path / "out"
    fails(capsys, ["extract-lora", ft, models["base"], out, "--rank", "2"], needle, out)


def test_refused_after_reading_writes_nothing(models, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["extract-lora", models["base"], models["base"], out, "--rank", "2"]
    fails(capsys, argv, "nothing to extract", out)
    fails(capsys, [*argv[:3], out, "--rank", "2", "--exclude", "proj"], "nothing to extract", out)


def test_output_folder_rules(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["extract-lora", models["two"], models["base"], out, "--rank", "2"]
    assert main([*map(str, argv), "--overwrite"]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    assert main([*map(str, argv[:3]), str(fresh), "--rank", "2"]) == 0
    assert main([*map(str, argv[:3]), str(fresh), "--rank", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*map(str, argv[:3]), str(fresh), "--rank", "1", "--overwrite"]) == 0
    assert json.loads((fresh / "adapter_config.json").read_text())["r"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]  # no litter


def fails(capsys, argv: list, needle: str, out: Path) -> None:
    """Exit 2, one line naming ``needle``, nothing written at or beside ``out``."""
    capsys.readouterr()
    before = snapshot(out.parent)
    rc = main([str(a) for a in argv])
    stdout, err = capsys.readouterr()
    assert rc == 2, (argv, stdout, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert not out.exists()
    assert snapshot(out.parent) == before


# ---- against mergekit-extract-lora ------------------------------------------------------------
@needs_mergekit
@pytest.mark.slow
@pytest.mark.parametrize("ft, rank", [("mixed", 2), ("embed", 3)])
def test_matches_mergekit(models, tmp_path, ft, rank):
    """Every module both adapters hold has the same ``B @ A``; mergekit's extra modules (zero
    adapters of unchanged Linears, norms and unchanged embeddings saved whole) add nothing."""
    theirs, ours = tmp_path / "mergekit", tmp_path / "splice"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(MERGEKIT), "--model", str(models[ft]), "--base-model", str(models["base"])]
    cmd += ["--out-path", str(theirs), "--max-rank", str(rank)]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    report = extract_lora(models[ft], models["base"], ours, rank=rank)
    mine, ref = products(ours), products(theirs)
    assert set(mine) <= set(ref)
    for module, ba in ref.items():
        if module in mine:
            assert torch.allclose(mine[module], ba, atol=1e-5), module
        else:  # unchanged: mergekit's zero adapter
            assert ba.abs().max() < 1e-6, module
    assert {m.module for m in report.by_action("lora")} == set(mine)
    theirs_t, ours_t = adapter_tensors(theirs), adapter_tensors(ours)
    for key, t in ours_t.items():  # whole modules: the same tensors
        if "lora_" not in key:
            assert torch.equal(t, theirs_t[key]), key
    base = logits(models["base"])
    assert (
        peft_logits(models["base"], ours) - peft_logits(models["base"], theirs)
    ).abs().max() < 1e-4
    assert (peft_logits(models["base"], ours) - base).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers on resize_token_embeddings
def test_grown_vocabulary_is_saved_whole_with_a_warning(models, tmp_path):
    """Added tokens: embedding and head are saved whole (whatever --embed-lora says); the base,
    resized to the new vocabulary, then loads the adapter and computes the fine-tune."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from splice.errors import SpliceWarning

    ft = tmp_path / "grown"
    shutil.copytree(models["two"], ft)
    sd = load_file(ft / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], 0.05 * torch.randn(4, 32, generator=g)])
    save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    out = tmp_path / "lora"
    with pytest.warns(SpliceWarning, match=r"resize_token_embeddings\(100\)"):
        extract_lora(ft, models["base"], out, rank=2, embed_lora=True)
    assert sorted(json.loads((out / "adapter_config.json").read_text())["modules_to_save"]) == [
        "lm_head",
        "model.embed_tokens",
    ]
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    model.resize_token_embeddings(100)
    model = PeftModel.from_pretrained(model, out)
    ids = torch.arange(90, 100).reshape(1, -1)  # the new tokens too
    assert (logits(model, ids) - logits(ft, ids)).abs().max() < 1e-4
