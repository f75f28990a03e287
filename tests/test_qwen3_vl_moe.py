"""Qwen3-VL-MoE (``qwen3_vl_moe``, Qwen3-VL-30B-A3B's family): a vision-language model whose
language model stores its experts packed. Tiny random models (hidden 32, experts 8 wide, so no
expert tensor is square), checked against transformers' own modules, never against splice.

What transformers 5 does with the experts (pinned by :func:`test_the_stored_experts`):

- each MoE layer holds ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``; the module's
  parameters are ``[E, 2I, H]`` (expert ``e``'s gate projection is rows ``:I`` of block ``e``, its
  up projection rows ``I:``: halves, not interleaved) and ``[E, H, I]``;
- ``save_pretrained`` writes them as the module holds them; Qwen's own files (and transformers
  4) hold each block input-major, ``[E, H, 2I]`` and ``[E, I, H]``, and transformers 5 loads
  either (its ``Transpose(1, 2, check_dims=True)`` converter transposes when the shape is not the
  module's);
- the router ``mlp.gate.weight`` ``[E, H]`` always renormalises the top-k weights; layers in
  ``mlp_only_layers`` (or off ``decoder_sparse_step``) are dense MLPs of ``intermediate_size``;
- on text alone, ``Qwen3MoeForCausalLM`` with ``norm_topk_prob: true`` on the same tensors
  computes the multimodal model's logits (without it, not).

splice reads the language model as ``qwen3_moe`` (``norm_topk_prob: true``), its experts
through ``splice/arch/qwen3_vl_moe_text.json`` (per expert, in the orientation each file holds,
written packed again in the donor's), so every verb works on both file layouts: inspect, merge,
upscale, prune, collapse (the one-expert form: the multimodal model keeps its family), slice,
convert ``--text-only`` (a ``qwen3_moe`` model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer
from families import BASE
from mm_families import _VISION_QWEN
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from surgery_helpers import word_text
from test_multimodal import (
    IDS,
    NO_PROGRESS,
    W_A,
    W_B,
    WRITERS,
    assert_config_kept,
    assert_vision_carried,
    calibration_opts,
    config,
    image_inputs,
    image_logits,
    load_mm,
    loaded_clean,
    mixed,
    per_layer_changes,
    recipe,
    relayered,
    run_ok,
    same_bytes,
    stored,
    text_logits,
    text_params,
    text_tensors,
)

torch.set_num_threads(1)

MODEL_TYPE = "qwen3_vl_moe"
E, W, H = 4, 8, BASE["hidden_size"]  # experts, an expert's width, hidden
TEXT = dict(
    BASE,
    moe_intermediate_size=W,
    num_experts=E,
    num_experts_per_tok=2,
    mlp_only_layers=[0],  # a dense layer of intermediate_size (64) before the MoE layers
    rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True},
)
VISION = {**_VISION_QWEN, "deepstack_visual_indexes": [0], "num_position_embeddings": 16}
TOKENS = dict(
    image_token_id=95, video_token_id=94, vision_start_token_id=93, vision_end_token_id=92
)
PACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
#: how the files hold the experts: as transformers 5 saves them, or as Qwen's own files do
LAYOUTS = ("transformers", "qwen")
SHAPES = {
    "transformers": {"gate_up_proj": (E, 2 * W, H), "down_proj": (E, H, W)},
    "qwen": {"gate_up_proj": (E, H, 2 * W), "down_proj": (E, W, H)},
}


# --- models ------------------------------------------------------------------------------------


def build(folder: Path, *, seed: int, layout: str = "transformers", same: bool = False) -> Path:
    """Save a tiny random Qwen3-VL-MoE (every parameter perturbed by ``0.05 * N(0, 1)``) in
    ``layout``; ``same``: every expert of a layer equal to its expert 0."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(
        MODEL_TYPE,
        text_config={**TEXT, "tie_word_embeddings": False},
        vision_config=VISION,
        tie_word_embeddings=False,
        **TOKENS,
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if same and name.endswith(PACKED):
                p.copy_(p[:1].expand_as(p))
    model.save_pretrained(folder)
    if layout == "qwen":
        for file in folder.glob("*.safetensors"):
            tensors = load_file(file)
            for name in tensors:
                if name.endswith(PACKED):
                    tensors[name] = tensors[name].transpose(1, 2).contiguous()
            save_file(tensors, file, metadata={"format": "pt"})
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "preprocessor_config.json").write_text('{"image_processor_type": "tiny"}')
    return folder


class Zoo:
    """Per layout: ``a`` (seed 0), ``b`` (seed 1), ``tok`` (``a`` with a word-level tokenizer),
    ``same`` (seed 3, every layer's experts equal); built on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[str, str], Path] = {}
        self.calibration = root / "calibration.txt"
        self.calibration.write_text(word_text())

    def __call__(self, layout: str = "transformers", which: str = "a") -> Path:
        key = (layout, which)
        if key not in self.made:
            folder = self.root / f"{layout}-{which}"
            if which == "tok":
                shutil.copytree(self(layout, "a"), folder)
                make_tokenizer(96).save_pretrained(folder)
            else:
                seed = {"a": 0, "b": 1, "same": 3}[which]
                build(folder, seed=seed, layout=layout, same=which == "same")
            self.made[key] = folder
        return self.made[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("vlmoe"))


def decoder(model):
    return model.model.language_model


def stand_in(folder: Path, *, norm_topk_prob: bool = True):
    """``Qwen3MoeForCausalLM`` of the multimodal model's text config (mrope left out) holding its
    language model's parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mm = load_mm(folder)
    text = mm.config.text_config.to_dict()
    keep = AutoConfig.for_model("qwen3_moe").to_dict()
    fields = {k: v for k, v in text.items() if k in keep and k != "model_type"}
    fields["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": text["rope_parameters"]["rope_theta"],
    }
    cfg = AutoConfig.for_model("qwen3_moe", **fields, norm_topk_prob=norm_topk_prob)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    result = model.load_state_dict(text_params(mm), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


# --- 0. the facts ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_stored_experts(zoo, layout):
    """The stored names and shapes, the module's parameters they load into, and what one
    expert computes with them: gate and up the halves of its gate_up block."""
    a = zoo(layout)
    files = stored(a)
    prefix = "model.language_model.layers."
    assert f"{prefix}0.mlp.gate_proj.weight" in files  # mlp_only_layers: dense
    assert not any(n.startswith(f"{prefix}0.mlp.experts") for n in files)
    for layer in (1, 2, 3):
        assert files[f"{prefix}{layer}.mlp.gate.weight"].shape == (E, H)
        for kind, shape in SHAPES[layout].items():
            assert files[f"{prefix}{layer}.mlp.experts.{kind}"].shape == shape
    model = load_mm(a)
    experts = decoder(model).layers[1].mlp.experts
    for kind in ("gate_up_proj", "down_proj"):
        t = files[f"{prefix}1.mlp.experts.{kind}"]
        param = getattr(experts, kind)
        assert torch.equal(param, t if layout == "transformers" else t.transpose(1, 2))
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(0))
    for e in range(E):
        gate, up = experts.gate_up_proj[e, :W], experts.gate_up_proj[e, W:]
        want = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ experts.down_proj[e].T
        with torch.no_grad():
            got = experts(x, torch.full((5, 1), e), torch.ones(5, 1))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_qwen3_moe_stands_for_the_language_model(zoo):
    """On text alone, Qwen3MoeForCausalLM on the same tensors is the multimodal model, with
    norm_topk_prob (the multimodal router always renormalises) and only with it."""
    a = zoo()
    want = text_logits(load_mm(a))
    torch.testing.assert_close(text_logits(stand_in(a)), want, atol=1e-5, rtol=0)
    assert (text_logits(stand_in(a, norm_topk_prob=False)) - want).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_expert_tensors_are_the_modules(zoo, layout):
    """splice's per-expert tensors of the language model are transformers' experts."""
    from splice.checkpoint import open_checkpoint

    a = zoo(layout)
    ckpt = open_checkpoint(a)
    experts = decoder(load_mm(a)).layers[2].mlp.experts
    for e in range(E):
        name = f"model.layers.2.mlp.experts.{e}."
        assert torch.equal(ckpt.load(name + "gate_proj.weight"), experts.gate_up_proj[e, :W])
        assert torch.equal(ckpt.load(name + "up_proj.weight"), experts.gate_up_proj[e, W:])
        assert torch.equal(ckpt.load(name + "down_proj.weight"), experts.down_proj[e])


# --- 1. inspect --------------------------------------------------------------------------------


def test_inspect(zoo, capsys):
    a = zoo()
    capsys.readouterr()
    run_ok("inspect", a)
    text = capsys.readouterr().out
    lines = text.splitlines()
    head = [i for i, line in enumerate(lines) if line.startswith("multimodal")]
    assert len(head) == 1 and MODEL_TYPE in lines[head[0]]
    listed = [line.split()[0] for line in lines[head[0] + 1 : head[0] + 4]]
    assert sorted(listed) == ["multi_modal_projector", "text_decoder", "vision_tower"]
    assert any(line.startswith("architecture qwen3_moe") for line in lines)
    assert "experts 4 (top-2)" in text and "outputs store them packed again" in text
    assert "mlp.experts.{e}.gate_proj.weight  [8, 32]" in text

    run_ok("inspect", a, "--json")
    data = json.loads(capsys.readouterr().out)
    assert data["model_type"] == "qwen3_moe"
    assert data["multimodal"]["model_type"] == MODEL_TYPE
    modules = data["multimodal"]["modules"]
    assert sorted(m["module"] for m in modules) == ["multi_modal_projector", "vision_tower"]


# --- 2. merge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_merge(zoo, tmp_path, layout):
    """Two seeds mixed 0.7 / 0.3: loads as the input's class with nothing missing or left over,
    every language-model tensor (packed experts included, in the input's layout) the hand mix,
    the text logits those of the hand-mixed module, the vision modules the base's bytes."""
    a, b = zoo(layout, "a"), zoo(layout, "b")
    out = tmp_path / "out"
    run_ok("merge", recipe(tmp_path, a, b), out, NO_PROGRESS)

    got = loaded_clean(out)
    want = mixed(a, text_params(load_mm(b)))
    assert type(got).__name__ == "Qwen3VLMoeForConditionalGeneration"
    torch.testing.assert_close(text_logits(got), text_logits(want), atol=1e-5, rtol=0)
    assert (text_logits(got) - text_logits(load_mm(a))).abs().max() > 1e-3  # not vacuous

    before, after = stored(a), stored(out)
    assert {n: t.shape for n, t in after.items()} == {n: t.shape for n, t in before.items()}
    ta, tb, to = text_tensors(a), text_tensors(b), text_tensors(out)
    for name, t in to.items():
        torch.testing.assert_close(t, W_A * ta[name] + W_B * tb[name], atol=1e-6, rtol=0)
    assert_vision_carried(a, out)
    assert_config_kept(a, out, {})


# --- 3. layer maps -----------------------------------------------------------------------------


def assert_moved(src: Path, out: Path, order: list[int], zeroed: tuple[int, ...] = ()) -> None:
    """Every written language-model tensor is its source layer's, byte for byte (the
    residual writers of the ``zeroed`` output layers zero)."""
    before, after = text_tensors(src), text_tensors(out)
    for name, t in after.items():
        if not name.startswith("model.layers."):
            assert same_bytes(t, before[name]), name
            continue
        i, rest = name[len("model.layers.") :].split(".", 1)
        if int(i) in zeroed and rest.endswith(WRITERS):
            assert not t.any(), name
        else:
            assert same_bytes(t, before[f"model.layers.{order[int(i)]}.{rest}"]), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_upscale_duplicate(zoo, tmp_path, layout):
    """--duplicate 1:3 on 4 layers (layer 0 dense): the module with layers 0,1,2,1,2,3, deep
    copies, mlp_only_layers following."""
    a, out = zoo(layout), tmp_path / "out"
    order = [0, 1, 2, 1, 2, 3]
    run_ok("upscale", a, out, "--duplicate", "1:3", NO_PROGRESS)
    got = loaded_clean(out)
    torch.testing.assert_close(
        text_logits(got), text_logits(relayered(a, order)), atol=1e-5, rtol=0
    )
    assert_config_kept(a, out, {**per_layer_changes(a, order), "mlp_only_layers": [0]})
    assert_vision_carried(a, out)
    assert_moved(a, out, order)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prune_drop(zoo, tmp_path, layout):
    a, out = zoo(layout), tmp_path / "out"
    keep = [0, 2, 3]
    run_ok("prune", a, out, "--drop", "1", NO_PROGRESS)
    got = loaded_clean(out)
    torch.testing.assert_close(text_logits(got), text_logits(relayered(a, keep)), atol=1e-5, rtol=0)
    assert_config_kept(a, out, {**per_layer_changes(a, keep), "mlp_only_layers": [0]})
    assert_vision_carried(a, out)
    assert_moved(a, out, keep)


def test_prune_drop_of_the_dense_layer(zoo, tmp_path):
    """Dropping the one dense layer empties mlp_only_layers: every layer left is an MoE one."""
    a, out = zoo(), tmp_path / "out"
    run_ok("prune", a, out, "--drop", "0", NO_PROGRESS)
    got = loaded_clean(out)
    want = relayered(a, [1, 2, 3])
    want.config.text_config.mlp_only_layers = []
    torch.testing.assert_close(text_logits(got), text_logits(want), atol=1e-5, rtol=0)
    assert_config_kept(a, out, {"num_hidden_layers": 3, "mlp_only_layers": []})


def test_upscale_expand_keeps_the_image_path(zoo, tmp_path):
    """--expand 2: copies after layers 1 and 3 whose residual writers (o_proj, the packed
    experts' down_proj) are zero, so text and image logits are the input's."""
    a, out = zoo(), tmp_path / "out"
    order = [0, 1, 1, 2, 3, 3]
    run_ok("upscale", a, out, "--expand", "2", NO_PROGRESS)
    got, src = loaded_clean(out), load_mm(a)
    torch.testing.assert_close(text_logits(got), text_logits(src), atol=1e-5, rtol=0)
    inputs = image_inputs(MODEL_TYPE, a)
    want = image_logits(src, inputs)
    assert (want - text_logits(src, inputs["input_ids"].clamp(max=90))).abs().max() > 1e-3
    torch.testing.assert_close(image_logits(got, inputs), want, atol=1e-5, rtol=0)
    assert_vision_carried(a, out)
    assert_moved(a, out, order, zeroed=(2, 5))
    assert config(out)["text_config"]["mlp_only_layers"] == [0]


# --- 4. what runs the language model (as Qwen3MoeForCausalLM) ---------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_convert_text_only(zoo, tmp_path, layout):
    """The language model alone loads in AutoModelForCausalLM (Qwen3MoeForCausalLM) with
    nothing missing or left over, and its logits are the multimodal model's on text."""
    from transformers import AutoModelForCausalLM

    a, out = zoo(layout), tmp_path / "out"
    run_ok("convert", a, out, "--text-only", NO_PROGRESS)
    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], (key, info[key])
    with torch.no_grad():
        got = model.eval()(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, text_logits(load_mm(a)), atol=1e-5, rtol=0)
    assert not any(n.startswith(("visual.", "model.visual.")) for n in stored(out))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_collapse_of_equal_experts_is_exact(zoo, tmp_path, layout):
    """Every layer's experts equal and the router renormalising: the MoE is that expert, so
    the collapsed model's text and image logits are the input's; it loads as the input's class,
    in the input's layout, the vision modules carried."""
    src, out = zoo(layout, "same"), tmp_path / "out"
    run_ok("collapse", src, out, "--device", "cpu", NO_PROGRESS)
    got, ref = loaded_clean(out), load_mm(src)
    assert type(got) is type(ref)
    torch.testing.assert_close(text_logits(got), text_logits(ref), atol=1e-5, rtol=0)
    inputs = image_inputs(MODEL_TYPE, src)
    torch.testing.assert_close(
        image_logits(got, inputs), image_logits(ref, inputs), atol=1e-5, rtol=0
    )
    assert_vision_carried(src, out)
    free = ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size")
    assert_config_kept(src, out, dict.fromkeys(free))
    files = stored(out)
    gate_up = files["model.language_model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.shape[1:] == SHAPES[layout]["gate_up_proj"][1:]


def test_keep_experts_prune(zoo, tmp_path, capsys):
    """--keep-experts 2 --prune: the module with each MoE layer's kept experts and router rows
    (the report's choice), num_experts 2, top-2 kept."""
    src, out = zoo("transformers", "tok"), tmp_path / "out"
    capsys.readouterr()
    run_ok("collapse", src, out, "--keep-experts", "2", "--prune", "--json", *calibration_opts(zoo))
    report = json.loads(capsys.readouterr().out)
    got = loaded_clean(out)
    want = load_mm(src)
    for row in report["layers"]:
        kept = [group[0] for group in row["groups"]]
        assert len(kept) == 2 and all(len(g) == 1 for g in row["groups"])
        mlp = decoder(want).layers[row["layer"]].mlp
        with torch.no_grad():
            mlp.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj[kept].clone())
            mlp.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj[kept].clone())
            mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight[kept].clone())
        mlp.experts.num_experts = mlp.gate.num_experts = 2
    assert sorted(row["layer"] for row in report["layers"]) == [1, 2, 3]
    torch.testing.assert_close(text_logits(got), text_logits(want), atol=1e-5, rtol=0)
    assert_config_kept(src, out, {"num_local_experts": 2})
    assert_vision_carried(src, out)


def test_slice_shared_basis_at_zero(zoo, tmp_path):
    """slice --basis shared --sparsity 0: a rotation of the stream (the merger's and the
    deepstack merger's last linears rotated with it), so text and image logits are kept."""
    src, out = zoo("transformers", "tok"), tmp_path / "out"
    run_ok("slice", src, out, "--basis", "shared", "--sparsity", "0", *calibration_opts(zoo))
    got, ref = loaded_clean(out), load_mm(src)
    torch.testing.assert_close(text_logits(got), text_logits(ref), atol=1e-5, rtol=0)
    inputs = image_inputs(MODEL_TYPE, src)
    torch.testing.assert_close(
        image_logits(got, inputs), image_logits(ref, inputs), atol=1e-5, rtol=0
    )
    report = json.loads((out / "splice_surgery.json").read_text())
    assert report["params_output"] == report["params_source"]
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        shape = f.get_slice("model.language_model.layers.1.mlp.experts.gate_up_proj").get_shape()
    assert tuple(shape) == SHAPES["transformers"]["gate_up_proj"]
