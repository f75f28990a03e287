"""Checkpoints with known structure for the analysis tests, written by splice's CheckpointWriter.

``edited_copy`` derives a model from another by editing tensors (e.g. layer k := layer j);
``upcycle_moe`` builds a Mixtral whose experts are a dense model's MLP plus seeded noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from splice.checkpoint import Checkpoint
from splice.writer import CheckpointWriter, TensorSpec


def edited_copy(
    src: Path,
    out: Path,
    edit: Callable[[str, Checkpoint], torch.Tensor | None],
) -> Path:
    """Copy ``src`` to ``out``; ``edit(name, ckpt)`` returns a replacement tensor or None."""
    ckpt = Checkpoint(src)
    specs = [TensorSpec(n, i.shape, i.dtype) for n, i in ckpt.tensors.items()]
    with CheckpointWriter(out, specs) as w:
        for name in ckpt.tensors:
            new = edit(name, ckpt)
            w.write(name, ckpt.load(name) if new is None else new)
        w.write_config(ckpt.config)
        w.copy_tokenizer(src)
    return out


def noisy_copy(src: Path, out: Path, scale: float, seed: int) -> Path:
    """A "fine-tune": every tensor plus ``scale`` × its std × seeded Gaussian noise."""
    g = torch.Generator().manual_seed(seed)

    def edit(name: str, ckpt: Checkpoint) -> torch.Tensor:
        t = ckpt.load(name, dtype="float32")
        std = float(t.std()) if t.numel() > 1 else 1.0
        return t + scale * std * torch.randn(t.shape, generator=g)

    return edited_copy(src, out, edit)


def upcycle_moe(
    dense: Path, out: Path, experts: int = 4, noise: float = 0.5, seed: int = 0
) -> Path:
    """A Mixtral whose expert e at layer i is the dense MLP at layer i plus seeded noise.

    Attention, norms, embeddings and head are the dense model's; the router is random.
    ``noise`` is relative to each MLP tensor's std.
    """
    src = Checkpoint(dense)
    cfg = dict(src.config)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    cfg.update(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=experts,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
    )
    cfg.pop("mlp_bias", None)
    mlp = {"w1.weight": "gate_proj", "w3.weight": "up_proj", "w2.weight": "down_proj"}
    g = torch.Generator().manual_seed(seed)
    plan: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]] = []
    for name, info in src.tensors.items():
        if ".mlp." in name:
            continue
        plan.append((name, info.shape, lambda n=name: src.load(n, dtype="float32")))
    for i in range(layers):
        prefix = f"model.layers.{i}.block_sparse_moe"
        plan.append(
            (
                f"{prefix}.gate.weight",
                (experts, hidden),
                lambda: 0.02 * torch.randn(experts, hidden, generator=g),
            )
        )
        for e in range(experts):
            for kind, proj in mlp.items():
                dname = f"model.layers.{i}.mlp.{proj}.weight"

                def make(d: str = dname) -> torch.Tensor:
                    t = src.load(d, dtype="float32")
                    return t + noise * float(t.std()) * torch.randn(t.shape, generator=g)

                plan.append((f"{prefix}.experts.{e}.{kind}", src.tensors[dname].shape, make))
    specs = [TensorSpec(n, s, "float32") for n, s, _ in plan]
    with CheckpointWriter(out, specs) as w:
        for name, _, make in plan:
            w.write(name, make())
        w.write_config(cfg)
        w.copy_tokenizer(dense)
    return out
