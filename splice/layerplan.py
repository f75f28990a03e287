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

from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.execute import TensorTask


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

        tasks = [task(spec.embed, self.embed_model, spec.embed)]
        for j, (ref, div) in enumerate(zip(self.layers, self.divisors(), strict=True)):
            ckpt = models[ref.model]
            for name in ckpt.layer_index[ref.layer]:
                out = ckpt.arch.rename(name, layer=j)
                scale = 1.0 / div if ckpt.arch.is_residual_writer(name) else 1.0
                tasks.append(task(out, ref.model, name, scale))
        hspec = head_ckpt.arch
        tasks.append(task(spec.final_norm, self.head_model, hspec.final_norm))
        if not head_ckpt.tied:
            tasks.append(task(spec.lm_head, self.head_model, hspec.lm_head))
        return tasks

    def config(self, models: Mapping[str, Checkpoint], donor: str | None = None) -> dict[str, Any]:
        """Output config: the donor's (default: the embedding model's) with the new layer count.

        Per-layer config lists (e.g. ``layer_types``) take each layer's value from its source.
        """
        donor_ckpt = models[donor or self.embed_model]
        spec = donor_ckpt.arch
        cfg = dict(donor_ckpt.config)
        cfg[spec.num_layers_key] = len(self.layers)
        for key in per_layer_keys(donor_ckpt):
            values = []
            for ref in self.layers:
                ckpt = models[ref.model]
                src = ckpt.config.get(key)
                if not isinstance(src, list) or len(src) != ckpt.num_layers:
                    values = None
                    break
                values.append(src[ref.layer])
            if values is not None:
                cfg[key] = values
            elif key in cfg:
                del cfg[key]  # let transformers rebuild its default for the new depth
        cfg["tie_word_embeddings"] = models[self.head_model].tied
        return cfg


#: config keys holding one value per layer in some family, whatever the layer count
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
#: list-valued config keys that are never per layer, even when as long as the layer count
_NOT_PER_LAYER = ("architectures",)


def per_layer_keys(ckpt: Checkpoint) -> list[str]:
    """The config keys of ``ckpt`` that hold one value per layer: its spec's ``per_layer``
    keys, the known ones (``layer_types``: sliding / full attention per layer, in Qwen3,
    Gemma 2/3, OLMo 3, Cohere 2, SmolLM3, EXAONE 4, gpt-oss, ...; ``no_rope_layers``), and any
    other top-level list exactly as long as the layer count (two or more layers; token ids and
    ``architectures`` excepted). A layer map must carry each along, or transformers refuses the
    output (``num_hidden_layers`` ... must be equal to the number of ``layer_types``)."""
    n = ckpt.num_layers
    keys = [*ckpt.arch.config_keys.get("per_layer", []), *PER_LAYER_KEYS]
    if n >= 2:
        keys += [
            k
            for k, v in ckpt.config.items()
            if isinstance(v, list)
            and len(v) == n
            and k not in _NOT_PER_LAYER
            and not k.endswith(("_token_id", "_token_ids"))
        ]
    return [k for k in dict.fromkeys(keys) if k in ckpt.config]
