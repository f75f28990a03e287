"""Quantized checkpoints in, quantized checkpoints out: splice's verbs on FP8 block-scaled,
compressed-tensors FP8 and MXFP4 models, against independent references.

The quantized models are tiny ones of tests/families.py, quantized here (tests/quant_helpers.py):
FP8 by transformers' own ``Fp8Quantize`` op, MXFP4 by a brute-force OCP quantizer in the layout
transformers' Mxfp4 integration reads, compressed-tensors by its documented formula. The
references: transformers' dequantization (``FineGrainedFP8Config`` / ``Mxfp4Config(dequantize=
True)``; its automatic CPU fallback is not used: for some MoE families it loads the raw FP8
values without their scales), the formula (compressed-tensors, whose package is optional),
the stored bytes (moved tensors), and the same verb run on the dequantized copies.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tokenizer
from families import build
from quant_helpers import (
    BF16,
    FP8,
    config_of,
    ct_dequantize,
    e4m3_steps,
    hf_fp8_dequantize,
    hf_fp8_quantize,
    make_ct,
    make_fp8,
    make_mxfp4,
    raw,
    read_tensors,
    same_experts,
    to_bf16,
    write_model,
)
from safetensors.torch import save_file
from surgery_helpers import IDS, word_text
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config
from transformers.quantizers import AutoQuantizationConfig

from splice.checkpoint import open_checkpoint
from splice.cli import main

torch.set_num_threads(1)
BLOCK = (16, 16)
CALIB = ["--calibration", "", "--seq-len", "16", "--max-samples", "8", "--device", "cpu"]


# ---- running splice and transformers -------------------------------------------------------
def splice(*args: object) -> tuple[int, str, str]:
    """``splice ARGS`` in process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def ok(*args: object) -> str:
    rc, out, err = splice(*args)
    assert rc == 0, err
    return out


def hf(folder: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """transformers' model of ``folder``, a quantized one dequantized by transformers itself."""
    qc = config_of(folder).get("quantization_config") or {}
    kw: dict = {"dtype": dtype} if dtype is not None else {}
    if qc.get("quant_method") == "fp8":
        kw["quantization_config"] = FineGrainedFP8Config(dequantize=True)
    elif qc.get("quant_method") == "mxfp4":
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def rearranged(model: torch.nn.Module, order: list[int]) -> torch.nn.Module:
    """``model`` with its decoder layers run in ``order`` (its own modules, nothing copied)."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in order])
    cfg = model.config
    cfg.num_hidden_layers = len(order)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in order]
    return model


def quant_parts(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Quantized weight -> its stored parts (values first), read off the names."""
    out = {}
    for name in tensors:
        if name + "_scale_inv" in tensors:
            out[name] = [name, name + "_scale_inv"]
        elif name + "_scale" in tensors:
            extra = name.removesuffix("weight") + "input_scale"
            out[name] = [name, name + "_scale"] + ([extra] if extra in tensors else [])
        elif name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            out[base] = [name, base + "_scales"]
    return out


def layer_tensors(tensors: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s tensors by their name inside the layer."""
    prefix = f"model.layers.{layer}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in name, dtype, shape or bytes."""
    bad = sorted(set(a) ^ set(b))
    return bad + [
        k
        for k in sorted(set(a) & set(b))
        if a[k].dtype != b[k].dtype
        or a[k].shape != b[k].shape
        or not torch.equal(raw(a[k]), raw(b[k]))
    ]


def dequantized_copy(src: Path, dst: Path) -> Path:
    """``src`` (FP8 block-scaled) with every weight dequantized by transformers' op, bf16."""
    tensors = read_tensors(src)
    block = tuple(config_of(src)["quantization_config"]["weight_block_size"])
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = t if scale is None else hf_fp8_dequantize(t, scale, block)
    return write_model(src, dst, out, quantization_config=None)


# ---- the models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama as bf16, FP8 16x16, compressed-tensors per tensor / per channel; one with a
    24-wide MLP (partial edge blocks) as bf16 and FP8 16x16."""
    root = tmp_path_factory.mktemp("dense")
    src = build("llama", root / "f32")
    partial = build("llama", root / "f32_partial", intermediate_size=24)
    return {
        "bf16": to_bf16(src, root / "bf16"),
        "fp8": make_fp8(src, root / "fp8", BLOCK),
        "ct_tensor": make_ct(src, root / "ct_tensor", "tensor"),
        "ct_channel": make_ct(src, root / "ct_channel", "channel"),
        "partial_bf16": to_bf16(partial, root / "partial_bf16"),
        "partial_fp8": make_fp8(partial, root / "partial_fp8", BLOCK),
    }


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict[str, Path]:
    """Mixtral (per-expert FP8 weights) and gpt-oss (MXFP4 experts), each random and with
    identical experts; a calibration text."""
    root = tmp_path_factory.mktemp("moe")
    text = root / "text.txt"
    text.write_text(word_text(words=2000))
    out: dict[str, Path] = {"text": text}
    for family, make in (("mixtral", make_fp8), ("gpt_oss", make_mxfp4)):
        for kind in ("random", "same"):
            src = build(family, root / f"{family}_{kind}_f32")
            if kind == "same":
                same_experts(src)
            q = make(src, root / f"{family}_{kind}")
            make_tokenizer(96).save_pretrained(q)
            out[f"{family}_{kind}"] = q
    out["gpt_oss_bf16"] = to_bf16(root / "gpt_oss_random_f32", root / "gpt_oss_bf16")
    return out


# ---- 1. inspect ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "words", "block"),
    [
        ("fp8", ("fp8", "16x16"), [16, 16]),
        ("ct_tensor", ("compressed-tensors", "tensor"), None),
        ("ct_channel", ("compressed-tensors", "channel"), None),
        ("mxfp4", ("mxfp4",), None),
    ],
)
def test_inspect_names_the_quantization(model, words, block, dense, moe):
    folder = moe["gpt_oss_random"] if model == "mxfp4" else dense[model]
    stored = read_tensors(folder)
    parts = quant_parts(stored)
    n_parts = sum(len(p) for p in parts.values())
    stored_bytes = sum(stored[p].nbytes for ps in parts.values() for p in ps)

    data = json.loads(ok("inspect", "--json", folder))
    q = data["quantization"]
    assert q["method"] == config_of(folder)["quantization_config"]["quant_method"]
    assert all(w in q["format"] for w in words), q["format"]
    assert q["block_size"] == block
    assert q["tensors"] == len(parts)
    assert q["logical_dtype"] == "bfloat16"
    assert q["stored_bytes"] == stored_bytes
    assert q["unquantized"] == len(stored) - n_parts
    assert data["params_by_dtype"] == {"bfloat16": data["num_params"]}  # logical tensors

    (line,) = [x for x in ok("inspect", folder).splitlines() if x.startswith("quantized")]
    assert q["format"] in line and f"{len(parts)} tensors stored quantized" in line
    assert "read as bfloat16" in line and f"{len(stored) - n_parts} tensors as stored" in line


def test_plain_model_has_no_quantization(dense):
    assert json.loads(ok("inspect", "--json", dense["bf16"]))["quantization"] is None
    assert "quantized" not in ok("inspect", dense["bf16"])


# ---- 2. dequantization equals transformers' own ------------------------------------------------
def fused_mixtral(ckpt, name: str) -> torch.Tensor:
    """transformers' fused Mixtral expert / router parameter from splice's per-expert tensors."""
    if ckpt.config["model_type"] != "mixtral":
        return ckpt.load(name)
    m = re.fullmatch(
        r"(model\.layers\.\d+\.)mlp\.(gate\.weight|experts\.(gate_up_proj|down_proj))", name
    )
    if m is None:
        return ckpt.load(name)
    p = m.group(1) + "block_sparse_moe."
    if m.group(3) is None:
        return ckpt.load(p + "gate.weight")
    n = ckpt.config["num_local_experts"]
    if m.group(3) == "down_proj":
        return torch.stack([ckpt.load(f"{p}experts.{e}.w2.weight") for e in range(n)])
    return torch.stack(
        [
            torch.cat([ckpt.load(f"{p}experts.{e}.{w}.weight") for w in ("w1", "w3")])
            for e in range(n)
        ]
    )


@pytest.mark.parametrize("model", ["fp8", "mixtral_random", "gpt_oss_random"])
def test_dequantization_equals_transformers(model, dense, moe):
    folder = dense.get(model) or moe[model]
    ckpt = open_checkpoint(folder)
    theirs = hf(folder).state_dict()  # bf16, dequantized by transformers
    quantized = set(quant_parts(read_tensors(folder)))  # FP8: X.weight; MXFP4: X
    seen = 0
    for name, want in theirs.items():
        got = fused_mixtral(ckpt, name)  # other families: ckpt.load(name)
        assert got.dtype == want.dtype == BF16 and got.shape == want.shape, name
        assert torch.equal(raw(got), raw(want)), name
        seen += name in quantized
    assert seen >= 8  # the quantized weights were among them (Mixtral: its attention)


def test_partial_edge_blocks_dequantize_as_zero_padded_blocks(dense):
    folder = dense["partial_fp8"]
    stored, ckpt = read_tensors(folder), open_checkpoint(folder)
    down = stored["model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert down.shape == (2, 2)  # [32, 24] in 16x16 blocks: a partial column of blocks
    for name in quant_parts(stored):
        want = hf_fp8_dequantize(stored[name], stored[name + "_scale_inv"], BLOCK)
        assert torch.equal(raw(ckpt.load(name)), raw(want)), name


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_compressed_tensors_dequantize_by_the_formula(strategy, dense):
    folder = dense[f"ct_{strategy}"]
    stored, ckpt = read_tensors(folder), open_checkpoint(folder)
    parts = quant_parts(stored)
    assert len(parts) == 28 and all(
        len(p) == (3 if strategy == "tensor" else 2) for p in parts.values()
    )
    assert not [n for n in ckpt.tensors if "scale" in n]  # scales are parts, not tensors
    for name in parts:
        want = ct_dequantize(stored[name], stored[name + "_scale"])
        assert torch.equal(raw(ckpt.load(name)), raw(want)), name


# ---- 3. convert ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["fp8", "gpt_oss_random", "ct_channel", "ct_tensor"])
def test_convert_to_bf16_is_the_dequantized_model(model, dense, moe, tmp_path):
    folder = dense.get(model) or moe[model]
    out = tmp_path / "bf16"
    ok("convert", folder, out, "--dtype", "bfloat16", "--no-progress")
    cfg = config_of(out)
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    written, ckpt = read_tensors(out), open_checkpoint(folder)
    assert set(written) == set(ckpt.stored_tensors)  # logical names, no scales
    assert all(t.dtype == BF16 for t in written.values())
    for name, t in written.items():
        assert torch.equal(raw(t), raw(ckpt.load(name))), name
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no quantization involved
    if model.startswith("ct_"):  # transformers needs the compressed-tensors package: formula
        stored = read_tensors(folder)
        for name in quant_parts(stored):
            want = ct_dequantize(stored[name], stored[name + "_scale"])
            assert torch.equal(raw(written[name]), raw(want)), name
    else:
        assert torch.equal(logits(plain), logits(hf(folder)))


def test_bf16_to_fp8_and_back_returns_the_same_bytes(dense, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ok("convert", dense["bf16"], a, "--dtype", "fp8", "--block-size", "16x16", "--no-progress")
    ok("convert", a, b, "--dtype", "bfloat16", "--no-progress")
    ok("convert", b, c, "--dtype", "fp8", "--block-size", "16x16", "--no-progress")
    qa, qc = read_tensors(a), read_tensors(c)
    # the quantization is transformers' own, and survives the round trip byte for byte
    assert same_bytes(qa, read_tensors(dense["fp8"])) == []
    assert same_bytes(qa, qc) == []
    assert len(quant_parts(qa)) == 28
    for name, t in read_tensors(b).items():
        scale = qa.get(name + "_scale_inv")
        want = qa[name] if scale is None else hf_fp8_dequantize(qa[name], scale, BLOCK)
        assert t.dtype == BF16 and torch.equal(raw(t), raw(want)), name
    for folder in (a, c):
        qc_cfg = config_of(folder)["quantization_config"]
        assert qc_cfg["quant_method"] == "fp8" and qc_cfg["weight_block_size"] == [16, 16]
        theirs = AutoQuantizationConfig.from_dict(dict(qc_cfg))
        assert isinstance(theirs, FineGrainedFP8Config) and list(theirs.weight_block_size) == [
            16,
            16,
        ]
    assert torch.equal(logits(hf(a)), logits(AutoModelForCausalLM.from_pretrained(b).eval()))


def test_fp8_block_size_default_and_reblocking(dense, tmp_path):
    # --dtype fp8 of an FP8 model keeps its blocks (byte copies); of a bf16 one: 128x128
    ok("convert", dense["fp8"], tmp_path / "keep", "--dtype", "fp8", "--no-progress")
    assert same_bytes(read_tensors(tmp_path / "keep"), read_tensors(dense["fp8"])) == []
    ok("convert", dense["bf16"], tmp_path / "big", "--dtype", "fp8", "--no-progress")
    assert config_of(tmp_path / "big")["quantization_config"]["weight_block_size"] == [128, 128]
    ok("convert", dense["fp8"], tmp_path / "same", "--dtype", "keep", "--no-progress")
    assert same_bytes(read_tensors(tmp_path / "same"), read_tensors(dense["fp8"])) == []
    # new blocks: the dequantized weights quantized again, by transformers' op
    ok(
        "convert",
        dense["fp8"],
        tmp_path / "r",
        "--dtype",
        "fp8",
        "--block-size",
        "32x32",
        "--no-progress",
    )
    assert config_of(tmp_path / "r")["quantization_config"]["weight_block_size"] == [32, 32]
    src, got = open_checkpoint(dense["fp8"]), read_tensors(tmp_path / "r")
    for name in quant_parts(read_tensors(dense["fp8"])):
        q, s = hf_fp8_quantize(src.load(name), (32, 32))
        assert torch.equal(raw(got[name]), raw(q)) and torch.equal(got[name + "_scale_inv"], s), (
            name
        )


def test_a_round_trip_in_blocks_that_divide_returns_the_bytes(dense, tmp_path):
    """bf16 -> FP8 (8x8 blocks, which divide the 24-wide MLP) -> bf16 -> FP8: the same bytes,
    values and scales."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    fp8 = ("--dtype", "fp8", "--block-size", "8x8", "--no-progress")
    ok("convert", dense["partial_bf16"], a, *fp8)
    ok("convert", a, b, "--dtype", "bfloat16", "--no-progress")
    ok("convert", b, c, *fp8)
    assert same_bytes(read_tensors(a), read_tensors(c)) == []


def test_partial_edge_blocks_are_refused_when_written(dense, tmp_path):
    """transformers reads the block size off the scale grid (rows // grid rows): a [32, 24]
    weight in 16x16 blocks has a [2, 2] grid, which it would take for 16x12 blocks, silently.
    splice reads such files (zero-padded blocks, as DeepSeek's own code does) but refuses to
    write them, in one line, before anything exists."""
    out = tmp_path / "fp8"
    rc, _, err = splice(
        "convert", dense["partial_bf16"], out, "--dtype", "fp8", "--block-size", "16x16",
        "--no-progress",
    )  # fmt: skip
    assert rc == 2 and not out.exists() and len(err.strip().splitlines()) == 1, err
    assert "partial block" in err and "--block-size" in err


# ---- 4. layer surgery moves stored bytes -------------------------------------------------------
SURGERY = {
    "duplicate": (["upscale", "--duplicate", "1:3"], [0, 1, 2, 1, 2, 3]),
    "drop": (["prune", "--drop", "1"], [0, 2, 3]),
}


@pytest.mark.parametrize(
    ("model", "verb"),
    [("fp8", "duplicate"), ("fp8", "drop"), ("gpt_oss_random", "duplicate"), ("ct_tensor", "drop")],
)
def test_layer_surgery_copies_the_stored_parts(model, verb, dense, moe, tmp_path):
    folder = dense.get(model) or moe[model]
    args, order = SURGERY[verb]
    out = tmp_path / "out"
    # without the compressed-tensors package transformers cannot check its config
    check = ["--no-verify"] if model.startswith("ct_") else []
    ok(args[0], folder, out, *args[1:], "--no-progress", *check)
    src, got = read_tensors(folder), read_tensors(out)
    for i, j in enumerate(order):
        assert same_bytes(layer_tensors(got, i), layer_tensors(src, j)) == [], (i, j)
    assert {k for k in got if ".layers." not in k} == {k for k in src if ".layers." not in k}
    assert config_of(out)["quantization_config"] == config_of(folder)["quantization_config"]
    assert config_of(out)["num_hidden_layers"] == len(order)
    if model.startswith("ct_"):
        return
    assert torch.equal(logits(hf(out)), logits(rearranged(hf(folder), order)))


def test_compressed_tensors_output_is_checked_or_refused_in_one_line(dense, tmp_path):
    out = tmp_path / "out"
    rc, _, err = splice("prune", dense["ct_channel"], out, "--drop", "1", "--no-progress")
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:  # transformers cannot build the config: one line, nothing written
        assert rc == 2 and not out.exists()
        (line,) = err.strip().splitlines()
        assert line.startswith("splice: error:") and "compressed-tensors" in line
        return
    assert rc == 0, err
    assert (
        config_of(out)["quantization_config"]
        == config_of(dense["ct_channel"])["quantization_config"]
    )


# ---- 5. merges --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetunes(dense, tmp_path_factory) -> dict[str, Path]:
    """Three FP8 llamas (seeds 0, 1, 2) and their bf16 copies dequantized by transformers."""
    root = tmp_path_factory.mktemp("finetunes")
    out = {"fp8_0": dense["fp8"]}
    for seed in (1, 2):
        out[f"fp8_{seed}"] = make_fp8(
            build("llama", root / f"f32_{seed}", seed=seed), root / f"fp8_{seed}"
        )
    for seed in (0, 1, 2):
        out[f"deq_{seed}"] = dequantized_copy(out[f"fp8_{seed}"], root / f"deq_{seed}")
    return out


RECIPES = {
    "linear": lambda m: {
        "merge_method": "linear",
        "models": [
            {"model": m(0), "parameters": {"weight": 0.3}},
            {"model": m(1), "parameters": {"weight": 0.7}},
        ],
    },
    "ties": lambda m: {
        "merge_method": "ties",
        "base_model": m(0),
        "models": [
            {"model": m(1), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": m(2), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
    },
}


def merge(recipe: dict, out: Path) -> Path:
    path = out.with_suffix(".yml")
    path.write_text(yaml.safe_dump(recipe))
    ok("merge", path, out, "--no-progress")
    return out


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_of_fp8_models_is_the_requantized_merge_of_their_dequantized_copies(
    method, finetunes, tmp_path
):
    got = read_tensors(merge(RECIPES[method](lambda i: str(finetunes[f"fp8_{i}"])), tmp_path / "q"))
    plain = read_tensors(
        merge(RECIPES[method](lambda i: str(finetunes[f"deq_{i}"])), tmp_path / "p")
    )
    assert (
        config_of(tmp_path / "q")["quantization_config"]
        == config_of(finetunes["fp8_0"])["quantization_config"]
    )
    parts = quant_parts(got)
    assert len(parts) == 28 and set(got) == set(read_tensors(finetunes["fp8_0"]))
    for name, t in plain.items():
        if name not in parts:
            assert torch.equal(raw(got[name]), raw(t)), name
            continue
        q, s = hf_fp8_quantize(t, BLOCK)
        assert got[name].dtype == FP8 and e4m3_steps(got[name], q) <= 1, name
        assert torch.allclose(got[name + "_scale_inv"], s, rtol=2**-22, atol=0), name


# ---- 6. MoE experts ---------------------------------------------------------------------------
def expert(tensors: dict[str, torch.Tensor], layer: int, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e`` of ``layer``: its per-expert tensors, or its slice of packed ones (stored
    parts, by their name inside the expert)."""
    out = {}
    for name, t in layer_tensors(tensors, layer).items():
        per = re.match(r"(.*experts\.)(\d+)\.(.*)", name)
        if per and int(per.group(2)) == e:
            out[per.group(1) + per.group(3)] = t
        elif per is None and ".experts." in name:
            out[name] = t[e]
    return out


def moe_layers(folder: Path) -> list[int]:
    return sorted(
        {
            int(m.group(1))
            for k in read_tensors(folder)
            if (m := re.match(r"model\.layers\.(\d+)\..*experts", k))
        }
    )


@pytest.mark.parametrize("model", ["mixtral_random", "gpt_oss_random"])
@pytest.mark.parametrize("prune", [True, False], ids=["prune", "merge"])
def test_keep_experts_copies_the_kept_experts(model, prune, moe, tmp_path):
    folder, out = moe[model], tmp_path / "out"
    calib = [str(moe["text"]) if a == "" else a for a in CALIB]
    mode = ["--prune", "--by", "frequency"] if prune else []
    report = json.loads(
        ok("collapse", folder, out, "--keep-experts", "2", *mode, *calib, "--json", "--no-progress")
    )
    assert config_of(out)["quantization_config"] == config_of(folder)["quantization_config"]
    src, got = read_tensors(folder), read_tensors(out)
    singles = 0
    for layer in report["layers"]:
        assert len(layer["groups"]) == 2
        for i, group in enumerate(layer["groups"]):
            mine = expert(got, layer["layer"], i)
            assert quant_parts(mine), "the experts are stored quantized"
            if len(group) == 1:
                singles += 1
                assert same_bytes(mine, expert(src, layer["layer"], group[0])) == [], (layer, i)
    if prune:
        assert singles == 2 * len(report["layers"])
    assert torch.isfinite(logits(hf(out))).all()


#: Mixtral's expert weights -> Mistral's MLP weights
DENSE_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@pytest.mark.parametrize("model", ["mixtral_same", "gpt_oss_same"])
def test_identical_experts_collapse_exactly(model, moe, tmp_path):
    folder, out = moe[model], tmp_path / "out"
    ok("collapse", folder, out, "--no-progress", "--device", "cpu")
    src, got = read_tensors(folder), read_tensors(out)
    cfg = config_of(out)
    assert cfg["quantization_config"] == config_of(folder)["quantization_config"]
    for layer in moe_layers(folder):
        one = expert(src, layer, 0)
        if model == "mixtral_same":  # a dense Mistral: its MLP is expert 0, byte for byte
            assert cfg["model_type"] == "mistral"
            mlp = {k: v for k, v in layer_tensors(got, layer).items() if k.startswith("mlp.")}
            want = {
                re.sub(
                    r"block_sparse_moe\.experts\.(w\d)",
                    lambda m: "mlp." + DENSE_NAMES[m.group(1)],
                    k,
                ): v
                for k, v in one.items()
            }
            assert same_bytes(mlp, want) == []
        else:  # gpt-oss keeps its family: one expert at top-1, expert 0's parts
            assert cfg["num_local_experts"] == 1
            assert same_bytes(expert(got, layer, 0), one) == []
    # the same function (float32: both dequantized alike, from the same bytes)
    want = logits(hf(folder, torch.float32))
    assert torch.allclose(logits(hf(out, torch.float32)), want, atol=1e-5, rtol=1e-5)


def test_collapsed_experts_are_their_requantized_mean(moe, tmp_path):
    """Computed weights are quantized again: Mixtral's uniform collapse is the mean of the
    experts (top-2 renormalised), dequantized, as bf16, in 16x16 FP8 blocks."""
    folder, out = moe["mixtral_random"], tmp_path / "out"
    ok("collapse", folder, out, "--no-progress", "--device", "cpu")
    src, got = open_checkpoint(folder), read_tensors(out)
    n = src.config["num_local_experts"]
    for layer in moe_layers(folder):
        for w, dense_name in DENSE_NAMES.items():
            parts = [
                f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(n)
            ]
            mean = torch.stack([src.load(p, "float32") for p in parts]).mean(0).to(BF16)
            q, s = hf_fp8_quantize(mean, BLOCK)
            name = f"model.layers.{layer}.mlp.{dense_name}.weight"
            assert got[name].dtype == FP8 and e4m3_steps(got[name], q) <= 1, name
            assert torch.allclose(got[name + "_scale_inv"], s, rtol=2**-22, atol=0), name


# ---- 7. inputs of different formats ----------------------------------------------------------
def test_merge_of_fp8_and_bf16_writes_an_unquantized_model(finetunes, tmp_path):
    recipe = RECIPES["linear"]
    mixed = recipe(lambda i: str(finetunes["fp8_0"] if i == 0 else finetunes["deq_1"]))
    path = tmp_path / "mixed.yml"
    path.write_text(yaml.safe_dump(mixed))
    rc, _, err = splice("merge", path, tmp_path / "mixed", "--no-progress")
    assert rc == 0, err
    assert "the output is unquantized" in err and "--dtype fp8" in err  # said, not silent
    cfg = config_of(tmp_path / "mixed")
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    got = read_tensors(tmp_path / "mixed")
    assert all(t.dtype == BF16 for t in got.values())
    # the same merge of the FP8 model's dequantized copy, bit for bit
    want = read_tensors(merge(recipe(lambda i: str(finetunes[f"deq_{i}"])), tmp_path / "plain"))
    assert same_bytes(got, want) == []
    assert torch.isfinite(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "mixed"))).all()


def test_merge_dtype_fp8_quantizes_the_merge(finetunes, tmp_path):
    """``merge --dtype fp8`` of the mixed pair: the merge of the dequantized copies, quantized
    as ``convert --dtype fp8`` quantizes it; a float ``--dtype`` is the recipe's to say."""
    recipe = RECIPES["linear"]
    mixed = recipe(lambda i: str(finetunes["fp8_0"] if i == 0 else finetunes["deq_1"]))
    path = tmp_path / "mixed.yml"
    path.write_text(yaml.safe_dump(mixed))
    ok("merge", path, tmp_path / "q", "--dtype", "fp8", "--block-size", "16x16", "--no-progress")
    plain = merge(recipe(lambda i: str(finetunes[f"deq_{i}"])), tmp_path / "plain")
    ok("convert", plain, tmp_path / "want", "--dtype", "fp8", "--block-size", "16x16",
       "--no-progress")  # fmt: skip
    assert same_bytes(read_tensors(tmp_path / "q"), read_tensors(tmp_path / "want")) == []
    assert config_of(tmp_path / "q")["quantization_config"]["weight_block_size"] == [16, 16]
    rc, _, err = splice("merge", path, tmp_path / "f16", "--dtype", "float16")
    assert rc == 2 and "recipe's dtype" in err and not (tmp_path / "f16").exists()


# ---- 8. what splice does not read --------------------------------------------------------------
def bad_model(
    kind: str, dense: dict[str, Path], moe: dict[str, Path], root: Path
) -> tuple[Path, str]:
    """A checkpoint splice must refuse, and a word its one-line error names."""
    folder = root / kind
    if kind == "gptq":
        shutil.copytree(dense["bf16"], folder)
        cfg = config_of(folder)
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder, "gptq"
    src = dense["fp8"] if kind == "fp8_no_scale" else moe["gpt_oss_random"]
    shutil.copytree(src, folder)
    tensors = read_tensors(folder)
    gone = (
        "model.layers.2.self_attn.k_proj.weight_scale_inv"
        if kind == "fp8_no_scale"
        else "model.layers.1.mlp.experts.down_proj_scales"
    )
    del tensors[gone]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, gone


@pytest.mark.parametrize("kind", ["gptq", "fp8_no_scale", "mxfp4_no_scales"])
@pytest.mark.parametrize(
    "verb",
    [["inspect"], ["convert", "--dtype", "bfloat16"], ["upscale", "--duplicate", "1:3"]],
    ids=lambda v: v[0],
)
def test_unreadable_quantization_is_one_line_and_nothing_written(kind, verb, dense, moe, tmp_path):
    folder, word = bad_model(kind, dense, moe, tmp_path)
    out = tmp_path / "out"
    args = [verb[0], folder] + ([] if verb[0] == "inspect" else [out, *verb[1:], "--no-progress"])
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, stdout, err = splice(*args)
    assert rc == 2 and stdout == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("splice: error:") and word in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp


def test_the_linears_left_unquantized_are_named_for_transformers(tmp_path):
    """transformers quantizes every ``nn.Linear`` a GPU runs except ``modules_to_not_convert``:
    an FP8 output names each linear it leaves in bf16 (Qwen3-MoE's routers, the head), by
    layer, and a layer map names the new layers' ones, never the old list's."""
    src = build("qwen3_moe", tmp_path / "bf16", seed=0)
    fp8, up = tmp_path / "fp8", tmp_path / "up"
    ok("convert", src, fp8, "--dtype", "fp8", "--block-size", "16x16", "--no-progress")
    routers = {
        n.removesuffix(".weight") for n in read_tensors(src) if n.endswith("mlp.gate.weight")
    }
    assert routers
    listed = config_of(fp8)["quantization_config"]["modules_to_not_convert"]
    assert routers | {"lm_head"} <= set(listed)
    assert not any(".experts." in m or "proj" in m for m in listed)  # those are quantized
    ok("upscale", fp8, up, "--duplicate", "1:3", "--no-progress")
    routers = {n.removesuffix(".weight") for n in read_tensors(up) if n.endswith("mlp.gate.weight")}
    assert routers <= set(config_of(up)["quantization_config"]["modules_to_not_convert"])
    assert any(".layers.4." in m or ".layers.5." in m for m in routers)  # the new layers


def test_partial_blocks_transformers_reads_right_are_written():
    """DeepSeek-V3's ``kv_a_proj_with_mqa`` [576, 7168] has a partial last row block in
    128-blocks, as shipped: its grid of 5 does not divide 576, so no loader can take it for
    another block size, and splice writes it; [32, 24] in 16-blocks it refuses."""
    from splice.errors import SpliceError
    from splice.quant import new_scheme, stored_outputs

    fp8 = new_scheme("fp8")
    (_, shape, _), (_, grid, _) = stored_outputs("a.weight", (576, 7168), fp8)
    assert shape == (576, 7168) and grid == (5, 56)
    with pytest.raises(SpliceError, match="partial block of 8"):
        stored_outputs("b.weight", (32, 24), new_scheme("fp8", (16, 16)))


def test_a_static_activation_scale_is_not_made_up(dense, tmp_path):
    """Merging compressed-tensors models with a static ``input_scale`` would need calibration
    to make the merged layers' scales: refused in one line; ``--dtype none`` writes the merge
    unquantized."""
    src = dense["ct_tensor"]
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(src), "parameters": {"weight": 0.5}},
                    {"model": str(src), "parameters": {"weight": 0.5}},
                ],
            }
        )
    )
    rc, _, err = splice("merge", recipe, tmp_path / "q", "--no-progress")
    assert rc == 2 and "input_scale" in err and not (tmp_path / "q").exists(), err
    ok("merge", recipe, tmp_path / "plain", "--dtype", "none", "--no-progress")
    assert "quantization_config" not in config_of(tmp_path / "plain")
