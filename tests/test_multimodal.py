"""Every verb acts on the language model of a multimodal checkpoint and carries the other modules.

Acceptance tests over tiny random vision-language models of each family splice maps (Gemma 3,
Qwen2.5-VL, Qwen3-VL, Mistral 3, Llama 4; :mod:`mm_families`), untied and tied where the family
ties, checked against transformers' own multimodal models, never against splice:

- merge (linear, two seeds; and a text-family fine-tune merged back into the multimodal base):
  the output loads in ``AutoModelForImageTextToText`` as the input's class with nothing
  missing, unexpected or mismatched, under the input's stored names; its text logits are those
  of the input's module with every language-model parameter replaced by the hand-computed mix;
  the vision tower and projector are the base's, byte for byte; ``text_config`` is unchanged;
- upscale ``--duplicate`` / prune ``--drop`` / prune ``--n --by angular``: the input's module
  with its decoder layers rearranged (deep copies, per-layer config lists and ``layer_idx``
  following); ``--expand``: identity blocks, so the image path's logits are unchanged;
- convert ``--text-only``: the language model alone, as its text family;
- inspect: the modules listed (text and ``--json``);
- slice, heal, collapse, analyze: each works on the language model, or refuses in one line
  (exit code 2, nothing written).
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer
from families import build
from mm_families import MM_FAMILIES, build_mm
from safetensors import safe_open
from surgery_helpers import word_text

from splice.cli import main

torch.set_num_threads(1)

#: (model_type, tied): every family untied, tied where the family's released models tie
CASES = [
    ("gemma3", False),
    ("gemma3", True),
    ("qwen2_5_vl", False),
    ("qwen2_5_vl", True),
    ("qwen3_vl", False),
    ("qwen3_vl", True),
    ("mistral3", False),
    ("llama4", False),
]
IDS_OF = [f"{m}-{'tied' if t else 'untied'}" for m, t in CASES]
#: the text family (model_type, causal-LM class) of each multimodal family
TEXT = {
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "qwen2_5_vl": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3_vl": ("qwen3", "Qwen3ForCausalLM"),
    "mistral3": ("mistral", "MistralForCausalLM"),
    "llama4": ("llama4_text", "Llama4ForCausalLM"),
}
#: stored-name prefixes of the modules other than the language model (transformers' layouts)
VISION = tuple(
    root + module
    for root in ("", "model.")
    for module in ("visual.", "vision_tower.", "vision_model.", "multi_modal_projector.")
)
#: stored-name prefixes of the language model's body, as its text family's ``model.``
TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
#: a text-only input (no image or special vision token: those are 92-95)
IDS = torch.tensor([[1, 5, 17, 42, 9, 77, 3, 60, 11, 88, 23, 4]])
W_A, W_B = 0.7, 0.3
#: the tensors that write into the residual stream (LLaMA-Pro zeroes them in its new blocks)
WRITERS = ("o_proj.weight", "down_proj.weight", "down_proj", "o_proj.bias", "down_proj.bias")
NO_PROGRESS = "--no-progress"


# --- models ------------------------------------------------------------------------------------


class Zoo:
    """Tiny models built on first use and kept for the module: per (family, tied) the
    multimodal model ``a`` (seed 0), another ``b`` (seed 1), a text-family model ``text`` of
    the same sizes (seed 2), and ``a`` with a word-level tokenizer (``tok``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[str, bool, str], Path] = {}
        self.calibration = root / "calibration.txt"
        self.calibration.write_text(word_text())

    def __call__(self, model_type: str, tied: bool, which: str = "a") -> Path:
        key = (model_type, tied, which)
        if key not in self.made:
            folder = self.root / f"{model_type}-{int(tied)}-{which}"
            if which in ("a", "b"):
                seed = 0 if which == "a" else 1
                build_mm(model_type, folder, seed=seed, tied=tied)
            elif which == "text":
                text_twin(model_type, folder, tied=tied)
            else:  # "tok": a, with a tokenizer calibration text can be read with
                shutil.copytree(self(model_type, tied), folder)
                make_tokenizer(96).save_pretrained(folder)
            self.made[key] = folder
        return self.made[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("mm"))


def text_twin(model_type: str, folder: Path, *, seed: int = 2, tied: bool = False) -> Path:
    """A text-family model with the language model's sizes (a text fine-tune of it)."""
    family = TEXT[model_type][0]
    extra = {
        k: v
        for k, v in MM_FAMILIES[model_type].get("text_extra", {}).items()
        if k != "rope_scaling"
    }
    return build(family, folder, seed=seed, tie_word_embeddings=tied, **extra)


def load_mm(folder: Path, *, info: bool = False):
    """transformers' own multimodal model of ``folder``, float32, eval."""
    from transformers import AutoModelForImageTextToText

    got = AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=info
    )
    if info:
        return got[0].eval(), got[1]
    return got.eval()


def loaded_clean(folder: Path):
    """The output's multimodal model, checked to load with nothing missing or left over."""
    model, info = load_mm(folder, info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], (key, info[key])
    return model


def text_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(decoder, lm_head)`` of a multimodal module (Llama 4 nests a whole causal LM)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model, model.lm_head
    return model.language_model.model, model.language_model.lm_head


def text_params(model) -> dict[str, torch.nn.Parameter]:
    """The language model's parameters under its text family's names."""
    decoder, head = text_parts(model)
    params = {"model." + n: p for n, p in decoder.named_parameters()}
    if head.weight is not decoder.embed_tokens.weight:
        params["lm_head.weight"] = head.weight
    return params


def text_logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def mixed(a: Path, others: dict[str, torch.nn.Parameter]):
    """``a``'s multimodal module with every language-model parameter set to
    ``W_A * a + W_B * other`` (``others``: the other model's, by text-family name)."""
    model = load_mm(a)
    mine = text_params(model)
    assert set(mine) == set(others)
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(W_A * p + W_B * others[name])
    return model


def relayered(folder: Path, order: list[int], zero: tuple[int, ...] = ()):
    """``folder``'s multimodal module with its decoder layers rebuilt as deep copies of
    ``order`` (the per-layer config lists, ``moe_layers`` and every ``layer_idx`` following)."""
    model = load_mm(folder)
    decoder, _ = text_parts(model)
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(copy.deepcopy(layers[i]) for i in order)
    for i, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    cfg = decoder.config
    n = cfg.num_hidden_layers
    for key in ("layer_types", "no_rope_layers"):
        values = getattr(cfg, key, None)
        if isinstance(values, list) and len(values) == n:
            setattr(cfg, key, [values[i] for i in order])
    if isinstance(getattr(cfg, "moe_layers", None), list):
        cfg.moe_layers = [j for j, i in enumerate(order) if i in cfg.moe_layers]
    cfg.num_hidden_layers = len(order)
    return model


# --- stored tensors ----------------------------------------------------------------------------


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})  # noqa: SIM118
    return out


def is_vision(name: str) -> bool:
    return name.startswith(VISION)


def text_name(name: str) -> str:
    """A stored language-model tensor's text-family name."""
    if name.endswith("lm_head.weight"):
        return "lm_head.weight"
    prefix = next(p for p in TEXT_PREFIXES if name.startswith(p))
    return "model." + name[len(prefix) :]


def same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.dtype == y.dtype and x.shape == y.shape and x.view(torch.uint8).equal(y.view(torch.uint8))
    )


def assert_vision_carried(src: Path, out: Path) -> None:
    """Every vision-tower and projector tensor of ``out`` is ``src``'s, byte for byte, and
    none is missing or added."""
    mine, theirs = stored(src), stored(out)
    vision = {n for n in mine if is_vision(n)}
    assert vision, "the source has no vision tensors"
    assert {n for n in theirs if is_vision(n)} == vision
    for name in vision:
        assert same_bytes(mine[name], theirs[name]), name


def text_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {text_name(n): t for n, t in stored(folder).items() if not is_vision(n)}


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def assert_config_kept(src: Path, out: Path, changed: dict) -> None:
    """``out``'s config is ``src``'s but for the ``text_config`` fields in ``changed`` (set to
    those values; ``None``: any value)."""
    before, after = config(src), config(out)
    top = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert top <= {"text_config"}, top
    tb, ta = before["text_config"], after["text_config"]
    diff = {k for k in set(tb) | set(ta) if tb.get(k) != ta.get(k)}
    assert diff <= set(changed), diff - set(changed)
    for key, value in changed.items():
        if value is not None:
            assert ta.get(key) == value, (key, ta.get(key), value)


def run_ok(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def refused(capsys, out: Path, *argv) -> str:
    """Run a verb that must refuse: exit code 2, one line on stderr, nothing written."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def recipe(folder: Path, a: Path, b: Path) -> Path:
    path = folder / "recipe.yml"
    path.write_text(
        "models:\n"
        f"  - model: {a}\n    parameters:\n      weight: {W_A}\n"
        f"  - model: {b}\n    parameters:\n      weight: {W_B}\n"
        f"merge_method: linear\nbase_model: {a}\ndtype: float32\n"
    )
    return path


def per_layer_changes(src: Path, order: list[int]) -> dict:
    """The text_config fields a layer map ``order`` rewrites, with their expected values."""
    text = config(src)["text_config"]
    n = text["num_hidden_layers"]
    out: dict = {"num_hidden_layers": len(order)}
    for key in ("layer_types", "no_rope_layers"):
        if isinstance(text.get(key), list) and len(text[key]) == n:
            out[key] = [text[key][i] for i in order]
    if isinstance(text.get("moe_layers"), list):
        out["moe_layers"] = [j for j, i in enumerate(order) if i in text["moe_layers"]]
        out["interleave_moe_layer_step"] = None  # any value that agrees with moe_layers
    return out


# --- 1. merge ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "tied"), CASES, ids=IDS_OF)
def test_linear_merge_of_two_multimodal_models(zoo, tmp_path, model_type, tied):
    a, b = zoo(model_type, tied, "a"), zoo(model_type, tied, "b")
    out = tmp_path / "out"
    run_ok("merge", recipe(tmp_path, a, b), out, NO_PROGRESS)

    got = loaded_clean(out)
    want = mixed(a, text_params(load_mm(b)))
    assert type(got) is type(want)
    assert config(out)["architectures"] == config(a)["architectures"]
    torch.testing.assert_close(text_logits(got), text_logits(want), atol=1e-5, rtol=0)
    assert (text_logits(got) - text_logits(load_mm(a))).abs().max() > 1e-3  # not vacuous

    assert set(stored(out)) == set(stored(a))  # the input's layout, names and all
    assert_vision_carried(a, out)
    ta, tb, to = text_tensors(a), text_tensors(b), text_tensors(out)
    for name, t in to.items():
        torch.testing.assert_close(t, W_A * ta[name] + W_B * tb[name], atol=1e-6, rtol=0)
    assert_config_kept(a, out, {})
    assert (out / "preprocessor_config.json").is_file()


@pytest.mark.parametrize(("model_type", "tied"), CASES, ids=IDS_OF)
def test_a_text_fine_tune_merged_back(zoo, tmp_path, model_type, tied):
    """base: the multimodal model; other: a text-family model of the language model's sizes.
    The output is the multimodal model again, its language model the mix."""
    from transformers import AutoModelForCausalLM

    a, text = zoo(model_type, tied, "a"), zoo(model_type, tied, "text")
    out = tmp_path / "out"
    run_ok("merge", recipe(tmp_path, a, text), out, NO_PROGRESS)

    got = loaded_clean(out)
    other = AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32)
    want = mixed(a, dict(other.named_parameters()))
    assert type(got) is type(want)
    torch.testing.assert_close(text_logits(got), text_logits(want), atol=1e-5, rtol=0)
    assert set(stored(out)) == set(stored(a))
    assert_vision_carried(a, out)
    assert_config_kept(a, out, {})


# --- 3. upscale ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "tied"), CASES, ids=IDS_OF)
def test_upscale_duplicate(zoo, tmp_path, model_type, tied):
    a, out = zoo(model_type, tied), tmp_path / "out"
    order = [0, 1, 2, 1, 2, 3]
    run_ok("upscale", a, out, "--duplicate", "1:3", NO_PROGRESS)

    got = loaded_clean(out)
    want = relayered(a, order)
    assert type(got) is type(want)
    torch.testing.assert_close(text_logits(got), text_logits(want), atol=1e-5, rtol=0)
    assert_config_kept(a, out, per_layer_changes(a, order))
    assert_vision_carried(a, out)
    src, written = text_tensors(a), text_tensors(out)
    for name, t in written.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            name = f"model.layers.{order[int(i)]}.{rest}"
        assert same_bytes(t, src[name]), name


def image_inputs(model_type: str, folder: Path) -> dict[str, torch.Tensor]:
    """A processor-free image input of the family: pixel values and as many image tokens (in
    the family's markers) as its projector makes of them, per its modeling code."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    if model_type == "gemma3":  # [B, 3, image_size, image_size] -> mm_tokens_per_image tokens
        tok = cfg.image_token_index
        ids = [1, 5, cfg.boi_token_index, *[tok] * cfg.mm_tokens_per_image, cfg.eoi_token_index]
        ids = torch.tensor([[*ids, 42, 9, 77]])
        pixels = torch.randn(1, 3, 16, 16, generator=g)
        return dict(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == tok).long())
    if model_type == "mistral3":  # 16x16 / patch 4 = 4x4 patches, merged 2x2: 4 tokens
        ids = torch.tensor([[1, 5, 17, *[cfg.image_token_index] * 4, 42, 9, 77]])
        pixels = torch.randn(1, 3, 16, 16, generator=g)
        return dict(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[16, 16]]))
    if model_type == "llama4":  # 16x16 / patch 4, pixel-shuffled by 0.5: 4 tokens
        ids = [1, 5, cfg.boi_token_index, *[cfg.image_token_index] * 4, cfg.eoi_token_index]
        ids = torch.tensor([[*ids, 42, 9, 77]])
        return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, generator=g))
    # Qwen-VL: flattened patches [t*h*w, 3*temporal*patch^2], grid (1, 4, 4), merged 2x2: 4
    v = cfg.vision_config
    tok = cfg.image_token_id
    ids = [1, 5, cfg.vision_start_token_id, *[tok] * 4, cfg.vision_end_token_id, 42, 9, 77]
    ids = torch.tensor([ids])
    pixels = torch.randn(16, 3 * v.temporal_patch_size * v.patch_size**2, generator=g)
    return dict(
        input_ids=ids,
        pixel_values=pixels,
        image_grid_thw=torch.tensor([[1, 4, 4]]),
        mm_token_type_ids=(ids == tok).long(),
    )


def image_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize(("model_type", "tied"), CASES, ids=IDS_OF)
def test_upscale_expand_keeps_the_image_path(zoo, tmp_path, model_type, tied):
    """--expand 2 on 4 layers: copies after layers 1 and 3 with their residual writers zeroed,
    so text and image logits are the input's (Llama 4: its MoE layers listed, moe_layers)."""
    a, out = zoo(model_type, tied), tmp_path / "out"
    order = [0, 1, 1, 2, 3, 3]
    run_ok("upscale", a, out, "--expand", "2", NO_PROGRESS)
    got, src = loaded_clean(out), load_mm(a)
    assert type(got) is type(src)
    torch.testing.assert_close(text_logits(got), text_logits(src), atol=1e-5, rtol=0)
    inputs = image_inputs(model_type, a)
    want = image_logits(src, inputs)
    assert (want - text_logits(src, inputs["input_ids"].clamp(max=90))).abs().max() > 1e-3
    torch.testing.assert_close(image_logits(got, inputs), want, atol=1e-5, rtol=0)
    assert_config_kept(a, out, per_layer_changes(a, order))
    assert_vision_carried(a, out)
    # the copies are their source layers but for the zeroed residual writers
    src_t, written = text_tensors(a), text_tensors(out)
    for name, t in written.items():
        if not name.startswith("model.layers."):
            assert same_bytes(t, src_t[name]), name
            continue
        i, rest = name[len("model.layers.") :].split(".", 1)
        source = src_t[f"model.layers.{order[int(i)]}.{rest}"]
        if int(i) in (2, 5) and rest.endswith(WRITERS):
            assert not t.any(), name
        else:
            assert same_bytes(t, source), name


# --- 4. prune -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "tied"), CASES, ids=IDS_OF)
def test_prune_drop(zoo, tmp_path, model_type, tied):
    a, out = zoo(model_type, tied), tmp_path / "out"
    keep = [0, 2, 3]
    run_ok("prune", a, out, "--drop", "1", NO_PROGRESS)
    got = loaded_clean(out)
    want = relayered(a, keep)
    torch.testing.assert_close(text_logits(got), text_logits(want), atol=1e-5, rtol=0)
    assert_config_kept(a, out, per_layer_changes(a, keep))
    assert_vision_carried(a, out)


def angular_distances(folder: Path, windows: torch.Tensor) -> list[float]:
    """d(l, l+1) for each layer l of the multimodal module on text ``windows``: the mean over
    windows of the angle / pi between the last token's residual stream before and after layer
    l (after the final norm for the last layer), from forward hooks on transformers' modules."""
    model = load_mm(folder)
    decoder, _ = text_parts(model)
    states: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs: states.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for layer in decoder.layers
    ]
    hooks.append(decoder.norm.register_forward_hook(lambda _m, _i, o: states.append(o)))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    last = [s[:, -1].double() for s in states]
    out = []
    for x, y in itertools.pairwise(last):
        cos = (x * y).sum(-1) / x.norm(dim=-1) / y.norm(dim=-1)
        out.append(float((torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean()))
    return out


@pytest.mark.parametrize(("model_type", "tied"), CASES, ids=IDS_OF)
def test_prune_by_angular_distance(zoo, tmp_path, model_type, tied, capsys):
    from splice.calib import calibration_text, token_windows
    from splice.modeling import load_tokenizer

    src, out = zoo(model_type, tied, "tok"), tmp_path / "out"
    capsys.readouterr()
    run_ok(
        "prune", src, out, "--n", "1", "--by", "angular", "--calibration", zoo.calibration,
        "--seq-len", "16", "--max-samples", "8", "--batch-size", "4", "--device", "cpu",
        "--json", NO_PROGRESS,
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    windows = token_windows(load_tokenizer(src), calibration_text(zoo.calibration), 16, 8)
    dist = angular_distances(src, windows)
    values = [c["value"] for c in report["candidates"]]
    assert values == pytest.approx(dist, abs=1e-5)
    chosen = min(range(len(dist)), key=dist.__getitem__)
    assert report["chosen"] == [chosen]
    keep = [i for i in range(4) if i != chosen]
    got = loaded_clean(out)
    want = relayered(src, keep)
    torch.testing.assert_close(text_logits(got), text_logits(want), atol=1e-5, rtol=0)
    assert_config_kept(src, out, per_layer_changes(src, keep))
    assert_vision_carried(src, out)


# --- 5. convert --text-only ---------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "tied"), CASES, ids=IDS_OF)
def test_convert_text_only(zoo, tmp_path, model_type, tied):
    from transformers import AutoModelForCausalLM

    a, out = zoo(model_type, tied), tmp_path / "out"
    run_ok("convert", a, out, "--text-only", NO_PROGRESS)
    family, architecture = TEXT[model_type]
    cfg = config(out)
    assert cfg["model_type"] == family and cfg["architectures"] == [architecture]
    assert cfg["tie_word_embeddings"] is tied
    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == architecture
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], (key, info[key])
    with torch.no_grad():
        got = model.eval()(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, text_logits(load_mm(a)), atol=1e-5, rtol=0)
    written, want = stored(out), text_tensors(a)
    assert set(written) == set(want)
    assert ("lm_head.weight" in written) is not tied
    for name, t in want.items():
        assert same_bytes(t, written[name]), name


# --- 6. inspect ---------------------------------------------------------------------------------

#: the modules inspect lists beside the language model, per family
MODULES = {
    "gemma3": ("vision_tower", "multi_modal_projector"),
    "qwen2_5_vl": ("vision_tower", "multi_modal_projector"),
    "qwen3_vl": ("vision_tower", "multi_modal_projector"),
    "mistral3": ("vision_tower", "multi_modal_projector"),
    "llama4": ("vision_model", "multi_modal_projector"),
}


@pytest.mark.parametrize("model_type", list(MODULES))
def test_inspect_lists_the_modules(zoo, model_type, capsys):
    a = zoo(model_type, False)
    capsys.readouterr()
    run_ok("inspect", a)
    lines = capsys.readouterr().out.splitlines()
    head = [i for i, line in enumerate(lines) if line.startswith("multimodal")]
    assert len(head) == 1
    assert model_type in lines[head[0]]
    listed = [line.split()[0] for line in lines[head[0] + 1 : head[0] + 4]]
    assert sorted(listed) == sorted(("text_decoder", *MODULES[model_type]))
    assert any(line.startswith("architecture") and TEXT[model_type][0] in line for line in lines)

    run_ok("inspect", a, "--json")
    data = json.loads(capsys.readouterr().out)
    mm = data["multimodal"]
    assert mm["model_type"] == model_type
    assert sorted(m["module"] for m in mm["modules"]) == sorted(MODULES[model_type])
    names = stored(a)
    for module in mm["modules"]:
        assert any(n.startswith(module["prefix"]) for n in names), module
    assert data["model_type"] == TEXT[model_type][0]


# --- 7. the other verbs -------------------------------------------------------------------------


def test_heal_trains_the_language_model_alone(zoo, tmp_path):
    """heal on Qwen2.5-VL: the output loads as the input's class, its language model trained
    (tensors changed), the vision tower and projector carried byte for byte, config kept."""
    src, out = zoo("qwen2_5_vl", False, "tok"), tmp_path / "out"
    run_ok(
        "heal", src, out, "--calibration", zoo.calibration, "--steps", "1", "--lr", "1e-3",
        "--seq-len", "16", "--batch-size", "2", "--device", "cpu", NO_PROGRESS,
    )  # fmt: skip
    got = loaded_clean(out)
    assert type(got) is type(load_mm(src))
    assert_vision_carried(src, out)
    assert_config_kept(src, out, {})
    before, after = text_tensors(src), text_tensors(out)
    assert set(before) == set(after)
    assert any(not same_bytes(before[n], after[n]) for n in before)


def calibration_opts(zoo: Zoo) -> tuple:
    return ("--calibration", zoo.calibration, "--seq-len", "16", "--max-samples", "8",
            "--batch-size", "4", "--device", "cpu", NO_PROGRESS)  # fmt: skip


#: the module tensors that write the language model's residual stream, which slicing rotates
#: (stored-name prefixes): the projector's last linear, Qwen3-VL's deepstack mergers
STREAM_WRITERS = {
    "qwen3_vl": (
        "model.visual.merger.linear_fc2.",
        "model.visual.deepstack_merger_list.0.linear_fc2.",
    ),
    "llama4": ("multi_modal_projector.linear_1.",),
}


@pytest.mark.parametrize("model_type", list(STREAM_WRITERS))
def test_slice_shared_basis(zoo, tmp_path, model_type):
    """slice --basis shared on Qwen3-VL (deepstack) and Llama 4: at sparsity 0 a pure rotation
    of the stream, so text and image logits are the input's (the projector's writers rotated
    with it); at 0.25 a narrower stream that loads, every other vision tensor carried."""
    src = zoo(model_type, False, "tok")
    writers = STREAM_WRITERS[model_type]
    rotated = tmp_path / "rotated"
    run_ok("slice", src, rotated, "--basis", "shared", "--sparsity", "0", *calibration_opts(zoo))
    got, ref = loaded_clean(rotated), load_mm(src)
    torch.testing.assert_close(text_logits(got), text_logits(ref), atol=1e-5, rtol=0)
    inputs = image_inputs(model_type, src)
    torch.testing.assert_close(
        image_logits(got, inputs), image_logits(ref, inputs), atol=1e-5, rtol=0
    )

    out = tmp_path / "sliced"
    run_ok("slice", src, out, "--basis", "shared", "--sparsity", "0.25", *calibration_opts(zoo))
    loaded_clean(out)
    before_cfg, cfg = config(src), config(out)
    assert cfg["text_config"] == {**before_cfg["text_config"], "hidden_size": 24}
    vision_cfg = dict(before_cfg["vision_config"])
    if model_type == "qwen3_vl":  # the merger's output width is the language model's
        vision_cfg["out_hidden_size"] = 24
    assert cfg == {**before_cfg, "text_config": cfg["text_config"], "vision_config": vision_cfg}
    before, after = stored(src), stored(out)
    vision = {n for n in before if is_vision(n)}
    assert {n for n in after if is_vision(n)} == vision
    for name in vision:
        if name.startswith(writers):  # [hidden, in] -> [24, in]; bias [hidden] -> [24]
            assert after[name].shape == (24, *before[name].shape[1:]), name
        else:
            assert same_bytes(before[name], after[name]), name
    assert sum(n.startswith(writers) for n in vision) >= 1
    # the report's parameter counts compare like with like: a rotation adds or removes nothing
    report = json.loads((rotated / "splice_surgery.json").read_text())
    assert report["params_output"] == report["params_source"]


@pytest.mark.parametrize(
    ("model_type", "why"),
    [("gemma3", "post-norm"), ("mistral3", "projector"), ("qwen2_5_vl", "head_dim")],
)
def test_slice_refuses_in_one_line(zoo, tmp_path, capsys, model_type, why):
    """Gemma 3's language model is post-norm; Mistral 3's projector has an activation at the
    language model's width; Qwen2.5-VL's text config derives head_dim from hidden_size. Each
    refuses in one line, nothing written."""
    src = zoo(model_type, False, "tok")
    out = tmp_path / "out"
    err = refused(capsys, out, "slice", src, out, "--basis", "shared", *calibration_opts(zoo))
    assert why in err


def test_slice_per_layer_refuses_in_one_line(zoo, tmp_path, capsys):
    """--basis per-layer writes splice's own model type, which has no multimodal form."""
    src = zoo("qwen3_vl", False, "tok")
    out = tmp_path / "out"
    err = refused(capsys, out, "slice", src, out, "--basis", "per-layer", *calibration_opts(zoo))
    assert "no multimodal form" in err


def test_a_lora_adapter_on_a_multimodal_base_refuses_in_one_line(zoo, tmp_path, capsys):
    """BASE+ADAPTER with a multimodal base is refused before the adapter is read."""
    src = zoo("gemma3", False)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out = tmp_path / "out"
    err = refused(capsys, out, "upscale", f"{src}+{adapter}", out, "--duplicate", "1:3")
    assert "LoRA adapter on a multimodal model (gemma3)" in err


def test_collapse_of_llama4_refuses_in_one_line(zoo, tmp_path, capsys):
    src = zoo("llama4", False, "tok")
    out = tmp_path / "uniform"
    err = refused(capsys, out, "collapse", src, out, "--device", "cpu", NO_PROGRESS)
    assert "llama4_text" in err
    out = tmp_path / "keep"
    opts = calibration_opts(zoo)
    err = refused(capsys, out, "collapse", src, out, "--keep-experts", "2", "--prune", *opts)
    assert "llama4_text" in err


def test_analyze_reads_the_language_model(zoo, tmp_path, capsys):
    """analyze weights / tasks / activations on Gemma 3, experts on Llama 4: each runs on the
    language model's tensors (the text family's names), never on the vision modules."""
    a, b, src = zoo("gemma3", False, "a"), zoo("gemma3", False, "b"), zoo("gemma3", False, "tok")
    merged = tmp_path / "merged"
    run_ok("merge", recipe(tmp_path, a, b), merged, NO_PROGRESS)
    runs = [
        ("weights", a, b),
        ("tasks", a, b, merged),
        ("activations", src, "--calibration", zoo.calibration, "--seq-len", "16",
         "--max-samples", "8", "--device", "cpu"),
        ("experts", zoo("llama4", False)),
    ]  # fmt: skip
    for argv in runs:
        capsys.readouterr()
        run_ok("analyze", *argv)
        text = capsys.readouterr().out
        assert not any(word in text for word in ("vision", "visual", "projector")), argv[0]
        if argv[0] in ("weights", "tasks"):
            assert "self_attn.q_proj" in text and "model.embed_tokens" in text


def test_evolve_searches_the_language_models(zoo, tmp_path):
    """An evolve run over three Gemma 3 checkpoints merges their language models into one
    resident text model (the sources held as resident language models); its best recipe
    merges into the multimodal checkpoint with the base's vision tower."""
    from evolve_helpers import config_dict, write_config, write_tasks

    trio = {"base": zoo("gemma3", False, "tok")}
    for name, which in (("ft1", "b"), ("ft2", "text")):
        trio[name] = tmp_path / name
        shutil.copytree(zoo("gemma3", False, which), trio[name])
        make_tokenizer(96).save_pretrained(trio[name])
    cfg = config_dict(trio, write_tasks(tmp_path / "tasks"), generations=1, popsize=2)
    run = tmp_path / "run"
    run_ok("evolve", write_config(tmp_path / "c.yml", cfg), "--out", run, "--no-progress")
    out = tmp_path / "winner"
    run_ok("merge", run / "best.yml", out, "--no-progress")
    assert type(loaded_clean(out)).__name__ == "Gemma3ForConditionalGeneration"
    assert_vision_carried(trio["base"], out)
