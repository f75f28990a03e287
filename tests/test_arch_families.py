"""Every family's spec against its tiny transformers model: the spec names every tensor and
nothing that does not exist, and its roles (norm kind and offset, embedding scale, which norm
feeds which linears, which linears write the residual stream) are what the model computes.

Each family is built once by ``families.build`` and, where its config can switch tensors on or
off, once more with the switches that add tensors (``OPTIONS_ON``: biases, q/k norms, a dense
layer in an MoE stack) and once with those that remove tensors a default model has
(``OPTIONS_OFF``); every variant is saved by transformers and read back with ``open_checkpoint``
(so names are the stored ones: Qwen3-Next's experts are saved per expert). The behavioural
checks run the default config with transformers' own initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import families
import pytest

from splice import ArchSpec, open_checkpoint

#: config fields that switch optional tensors on (each optional kind shows in some variant)
OPTIONS_ON: dict[str, dict[str, Any]] = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "qwen3": dict(attention_bias=True),
    "qwen3_next": dict(attention_bias=True, mlp_only_layers=[0]),
    "gemma": dict(attention_bias=True),
    "gemma2": dict(attention_bias=True),
    "gemma3_text": dict(attention_bias=True),
    "phi": dict(qk_layernorm=True),
    "olmo2": dict(attention_bias=True),
    "olmo3": dict(attention_bias=True),
    "granite": dict(attention_bias=True, mlp_bias=True),
    "cohere": dict(attention_bias=True, use_qk_norm=True),
    "cohere2": dict(attention_bias=True),
    "smollm3": dict(attention_bias=True, mlp_bias=True),
    "seed_oss": dict(attention_bias=True, attention_out_bias=True, mlp_bias=True),
    "apertus": dict(attention_bias=True),
    "lfm2": dict(conv_bias=True),
}
#: config fields that switch off tensors a default model has (required kinds must survive)
OPTIONS_OFF: dict[str, dict[str, Any]] = {
    "starcoder2": dict(use_bias=False),
    "glm": dict(attention_bias=False),
    "glm4": dict(attention_bias=False),
    "seed_oss": dict(attention_bias=False),
    "cohere": dict(use_qk_norm=False),
    "apertus": dict(hidden_act="silu"),
}


@dataclass
class Built:
    family: str
    spec: ArchSpec
    config: dict[str, Any]  # the saved config.json
    names: dict[str, set[str]]  # variant ("default", "on", "off") -> stored tensor names
    model: Any  # the default config, transformers' own init, eval mode


def _model(family: str, **overrides: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = families.config(family, **overrides)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(families.FAMILIES))
def built(request, tmp_path_factory) -> Built:
    family = request.param
    if not families.known(family):
        pytest.skip(f"transformers has no {family!r}")
    root = tmp_path_factory.mktemp(family)
    ckpt = open_checkpoint(families.build(family, root / "default"))
    names = {"default": set(ckpt)}
    for variant, options in (("on", OPTIONS_ON), ("off", OPTIONS_OFF)):
        if family in options:
            _model(family, **options[family]).save_pretrained(root / variant)
            names[variant] = set(open_checkpoint(root / variant))
    return Built(family, ArchSpec.load(family), ckpt.config, names, _model(family))


def _layers(spec: ArchSpec, names: set[str]) -> dict[int, set[str]]:
    """``{layer: kinds}``; an expert's kinds as the template (``mlp.experts.{e}.up_proj.weight``)."""
    out: dict[int, set[str]] = {}
    for name in names:
        t = spec.parse(name)
        if t.layer is not None:
            kind = t.kind if t.expert is None else spec.experts.prefix + t.kind
            out.setdefault(t.layer, set()).add(kind)
    return out


def _all_kinds(built: Built) -> set[str]:
    return {
        k
        for names in built.names.values()
        for ks in _layers(built.spec, names).values()
        for k in ks
    }


# ---- names --------------------------------------------------------------------------------------
def test_the_spec_is_the_family(built):
    spec = built.spec
    assert spec.model_type == built.family and not spec.inferred
    assert spec.architectures == (type(built.model).__name__,)
    assert built.config["model_type"] == built.family


def test_every_tensor_is_named(built):
    spec = built.spec
    for variant, names in built.names.items():
        other = sorted(n for n in names if spec.parse(n).group == "other")
        assert not other, f"{variant}: {other}"
        for name in names:  # layer names round-trip
            t = spec.parse(name)
            if t.layer is not None:
                assert spec.layer_name(t.layer, t.kind, t.expert) == name


def test_every_layer_has_the_required_kinds(built):
    spec = built.spec
    n = built.config["num_hidden_layers"]
    for variant, names in built.names.items():
        layers = _layers(spec, names)
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
    saved = built.names["default"]
    for group in ("embed", "final_norm"):
        assert set(spec.globals_of(group)) <= saved, group
    assert set(spec.global_tensors.get("head", ())) <= saved
    state = set(built.model.state_dict())  # holds the head even when tied
    assert set(spec.globals_of("head")) <= state


def test_roles_name_existing_modules(built):
    spec = built.spec
    kinds = _all_kinds(built)
    layer_kinds = {
        k
        for ks in (*spec.layer_tensors.values(), *spec.optional_layer_tensors.values())
        for k in ks
    }
    for norm, feeds in spec.norm_feeds.items():
        assert norm in layer_kinds and norm in kinds, norm
        for module in feeds:
            assert f"{module}.weight" in kinds, module
    assert spec.residual_writers
    for module in spec.residual_writers:
        assert f"{module}.weight" in kinds, module
    for fused in spec.fused:
        assert fused in layer_kinds, fused


# ---- config -------------------------------------------------------------------------------------
def test_tied_default_is_the_config_class_default(built):
    from transformers import CONFIG_MAPPING

    assert built.spec.tied_default == CONFIG_MAPPING[built.family]().tie_word_embeddings
    tied = built.spec.is_tied(built.config)
    assert tied == (built.spec.lm_head not in built.names["default"])


def test_config_keys(built):
    spec, cfg = built.spec, built.config
    keys = spec.config_keys
    assert keys["num_layers"] == "num_hidden_layers"
    n = cfg["num_hidden_layers"]
    for key in keys.get("per_layer", ()):
        if key in cfg:
            assert isinstance(cfg[key], list) and len(cfg[key]) == n, key
    for key in keys.get("layer_indices", ()):
        assert key in cfg, key
        assert all(isinstance(i, int) and 0 <= i < n for i in cfg[key]), key
    for role in ("num_experts", "experts_per_token"):
        if built.spec.experts is not None:
            assert role in keys, role
        if role in keys:
            assert isinstance(cfg.get(keys[role]), int), role
    per_layer_lists = {
        k
        for k, v in cfg.items()
        if isinstance(v, list)
        and len(v) == n
        and k != "architectures"
        and not k.endswith("_token_id")
    }
    assert per_layer_lists <= set(keys.get("per_layer", ())), "a per-layer config list is not named"


# ---- what the model computes --------------------------------------------------------------------
def _norm_modules(built: Built) -> dict[str, Any]:
    """The residual-stream norms of layer 0 and the final norm: full weight name -> module."""
    spec, model = built.spec, built.model
    names = [
        spec.layer_name(0, k) for k in spec.layer_tensors.get("norms", ()) if k.endswith(".weight")
    ]
    names.append(spec.final_norm)
    return {n: model.get_submodule(n.removesuffix(".weight")) for n in names}


def test_norm_kind_and_offset(built):
    """``layer`` norms ignore a shift of every channel (mean-centering), RMS norms do not;
    ``offset`` 1.0 norms (``1 + w``) are initialised to zeros by transformers, others to ones."""
    import torch

    kind, offset = built.spec.norm["kind"], built.spec.norm.get("offset", 0.0)
    assert kind in ("rms", "layer") and offset in (0.0, 1.0)
    x = torch.randn(3, built.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    for name, module in _norm_modules(built).items():
        with torch.no_grad():
            centred = torch.allclose(module(x), module(x + 3.0), atol=1e-4)
        assert centred == (kind == "layer"), f"{name} ({type(module).__name__})"
        expected = 0.0 if offset == 1.0 else 1.0
        assert torch.all(module.weight == expected), f"{name}: not {expected} at init"


@dataclass
class Trace:
    """The default model's forward on 12 random tokens: each module's first input and output."""

    ids: Any
    inputs: dict[str, Any]
    outputs: dict[str, Any]


@pytest.fixture(scope="module")
def trace(built) -> Trace:
    import torch

    ids = torch.randint(
        3, built.config["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0)
    )
    trace = Trace(ids, {}, {})

    def pre(name):
        def hook(module, args, kwargs):
            tensors = [*args, *(v for v in kwargs.values() if isinstance(v, torch.Tensor))]
            trace.inputs[name] = tensors[0]

        return hook

    def post(name):
        def hook(module, args, out):
            trace.outputs[name] = out[0] if isinstance(out, tuple) else out

        return hook

    handles = []
    for name, module in built.model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post(name)))
    try:
        with torch.no_grad():
            built.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return trace


def _prefix(spec: ArchSpec, layer: int) -> str:
    return spec.layer_prefix.replace("{i}", str(layer))


def test_embed_scale(built, trace):
    """The first layer reads the embedding rows times the scale ``embed_scale`` names."""
    import torch

    spec, cfg = built.spec, built.config
    scale = {None: 1.0, "sqrt_hidden_size": math.sqrt(cfg["hidden_size"])}.get(spec.embed_scale)
    if scale is None:
        assert spec.embed_scale.startswith("config:"), spec.embed_scale
        scale = float(cfg[spec.embed_scale.removeprefix("config:")])
    rows = built.model.get_submodule(spec.embed.removesuffix(".weight")).weight[trace.ids]
    first = trace.inputs[_prefix(spec, 0).rstrip(".")]
    torch.testing.assert_close(first, rows * scale, rtol=1e-5, atol=1e-6)


def _readers(built: Built, trace: Trace, layer: int) -> dict[str, set[str]]:
    """``{norm kind: modules of the layer with a 2-D weight that read its output}`` for the
    layer's ``norms`` kinds (layer-relative module names, e.g. ``self_attn.q_proj``)."""
    import torch

    spec, hidden = built.spec, built.config["hidden_size"]
    prefix = _prefix(spec, layer)
    params = dict(built.model.named_parameters())
    linears = {
        name: x.reshape(-1, hidden)
        for name, x in trace.inputs.items()
        if name.startswith(prefix)
        and x.shape[-1] == hidden
        and (w := params.get(f"{name}.weight")) is not None
        and w.dim() == 2
    }
    out = {}
    for norm in spec.layer_tensors.get("norms", ()):
        module = prefix + norm.removesuffix(".weight")
        if norm.endswith(".weight") and module in trace.outputs:
            y = trace.outputs[module].reshape(-1, hidden)
            out[norm] = {
                name.removeprefix(prefix)
                for name, x in linears.items()
                if x.shape == y.shape and torch.equal(x, y)
            }
    return out


def test_norm_feeds_are_the_readers_of_each_norm(built, trace):
    """In every layer each norm's output is read by exactly the linears ``norm_feeds`` lists
    (those the layer has: a hybrid layer has one mixer's)."""
    spec = built.spec
    params = dict(built.model.named_parameters())
    for layer in range(built.config["num_hidden_layers"]):
        prefix = _prefix(spec, layer)
        for norm, readers in _readers(built, trace, layer).items():
            listed = {m for m in spec.norm_feeds.get(norm, ()) if f"{prefix}{m}.weight" in params}
            assert readers == listed, f"layer {layer}: {norm} feeds {sorted(readers)}"


def _post_norms(built: Built, trace: Trace, layer: int) -> dict[str, str]:
    """``{module: the norm of the layer that reads its output}`` over the layer's modules with a
    2-D weight (full names): the writers of a post-norm or sandwich block."""
    import torch

    spec = built.spec
    prefix = _prefix(spec, layer)
    params = dict(built.model.named_parameters())
    norms = [prefix + k.removesuffix(".weight") for k in spec.layer_tensors.get("norms", ())]
    out = {}
    for name, y in trace.outputs.items():
        w = params.get(f"{name}.weight")
        if not name.startswith(prefix) or w is None or w.dim() != 2:
            continue
        for norm in norms:
            x = trace.inputs.get(norm)
            if x is not None and x.shape == y.shape and torch.equal(x, y):
                out[name] = norm
    return out


def test_block(built, trace):
    """``block`` as the forward shows it: no norm feeds a linear (post_norm); the writers'
    outputs go through a norm (sandwich); one norm feeds attention and MLP (parallel)."""
    spec = built.spec
    for layer in range(built.config["num_hidden_layers"]):
        readers = _readers(built, trace, layer)
        groups = [
            {spec.parse(spec.layer_name(layer, f"{r}.weight")).group for r in rs}
            for rs in readers.values()
        ]
        if not any(readers.values()):
            block = "post_norm"
        elif _post_norms(built, trace, layer):
            block = "sandwich"
        elif any({"attention", "mlp"} <= g for g in groups):
            block = "parallel"
        else:
            block = "pre_norm"
        assert spec.block == block, f"layer {layer}"


def test_residual_writers_write_the_stream(built, trace):
    """pre-norm / parallel blocks: a layer adds exactly its writers' outputs to the stream
    (granite: times ``residual_multiplier``); post-norm / sandwich blocks: every writer's output
    is what a norm of its layer reads, before the stream."""
    import torch

    spec, hidden = built.spec, built.config["hidden_size"]
    if spec.experts is not None:
        pytest.skip("the router weights the experts (Qwen3-Next: a sigmoid gates the shared one)")
    for layer in range(built.config["num_hidden_layers"]):
        prefix = _prefix(spec, layer)
        writers = [prefix + m for m in spec.residual_writers if prefix + m in trace.outputs]
        assert writers, f"layer {layer} has no writer"
        for w in writers:
            assert trace.outputs[w].shape[-1] == hidden, f"{w} does not write [.., hidden]"
        if spec.block in ("pre_norm", "parallel"):
            layer_module = prefix.rstrip(".")
            delta = trace.outputs[layer_module] - trace.inputs[layer_module]
            total = sum(trace.outputs[w] for w in writers)
            total = total * built.config.get("residual_multiplier", 1.0)
            torch.testing.assert_close(total, delta, rtol=1e-4, atol=1e-5)
        else:
            assert set(_post_norms(built, trace, layer)) == set(writers), f"layer {layer}"
