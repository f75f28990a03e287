"""The inputs of the frozen mergekit goldens: three tiny llama checkpoints and the recipes.

Shared by ``make_golden.py`` (which runs mergekit on them) and ``tests/test_merge_golden.py``
(which runs splice on them), so both see bit-identical models.

The weights come from ``torch.rand`` on a seeded CPU ``torch.Generator``: mt19937 integers
turned into multiples of 2**-24 (exact, no transcendental functions, unlike ``randn``, whose
vectorised Box-Muller may differ by an ulp between CPUs), then shifted and scaled by single,
correctly rounded float32 operations. ``fingerprint`` hashes the result; the goldens record
it, so a machine (or torch version) that draws different numbers is reported as such.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

#: the model shape: llama, 2 layers, hidden 16, 4 heads of 4 (2 key/value heads), vocab 32
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 20,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 32,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: model -> seed of its generator. ``base`` is drawn; ``ft1`` / ``ft2`` are base plus a small
#: drawn delta (a "fine-tune"), as in conftest's ``trio``
SEEDS = {"base": 0, "ft1": 1, "ft2": 2}
BASE_SCALE = 0.25  # base entries uniform in [-0.125, 0.125), norms in 1 + that
DELTA_SCALE = 0.02  # fine-tune deltas uniform in [-0.01, 0.01)


def shapes(config: dict = CONFIG) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, by name, in a fixed order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    out |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return out


def _uniform(shape: tuple[int, ...], g: torch.Generator, scale: float) -> torch.Tensor:
    """Uniform in [-scale/2, scale/2): ``rand`` is exact (k * 2**-24), minus 0.5 is exact,
    times ``scale`` is one correctly rounded multiplication."""
    return (torch.rand(shape, generator=g, dtype=torch.float32) - 0.5) * scale


def state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """The three models' tensors, float32: ``{"base": ..., "ft1": ..., "ft2": ...}``."""
    g = torch.Generator().manual_seed(SEEDS["base"])
    base = {}
    for name, shape in shapes().items():
        w = _uniform(shape, g, BASE_SCALE)
        base[name] = w + 1.0 if name.endswith("norm.weight") else w
    out = {"base": base}
    for model in ("ft1", "ft2"):
        g = torch.Generator().manual_seed(SEEDS[model])
        out[model] = {k: v + _uniform(v.shape, g, DELTA_SCALE) for k, v in base.items()}
    return out


def fingerprint(sds: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over every model's tensor names, shapes and raw float32 bytes."""
    h = hashlib.sha256()
    for model in sorted(sds):
        for name in sorted(sds[model]):
            t = sds[model][name].contiguous()
            h.update(f"{model}/{name}/{tuple(t.shape)}/{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def write_models(root: Path) -> tuple[dict[str, Path], str]:
    """Write base / ft1 / ft2 under ``root`` (config.json + model.safetensors each).
    Returns ``({model: folder}, fingerprint)``."""
    sds = state_dicts()
    folders = {}
    for model, sd in sds.items():
        folder = Path(root) / model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders[model] = folder
    return folders, fingerprint(sds)


#: tensors saved for every recipe (both layers, attention, mlp, norms): about 2.4 KB a recipe
SAVED = (
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
)

#: recipe name -> mergekit YAML with the placeholders BASE / FT1 / FT2 for the model folders.
#: Deterministic methods only: DARE / DELLA draw their masks from a random generator, and splice
#: draws different numbers than mergekit, so no element-wise golden exists for them.
RECIPES: dict[str, str] = {
    "linear": """\
merge_method: linear
models:
  - model: FT1
    parameters:
      weight: [{filter: mlp, value: 0.9}, {value: 0.6}]
  - model: FT2
    parameters: {weight: [0.2, 0.8]}
  - model: BASE
    parameters: {weight: 0.3}
dtype: float32
""",
    "linear_bf16": """\
merge_method: linear
models:
  - model: FT1
    parameters: {weight: 0.7}
  - model: FT2
    parameters: {weight: [0.5, 0.1]}
parameters: {normalize: false}
dtype: bfloat16
""",
    "slerp": """\
merge_method: slerp
base_model: BASE
models:
  - model: BASE
  - model: FT1
parameters:
  t:
    - {filter: self_attn, value: [0.2, 0.7]}
    - {filter: mlp, value: [0.9, 0.3]}
    - {value: 0.4}
dtype: float32
""",
    "nuslerp": """\
merge_method: nuslerp
models:
  - model: FT1
    parameters: {weight: 0.3}
  - model: FT2
    parameters: {weight: [0.2, 0.9]}
dtype: float32
""",
    "multislerp": """\
merge_method: multislerp
base_model: BASE
models:
  - model: FT1
    parameters:
      weight: [{filter: self_attn, value: [0.2, 0.9]}, {value: 0.3}]
  - model: FT2
    parameters: {weight: 0.5}
dtype: float32
""",
    "task_arithmetic": """\
merge_method: task_arithmetic
base_model: BASE
models:
  - model: FT1
    parameters: {weight: [1.0, 0.2]}
  - model: FT2
    parameters: {weight: 0.4}
parameters: {lambda: 0.8}
dtype: float32
""",
    "ties": """\
merge_method: ties
base_model: BASE
models:
  - model: FT1
    parameters:
      weight: 0.6
      density: [{filter: self_attn, value: 0.3}, {value: 0.5}]
  - model: FT2
    parameters: {weight: [0.2, 0.8], density: 0.7}
dtype: float32
""",
    "breadcrumbs": """\
merge_method: breadcrumbs
base_model: BASE
models:
  - model: FT1
    parameters: {weight: 0.5, density: 0.8, gamma: 0.05}
  - model: FT2
    parameters: {weight: 0.5, density: [0.5, 0.9]}
dtype: float32
""",
    "model_stock": """\
merge_method: model_stock
base_model: BASE
models:
  - model: FT1
  - model: FT2
dtype: float32
""",
    "sce": """\
merge_method: sce
base_model: BASE
models:
  - model: FT1
  - model: FT2
parameters:
  select_topk: [{filter: mlp, value: 0.3}, {value: 0.6}]
dtype: float32
""",
    "passthrough": """\
merge_method: passthrough
slices:
  - sources:
      - {model: BASE, layer_range: [0, 2]}
  - sources:
      - model: FT1
        layer_range: [1, 2]
        parameters:
          scale: [{filter: o_proj, value: 0.5}, {value: 1}]
dtype: float32
""",
}

#: tensors saved beyond ``SAVED``, by recipe: the passthrough's third layer (FT1's layer 1, o_proj scaled)
EXTRA_SAVED: dict[str, tuple[str, ...]] = {
    "passthrough": (
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.2.post_attention_layernorm.weight",
    ),
}


def saved(recipe: str) -> tuple[str, ...]:
    """The tensor names frozen for ``recipe``."""
    return SAVED + EXTRA_SAVED.get(recipe, ())


def concrete(text: str, folders: dict[str, Path]) -> str:
    """The recipe text with the model folders in place of BASE / FT1 / FT2."""
    return re.sub(
        r"(model: )(BASE|FT1|FT2)\b",
        lambda m: m[1] + json.dumps(str(folders[m[2].lower()])),
        text,
    )


def layout(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of an output's tensor names, shapes and dtypes (not the values)."""
    lines = (f"{k} {tuple(t.shape)} {t.dtype}" for k, t in sorted(tensors.items()))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
