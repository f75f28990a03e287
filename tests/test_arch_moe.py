"""Every MoE family's spec against its tiny transformers model, as tests/test_arch_families.py
checks the dense ones: the spec names every stored tensor, experts parse to their index, every
MoE layer holds every expert kind for every expert, the residual roles name existing modules, are
what the forward reads and make ``slice --sparsity 0`` (a rotation of the stream through every
role) exact, the config keys give the expert count and ``splice inspect --json`` reports it.

Each family is built at 4 layers / hidden 32 / 4 experts (``families.SMALL``) with at least one
dense layer and shared experts where the family has them (``DEFAULT``), and once more per
``VARIANTS`` entry (biases, q/k norms, DeepSeek's ``q_lora_rank=None``, no shared experts ...),
saved by transformers and read back. transformers 5 converts its packed in-memory experts back
to per-expert tensors on save for every family here except gpt-oss, GraniteMoE and Llama 4,
whose files are packed themselves (``PACKED_ON_DISK``): their specs describe the stored layout
(``experts.stored``, splice.stored) and splice lists per-expert views of it.
GraniteMoE's residual roles name the per-expert views (slicing rotates them and the writer packs
them again); gpt-oss declares none (``NO_ROLES``: its attention sinks and biased experts are not
described for slicing), so slicing refuses it, as it refuses Llama 4 (``SLICE_REFUSED``: its MoE
block's output comes back flattened to ``[tokens, hidden]``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import families
import pytest

from splice import ArchSpec, open_checkpoint

#: config fields beyond families.SMALL of each family's main build: a dense layer, shared experts
DEFAULT: dict[str, dict[str, Any]] = {
    k: v for k, v in families.MOE_FAMILIES.items() if k != "mixtral"
}
#: further builds (overrides on top of DEFAULT) that switch optional tensors on or off
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2_moe": {
        "sparse_step": dict(mlp_only_layers=[], decoder_sparse_step=2),
        "no_bias": dict(qkv_bias=False),
    },
    "qwen3_moe": {"bias": dict(attention_bias=True, decoder_sparse_step=2)},
    "olmoe": {"bias": dict(attention_bias=True)},
    "deepseek_v3": {"no_q_lora": dict(q_lora_rank=None), "bias": dict(attention_bias=True)},
    "deepseek_v2": {
        "no_q_lora": dict(q_lora_rank=None),
        "bias": dict(attention_bias=True, mlp_bias=True),
    },
    "glm4_moe": {"qk_norm": dict(use_qk_norm=True, attention_bias=True)},
    "gpt_oss": {"no_bias": dict(attention_bias=False)},
    "granitemoe": {"bias": dict(attention_bias=True)},
    "ernie4_5_moe": {
        "bias": dict(use_bias=True),  # lm_head.bias beside a tied head
        "bias_untied": dict(use_bias=True, tie_word_embeddings=False),
        "no_shared": dict(moe_num_shared_experts=0, moe_layer_interval=2),
    },
    "dots1": {"bias": dict(attention_bias=True)},
    "llama4_text": {
        # Maverick as transformers saves it: the step, and moe_layers computed from it
        "step": dict(moe_layers=None, interleave_moe_layer_step=2),
        # Scout's kind: every layer MoE (moe_layers as long as the layer count), and biases
        "all_moe": dict(moe_layers=None, attention_bias=True, use_qk_norm=False),
    },
}
#: families whose files keep transformers' packed experts (no per-expert tensors on disk)
PACKED_ON_DISK = ("gpt_oss", "granitemoe", "llama4_text")
#: families whose in-memory names and layout are the stored ones
IN_MEMORY_IS_STORED = ("gpt_oss", "llama4_text")
#: families whose spec declares no residual roles (slicing refuses them)
NO_ROLES = ("gpt_oss",)
#: family -> a substring of the one-line refusal ``slice`` gives it
SLICE_REFUSED = {"gpt_oss": "no residual-stream roles"}
#: the family's module holding a layer's MoE block (its packed experts in memory)
MOE_BLOCK = {"granitemoe": "block_sparse_moe", "llama4_text": "feed_forward"}
#: the family's dense MLP module (in its dense layers), where not ``mlp``
DENSE_MLP = {"llama4_text": "feed_forward"}


def config(family: str, **overrides: Any) -> Any:
    """transformers' config of the tiny ``family`` model (``families.config``)."""
    return families.config(family, **overrides)


def _model(cfg: Any, seed: int = 0) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@dataclass
class Variant:
    path: Path
    config: dict[str, Any]  # the saved config.json
    names: set[str]  # the stored tensor names (the file's own, before any unpacking)
    shapes: dict[str, tuple[int, ...]]
    moe_layers: list[int]  # layers whose MLP is the MoE block (from transformers' module)


@dataclass
class Built:
    family: str
    spec: ArchSpec
    variants: dict[str, Variant]  # "default" and VARIANTS[family]
    model: Any  # the default model, eval mode

    @property
    def default(self) -> Variant:
        return self.variants["default"]


def _moe_layers(family: str, model: Any) -> list[int]:
    block = MOE_BLOCK.get(family, "mlp")
    return [
        i for i, layer in enumerate(model.model.layers) if hasattr(getattr(layer, block), "experts")
    ]


def _save(family: str, folder: Path, **overrides: Any) -> Variant:
    import torch
    from safetensors import safe_open

    model = _model(config(family, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(folder)
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            shapes |= {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    cfg = json.loads((folder / "config.json").read_text())
    return Variant(folder, cfg, set(shapes), shapes, _moe_layers(family, model))


@pytest.fixture(scope="module", params=list(DEFAULT))
def built(request, tmp_path_factory) -> Built:
    family = request.param
    if not families.known(family):
        pytest.skip(f"transformers has no {family!r}")
    root = tmp_path_factory.mktemp(family)
    variants = {"default": _save(family, root / "default")}
    for name, overrides in VARIANTS.get(family, {}).items():
        variants[name] = _save(family, root / name, **overrides)
    return Built(family, ArchSpec.load(family), variants, _model(config(family)))


def _template(spec: ArchSpec, name: str) -> tuple[int | None, str]:
    """``(layer, kind)``; an expert's kind as the template (``mlp.experts.{e}.up_proj.weight``)."""
    t = spec.parse(name)
    kind = t.kind if t.expert is None else spec.experts.prefix + t.kind
    return t.layer, kind


def _layers(spec: ArchSpec, names: set[str]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for name in names:
        layer, kind = _template(spec, name)
        if layer is not None:
            out.setdefault(layer, set()).add(kind)
    return out


def _all_kinds(built: Built) -> set[str]:
    return {
        k
        for v in built.variants.values()
        for ks in _layers(built.spec, set(open_checkpoint(v.path).tensors)).values()
        for k in ks
    }


# ---- names --------------------------------------------------------------------------------------
def test_the_spec_is_the_family(built):
    spec = built.spec
    assert spec.model_type == built.family and not spec.inferred
    assert spec.architectures == (type(built.model).__name__,)
    assert list(spec.architectures) == built.default.config["architectures"]


def test_every_stored_tensor_is_named(built):
    spec = built.spec
    for variant, v in built.variants.items():
        other = sorted(n for n in v.names if spec.parse(n).group == "other")
        assert not other, f"{variant}: {other}"
        for name in v.names:
            t = spec.parse(name)
            if t.layer is not None:
                assert spec.layer_name(t.layer, t.kind, t.expert) == name


def test_the_stored_layout(built):
    """transformers 5 stores per-expert tensors (no packed ones to unpack), except gpt-oss and
    GraniteMoE, which keep one packed tensor per layer and kind; splice lists what is stored."""
    spec = built.spec
    for variant, v in built.variants.items():
        ckpt = open_checkpoint(v.path)
        per_expert = {n for n in v.names if re.search(r"\.experts\.\d+\.", n)}
        assert spec.experts is not None, variant
        if built.family in PACKED_ON_DISK:
            assert not per_expert, variant
            stored = {n for n in v.names if spec.parse(n).kind in spec.experts.stored}
            assert stored and set(ckpt.packed) == stored, variant
            views = set(ckpt) - v.names
            assert set(ckpt) - views == v.names - stored, variant
            assert all(spec.parse(n).expert is not None for n in views), variant
        else:
            assert not ckpt.packed and set(ckpt) == v.names, variant
            assert per_expert, variant


def test_experts_parse_to_their_index(built):
    spec = built.spec
    assert spec.experts is not None
    for variant, v in built.variants.items():
        for name in open_checkpoint(v.path).tensors:
            m = re.search(r"\.experts\.(\d+)\.", name)
            t = spec.parse(name)
            if m is None:
                assert t.group != "experts" and t.expert is None, name
                continue
            assert (t.group, t.expert) == ("experts", int(m.group(1))), f"{variant}: {name}"
            assert t.kind in spec.experts.tensors, f"{variant}: {name}"


def test_every_moe_layer_has_every_expert(built):
    """MoE layers (transformers' module says which) hold every expert kind of every expert and
    a router; the others are dense and hold the dense MLP's kinds and no expert tensor."""
    spec = built.spec
    n = built.default.config["num_hidden_layers"]
    for variant, v in built.variants.items():
        experts = spec.num_experts(v.config)
        assert experts == families.SMALL["num_experts"], variant
        names = set(open_checkpoint(v.path).tensors)  # stored experts as per-expert views
        layers = _layers(spec, names)
        groups = {
            layer: {spec.parse(spec.layer_name(layer, k)).group for k in kinds if "{e}" not in k}
            for layer, kinds in layers.items()
        }
        for layer in range(n):
            moe = layer in v.moe_layers
            assert ("router" in groups[layer]) == moe, f"{variant}: layer {layer}"
            if spec.experts is not None:
                assert any("{e}" in k for k in layers[layer]) == moe, f"{variant}: layer {layer}"
            if not moe:
                mlp = DENSE_MLP.get(built.family, "mlp")
                assert {f"{mlp}.{p}_proj.weight" for p in ("gate", "up", "down")} <= layers[layer]
                continue
            if spec.experts is None:
                continue
            missing = [
                spec.layer_name(layer, kind, e)
                for e in range(experts)
                for kind in spec.experts.tensors
                if spec.layer_name(layer, kind, e) not in names
            ]
            assert not missing, f"{variant}: {missing[:3]}"
            indices = {spec.parse(x).expert for x in names if spec.parse(x).layer == layer}
            assert indices - {None} == set(range(experts)), f"{variant}: layer {layer}"


def test_the_builds_cover_dense_layers_and_shared_experts(built):
    """The fixtures themselves: a dense layer and shared experts wherever the family can have
    them (else the checks above would not see their tensors)."""
    v = built.default
    n = v.config["num_hidden_layers"]
    if built.family not in ("olmoe", "gpt_oss", "granitemoe"):  # every layer MoE
        assert 0 < len(v.moe_layers) < n, v.moe_layers
    if built.family in (
        "qwen2_moe",
        "deepseek_v2",
        "deepseek_v3",
        "glm4_moe",
        "dots1",
        "ernie4_5_moe",
        "llama4_text",
    ):
        assert any(".shared_expert" in name for name in v.names)


def test_every_layer_has_the_required_kinds(built):
    spec = built.spec
    n = built.default.config["num_hidden_layers"]
    for variant, v in built.variants.items():
        layers = _layers(spec, v.names)
        assert sorted(layers) == list(range(n)), variant
        for layer, kinds in layers.items():
            missing = set(spec.required_layer_kinds()) - kinds
            assert not missing, f"{variant}: layer {layer} lacks {sorted(missing)}"


def test_every_optional_kind_exists(built):
    spec = built.spec
    optional = {k for kinds in spec.optional_layer_tensors.values() for k in kinds}
    if spec.experts is not None:
        optional |= {spec.experts.prefix + k for k in spec.experts.tensors}
    assert not optional - _all_kinds(built), "named but in no variant of the model"


def test_globals_exist(built):
    spec = built.spec
    stored = set().union(*(v.names for v in built.variants.values()))
    for group in ("embed", "final_norm"):
        assert set(spec.globals_of(group)) <= built.default.names, group
    assert set(spec.global_tensors.get("head", ())) <= stored
    assert set(spec.globals_of("head")) <= stored | set(built.model.state_dict())


def test_roles_name_existing_modules(built):
    spec = built.spec
    kinds = _all_kinds(built)
    layer_kinds = {
        k
        for ks in (*spec.layer_tensors.values(), *spec.optional_layer_tensors.values())
        for k in ks
    }
    if built.family in NO_ROLES:
        # no roles: the packed experts read and write the stream along dims the format cannot
        # name yet, and a spec with roles for the rest would let slicing treat them as inner
        assert not spec.norm_feeds and not spec.residual_writers
        return
    for norm, feeds in spec.norm_feeds.items():
        assert norm in layer_kinds and norm in kinds, norm
        assert spec.parse(spec.layer_name(0, norm)).group == "norms", norm
        for module in feeds:
            assert f"{module}.weight" in kinds, module
    assert spec.residual_writers
    for module in spec.residual_writers:
        assert f"{module}.weight" in kinds, module
    for name in built.default.names:
        role = spec.role(name)
        assert role != "other", name
        t = spec.parse(name)
        if t.group == "norms":
            assert role == "norm", name
        if re.search(r"(q_a|kv_a)_layernorm", name):  # MLA's latent norms: off the stream
            assert role == "inner" and t.group == "attention", name


def test_tied_default_is_the_config_class_default(built):
    from transformers import CONFIG_MAPPING

    assert built.spec.tied_default == CONFIG_MAPPING[built.family]().tie_word_embeddings
    for variant, v in built.variants.items():
        assert built.spec.is_tied(v.config) == (built.spec.lm_head not in v.names), variant


def test_config_keys(built):
    spec = built.spec
    keys = spec.config_keys
    assert keys["num_layers"] == "num_hidden_layers"
    for variant, v in built.variants.items():
        cfg = v.config
        n = cfg["num_hidden_layers"]
        assert spec.num_layers(cfg) == n
        for key in keys.get("per_layer", ()):
            if key in cfg:
                assert isinstance(cfg[key], list) and len(cfg[key]) == n, key
        for key in keys.get("layer_indices", ()):
            assert key in cfg, key
            assert all(isinstance(i, int) and 0 <= i < n for i in cfg[key]), key
        for role in ("num_experts", "experts_per_token"):
            assert isinstance(cfg.get(spec.config_key(role, cfg)), int), f"{variant}: {role}"
        assert spec.num_experts(cfg) == families.SMALL["num_experts"], variant
        assert cfg[keys["experts_per_token"]] == families.SMALL["num_experts_per_tok"]
        changed = spec.config_with_experts(cfg, 8, 3)
        assert spec.num_experts(changed) == 8 and changed[keys["experts_per_token"]] == 3
        per_layer_lists = {
            k
            for k, val in cfg.items()
            if isinstance(val, list)
            and len(val) == n
            and k != "architectures"
            and k not in keys.get("layer_indices", ())  # Llama 4's moe_layers, all MoE
            and not k.endswith("_token_id")
        }
        assert per_layer_lists <= set(keys.get("per_layer", ())), variant


def test_packed_experts_on_disk_are_their_first_dim(built):
    """The expert count is the leading dim of the packed tensors (gpt-oss, GraniteMoE,
    Llama 4)."""
    if built.family not in PACKED_ON_DISK:
        pytest.skip("experts stored one per tensor")
    spec, v = built.spec, built.default
    assert spec.experts is not None
    for layer in v.moe_layers:
        for kind in spec.experts.stored:
            shape = v.shapes[spec.layer_name(layer, kind)]
            assert len(shape) in (2, 3) and shape[0] == spec.num_experts(v.config), kind


# ---- the in-memory layout (a state dict saved as it is) -----------------------------------------
def test_the_in_memory_layout_reads_as_the_stored_one(built, tmp_path):
    """A file with transformers' in-memory names (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
    ERNIE's ``mlp.gate.moe_statics``), as a plain ``state_dict`` save writes it, is listed with
    the names and values ``save_pretrained`` stores (``ExpertSpec.packed`` / ``aliases``)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    if built.family in IN_MEMORY_IS_STORED:
        pytest.skip("its in-memory names and layout are the stored ones")
    src = built.default.path
    ckpt = open_checkpoint(src)
    # the saved weights, through transformers' own conversion on load
    state = {n: t.contiguous() for n, t in _loaded(src).state_dict().items()}
    if ckpt.tied:
        state.pop(built.spec.lm_head, None)
    dst = tmp_path / "in_memory"
    dst.mkdir()
    save_file(state, dst / "model.safetensors")
    shutil.copy(src / "config.json", dst / "config.json")
    mem = open_checkpoint(dst)
    assert mem.packed, "the in-memory layout stores no packed tensor"
    assert set(mem) == set(ckpt)
    for name in ckpt:
        torch.testing.assert_close(mem.load(name), ckpt.load(name), rtol=0, atol=0)


def _loaded(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# ---- what the model computes --------------------------------------------------------------------
def _readers(built: Built, layer: int) -> dict[str, set[str]]:
    """``{norm kind: modules of the layer with a 2-D weight that read its output}`` on a forward
    of 12 random tokens (stored module names, e.g. ``self_attn.q_a_proj``)."""
    import torch

    model, spec = built.model, built.spec
    hidden = built.default.config["hidden_size"]
    prefix = spec.layer_prefix.replace("{i}", str(layer))
    inputs, outputs = {}, {}

    def pre(name):
        def hook(module, args, kwargs):
            tensors = [*args, *(x for x in kwargs.values() if isinstance(x, torch.Tensor))]
            inputs[name] = tensors[0]

        return hook

    def post(name):
        def hook(module, args, out):
            outputs[name] = out[0] if isinstance(out, tuple) else out

        return hook

    handles = []
    for name, module in model.named_modules():
        if name.startswith(prefix):
            handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post(name)))
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    params = dict(model.named_parameters())
    linears = {
        name.removeprefix(prefix): x.reshape(-1, hidden)
        for name, x in inputs.items()
        if x.shape[-1] == hidden
        and (w := params.get(f"{name}.weight")) is not None
        and w.dim() == 2
    }
    out = {}
    for norm in spec.layer_tensors["norms"]:
        y = outputs[prefix + norm.removesuffix(".weight")].reshape(-1, hidden)
        out[norm] = {m for m, x in linears.items() if x.shape == y.shape and torch.equal(x, y)}
    return out


def test_norm_feeds_are_the_readers_of_each_norm(built):
    """Each norm's output is read by exactly the 2-D linears ``norm_feeds`` lists that the
    layer has (the router, shared experts, dense MLP, attention's first projections); the
    experts' own readers are packed in memory and checked by name above."""
    spec = built.spec
    if built.family in NO_ROLES:
        pytest.skip("no residual roles declared (packed experts)")
    stored = built.default.names
    # the module's names where the file's differ (GraniteMoE's router.layer is router in memory)
    aliases = {v.removesuffix(".weight"): k.removesuffix(".weight")
               for k, v in (spec.experts.aliases if spec.experts else {}).items()}  # fmt: skip
    for layer in range(built.default.config["num_hidden_layers"]):
        for norm, readers in _readers(built, layer).items():
            listed = {
                aliases.get(m, m)
                for m in spec.norm_feeds.get(norm, ())
                if spec.layer_name(layer, f"{m}.weight") in stored
            }
            assert readers == listed, f"layer {layer}: {norm} feeds {sorted(readers)}"


def test_slicing_at_full_width_gives_the_same_logits(built, tmp_path):
    """``slice --sparsity 0`` rotates the residual stream through every norm, reader and writer
    the spec names (experts, shared experts and biases included), in every variant: a wrong or
    missing role changes the logits (GraniteMoE's packed experts too). gpt-oss declares no roles
    and Llama 4 is refused (``SLICE_REFUSED``), each in one line."""
    import family_checks as fc

    from splice.surgery import load_sliced

    text = fc.calibration_file(tmp_path)
    for variant, v in built.variants.items():
        with fc.quiet():
            fc.tokenizer().save_pretrained(v.path)
        out = tmp_path / variant
        argv = [
            "slice",
            v.path,
            out,
            "--sparsity",
            "0",
            "--calibration",
            text,
            *fc.SLICE_CALIB,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--dtype",
            "float32",
            "--no-progress",
        ]
        if built.family in SLICE_REFUSED:
            with pytest.raises(fc.Refused, match=SLICE_REFUSED[built.family]):
                fc.run_cli(argv)
            assert not out.exists()
            continue
        fc.run_cli(argv)
        with fc.quiet():
            sliced = load_sliced(out)
        want = fc.logits(fc.load_checked(v.path, "source"))
        fc.compare(fc.logits(sliced), want, f"{variant}: logits at 0%")


# ---- inspect --------------------------------------------------------------------------------------
def test_inspect_reports_the_experts(built):
    from splice.cli import main

    v = built.default
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["inspect", str(v.path), "--json"]) == 0
    report = json.loads(out.getvalue())
    assert report["model_type"] == built.family and not report["arch_inferred"]
    assert report["num_layers"] == v.config["num_hidden_layers"]
    assert report["num_experts"] == families.SMALL["num_experts"]
    assert report["experts_per_token"] == families.SMALL["num_experts_per_tok"]
    stored = sorted(built.spec.experts.stored) if built.spec.experts else []
    assert report["packed"] == stored  # listed per expert, stored packed
    # dense and MoE layers show as separate blocks of layers
    blocks = [b["layers"] for b in report["layer_blocks"]]
    assert sorted(i for b in blocks for i in b) == list(range(v.config["num_hidden_layers"]))
    moe = set(v.moe_layers)
    for b in blocks:
        assert len({i in moe for i in b}) == 1, blocks


# ---- analyze experts ----------------------------------------------------------------------------
def test_analyze_experts_keeps_shared_experts_apart(built):
    """``analyze experts`` on every family: the routed experts of every MoE layer are compared
    with each other (the shared experts are not among them), and with the layer's shared
    experts where those have the experts' shape (the cosine checked by hand); a shared expert
    of another width is named as skipped."""
    import torch

    from splice.analysis.experts import compare_experts

    spec, v = built.spec, built.default
    assert spec.experts is not None
    rep = compare_experts(v.path, metrics=["cosine"], baselines=False)
    routed = [r for r in rep.records if r["against"] == "experts"]
    assert {r["layer"] for r in routed} == set(v.moe_layers)
    assert {r["expert"] for r in routed} == set(range(families.SMALL["num_experts"]))
    assert {r["kind"] for r in routed} <= set(spec.experts.tensors)
    ckpt = open_checkpoint(v.path)
    shared = [r for r in rep.records if r["against"] == "shared"]
    for r in shared:
        a = ckpt.load(spec.layer_name(r["layer"], r["kind"], r["expert"]), dtype="float64")
        b = ckpt.load(spec.layer_name(r["layer"], r["dense_kind"]), dtype="float64")
        want = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        assert r["value"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    prefixes = spec.experts.shared
    has_shared = bool(prefixes) and any(
        spec.parse(n).kind.startswith(prefixes) for n in ckpt.tensors if spec.parse(n).layer
    )
    assert bool(shared or rep.meta["shared_skipped"]) == has_shared, rep.meta["shared_skipped"]
    if shared:
        assert any(k.endswith("/shared") for k in rep.matrices)


def test_a_wider_shared_expert_is_named_not_compared(tmp_path):
    from splice.analysis.experts import compare_experts

    src = families.build("qwen2_moe", tmp_path / "m", shared_expert_intermediate_size=24)
    rep = compare_experts(src, metrics=["cosine"], baselines=False)
    assert not [r for r in rep.records if r["against"] == "shared"]
    assert any("shared_expert.gate_proj.weight [24, 32]" in s for s in rep.meta["shared_skipped"])
