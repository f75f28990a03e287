"""LayerPlan: an output model as a list of layers, each taken from some model's layer.

Passthrough slices (frankenmerges), Solar/Yi depth up-scaling, layer pruning and Sakana's
data-flow path are all LayerPlans; ``LayerPlan.tasks`` turns one into copy tasks for the one
executor (``splice.execute``).

Each layer may carry a ``scale``: the residual stream is multiplied by it before that layer
(Sakana's data-flow scales). Because RMSNorm is scale-invariant (``norm(w*h) = norm(h)`` for
``w > 0``, up to its epsilon), that equals dividing the residual writers (``o_proj``,
``down_proj``: weights and biases) of this layer and every later one by ``w``; so the scales are
folded into the weights and the result is a standard checkpoint. The only approximation is the
norm's epsilon: ``w*h / sqrt(w^2*ms(h) + eps)`` vs ``h / sqrt(ms(h) + eps)``, negligible unless
``w^2 * ms(h)`` is comparable to eps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splice.arch import ArchSpec
from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.execute import TensorTask
from splice.layer_config import mapped_config


@dataclass(frozen=True)
class LayerRef:
    """Layer ``layer`` of model ``model``; the stream is scaled by ``scale`` before it."""

    model: str
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class LayerPlan:
    """Output layers in order, plus where embeddings and the final norm / head come from."""

    layers: tuple[LayerRef, ...]
    embed_model: str
    head_model: str

    def validate(self, models: Mapping[str, Checkpoint]) -> None:
        """Layers exist and every layer fits the embedding model's hidden size."""
        hidden = models[self.embed_model].config.get("hidden_size")
        for j, ref in enumerate(self.layers):
            ckpt = models[ref.model]
            if ref.layer not in ckpt.layer_index:
                raise SpliceError(
                    f"output layer {j}: {ref.model} has no layer {ref.layer} "
                    f"(it has {ckpt.num_layers})"
                )
            h = ckpt.config.get("hidden_size")
            if hidden and h and h != hidden:
                raise SpliceError(
                    f"output layer {j}: {ref.model} has hidden size {h}, but the embeddings "
                    f"({self.embed_model}) have {hidden}"
                )
        if not self.layers:
            raise SpliceError("the layer plan is empty")

    def divisors(self) -> list[float]:
        """Per output layer, the product of all scales up to and including it."""
        out, acc = [], 1.0
        for ref in self.layers:
            acc *= ref.scale
            out.append(acc)
        return out

    def tasks(
        self, models: Mapping[str, Checkpoint], *, dtype: str | None = None
    ) -> list[TensorTask]:
        """One copy task per output tensor; residual writers carry the folded scale."""
        self.validate(models)
        embed_ckpt, head_ckpt = models[self.embed_model], models[self.head_model]
        spec = embed_ckpt.arch

        def task(out: str, model: str, name: str, scale: float = 1.0) -> TensorTask:
            return TensorTask.copy(out, model, name, models[model][name], dtype=dtype, scale=scale)

        # the embedding (and any tensor outside the layers no spec classifies) comes from the
        # embedding model, the final norm and head (with their biases) from the head model
        tasks = [task(n, self.embed_model, n) for n in embed_ckpt.global_names("embed", "other")]
        for j, (ref, div) in enumerate(zip(self.layers, self.divisors(), strict=True)):
            ckpt = models[ref.model]
            for name in ckpt.layer_index[ref.layer]:
                out = ckpt.arch.rename(name, layer=j)
                scale = 1.0 / div if ckpt.arch.is_residual_writer(name) else 1.0
                tasks.append(task(out, ref.model, name, scale))
        for name in head_ckpt.global_names("final_norm", "head"):
            tasks.append(task(global_out_name(spec, head_ckpt.arch, name), self.head_model, name))
        return tasks

    def config(self, models: Mapping[str, Checkpoint], donor: str | None = None) -> dict[str, Any]:
        """Output config: the donor's (default: the embedding model's) with the new layer count
        and every per-layer field mapped by the layers (:func:`splice.layer_config.mapped_config`)."""
        cfg = mapped_config(models, self.layers, donor or self.embed_model)
        cfg["tie_word_embeddings"] = models[self.head_model].tied
        return cfg


def global_out_name(spec: ArchSpec, source: ArchSpec, name: str) -> str:
    """The output's name (``spec``) of a source's global tensor (``source``): a role's main
    weight by role (an ``--allow-crimes`` donor of another family names it differently), any
    other tensor by its own name."""
    role = source.main_role(name)
    return spec.globals_of(role)[0] if role and spec.globals_of(role) else name
