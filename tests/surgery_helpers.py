"""Independent references for the surgery tests: the source model's own modules, rearranged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

IDS = torch.arange(5, 30).reshape(1, -1) % 90 + 4


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(folder: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return load(folder)(ids).logits


def planned_logits(source: Path, order: list[int], ids: torch.Tensor = IDS) -> torch.Tensor:
    """Logits of ``source`` with its decoder layers run in ``order``: the source's own layer
    modules (no copy, nothing written) in a new ModuleList, per-layer config lists following."""
    model = load(source)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in order])
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(order)
    if types is not None:
        cfg.layer_types = [types[i] for i in order]
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def hidden_states(
    model: torch.nn.Module, windows: torch.Tensor, final_norm: bool = False
) -> np.ndarray:
    """``[L+1, N, T, H]`` float64: the residual stream at every layer boundary (the last one
    before the final norm, or after it with ``final_norm``: HF's default ``hidden_states``)."""
    model.config.tie_last_hidden_states = final_norm
    with torch.no_grad():
        out = model(windows, output_hidden_states=True)
    return np.stack([h.double().numpy() for h in out.hidden_states])


def angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    return np.arccos(np.clip(cos, -1, 1)) / np.pi


def cosine(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)


def word_text(vocab: int = 96, words: int = 4000, seed: int = 0) -> str:
    """Text of the conftest tokenizer's made-up words (w0 ...), 20 words a line."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, vocab - 4, size=words)
    lines = [" ".join(f"w{i}" for i in picks[k : k + 20]) for k in range(0, words, 20)]
    return "\n".join(lines)
