"""Helpers shared by the benchmarks: synthetic checkpoints and wall-time / peak-RSS measurement.

Synthetic checkpoints are written tensor by tensor (never a whole model in memory) with
per-tensor seeds, so a "fine-tune" is the base plus a small seeded delta without reading the base.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from splice.arch import ArchSpec
from splice.writer import CheckpointWriter, TensorSpec

# TinyLlama-like shape: 16 layers, hidden 2048 -> 835M params, 1.67 GB in bf16
LLAMA_1_6GB = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)


def llama_config(**shape: int) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    cfg.update(shape)
    return cfg


def llama_specs(cfg: dict, dtype: str = "bfloat16") -> list[TensorSpec]:
    """Every tensor of a Llama model with this config, in HF order."""
    spec = ArchSpec.load("llama")
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    specs = [TensorSpec(spec.embed, (v, h), dtype)]
    for layer in range(cfg["num_hidden_layers"]):
        specs += [TensorSpec(spec.layer_name(layer, k), s, dtype) for k, s in shapes.items()]
    specs += [TensorSpec(spec.final_norm, (h,), dtype), TensorSpec(spec.lm_head, (v, h), dtype)]
    return specs


def _seeded(name: str, salt: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + salt)
    return torch.randn(shape, generator=g)


def make_llama(out: Path, *, variant: int = 0, delta: float = 0.02, **shape: int) -> Path:
    """Write a synthetic Llama checkpoint: base weights, plus ``delta``-scaled noise if variant > 0.

    Weights are N(0, 0.02) (norms 1 + N(0, 0.02)); variants share the base exactly, as fine-tunes do.
    """
    if out.exists():
        return out
    cfg = llama_config(**(shape or LLAMA_1_6GB))
    specs = llama_specs(cfg)
    with CheckpointWriter(out, specs, max_shard_size="1GB") as w:
        for s in specs:
            t = _seeded(s.name, 0, s.shape) * 0.02
            if "norm" in s.name:
                t += 1.0
            if variant:
                t += _seeded(s.name, variant, s.shape) * 0.02 * delta
            w.write(s.name, t)
        w.write_config(cfg)
        write_tokenizer(w.tmp, cfg["vocab_size"])
    return out


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer with ``vocab`` entries, so tools that copy tokenizers have one."""
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )


@dataclass
class Measurement:
    wall_s: float
    peak_rss_mb: float
    returncode: int


_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "dt = time.perf_counter() - t\n"
    "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, r.returncode)\n"
)


_compiled = False


def compile_splice() -> None:
    """Compile splice's modules to bytecode once, as ``pip install`` does for a wheel.

    An editable install in a shell with ``PYTHONDONTWRITEBYTECODE`` set (these machines set it)
    would otherwise compile ~30 modules at every start: ~50 ms a run that no installed copy pays,
    while mergekit, installed by pip, starts from bytecode.
    """
    global _compiled
    if _compiled:
        return
    import compileall

    import splice
    import splice.analysis
    import splice.evolve
    import splice.merge
    import splice.surgery

    for package in (splice, splice.analysis, splice.evolve, splice.merge, splice.surgery):
        for folder in package.__path__:
            compileall.compile_dir(folder, quiet=1)
    _compiled = True


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Measurement:
    """Run ``cmd`` in a fresh wrapper process; wall time and the command's peak RSS (MB).

    splice's modules are compiled to bytecode first (:func:`compile_splice`)."""
    compile_splice()
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=full_env
    )
    wall, rss, rc = out.stdout.split()
    return Measurement(float(wall), float(rss), int(rc))


def measure_fresh(cmd: list[str], out: Path, repeat: int) -> Measurement:
    """The median of ``repeat`` runs of ``cmd`` (:func:`measure`), each started with ``out``
    removed and no dirty pages from the last run being written back (``sync``); ``out`` is
    removed after the last."""
    import shutil
    import statistics

    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        runs.append(measure(cmd))
    shutil.rmtree(out, ignore_errors=True)
    return Measurement(
        statistics.median(r.wall_s for r in runs),
        statistics.median(r.peak_rss_mb for r in runs),
        max(r.returncode for r in runs),
    )
