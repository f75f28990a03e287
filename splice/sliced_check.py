"""Refusing per-layer sliced models where their layers would be moved, dropped or mixed.

``splice slice --basis per-layer`` writes a model of ``model_type`` :data:`SLICED_TYPE` whose
decoder layers each carry shortcut matrices (``attn_shortcut_Q`` / ``mlp_shortcut_Q``, or one
``layer_shortcut_Q`` for parallel blocks: the basis change from one block to the next). Its tensors read like a standard model's, so a verb
that reorders, drops, repeats or merges layers would run and write garbage: the shortcuts
only fit the neighbours the layer had when it was sliced. Those verbs call
:func:`refuse_sliced` on every model they open, before anything is loaded or written; verbs
that only read (inspect, analyze weights) accept such models.

Running one is scoring's alone (``splice eval``, :func:`splice.scoring.evaluate`): the model
loader (:func:`splice.modeling.load_causal_lm` with ``sliced=True``) builds it with
:func:`load_sliced_model`, which reaches :data:`LOADER` by name (the core imports no
subpackage). Every other verb that runs a model refuses it with :data:`RUN_REFUSAL`: its
residual stream changes basis at every block, so hidden states of two layers are not
comparable (analyze activations) and its layers are not a stock model's (heal).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: the model_type of a per-layer sliced output (so stock transformers refuses it instead of
#: ignoring the shortcut tensors)
SLICED_TYPE = "splice_sliced"

_WHY = "its shortcut matrices tie each layer to its neighbours"

#: the function that builds a per-layer sliced model, ``"module:function"`` (imported on use)
LOADER = "splice.surgery.sliced:load_sliced"

#: why a verb that runs models, scoring aside, refuses a per-layer sliced one (after its path)
RUN_REFUSAL = (
    "a per-layer sliced model (splice slice --basis per-layer) runs only in splice eval: its "
    "residual stream changes basis at every block; slice with --basis shared for a standard "
    "checkpoint every verb reads"
)

#: verb -> (what would be done to the model, the way out)
_VERBS: dict[str, tuple[str, str]] = {
    "prune": ("pruned", "slice with --basis shared, or prune before slicing"),
    "upscale": ("up-scaled", "slice with --basis shared, or upscale before slicing"),
    "merge": ("merged", "slice with --basis shared, or merge before slicing"),
    "collapse": ("collapsed", "slice with --basis shared, or collapse before slicing"),
    "slice": ("sliced again", "slice the original model instead (at the sparsity you want)"),
}


def is_sliced(config: Mapping[str, Any] | None) -> bool:
    """Whether a model's ``config.json`` is a ``--basis per-layer`` sliced model's."""
    return isinstance(config, Mapping) and config.get("model_type") == SLICED_TYPE


def refuse_sliced(model: Any, verb: str, name: str | os.PathLike[str] | None = None) -> None:
    """``SpliceError`` (one line) if ``model`` (anything with a ``config`` mapping, such as a
    :class:`~splice.checkpoint.Checkpoint`) is a per-layer sliced model, which ``verb`` (a key of
    :data:`_VERBS`) would corrupt. ``name``: how the model is called in the message (default
    its ``path``)."""
    if not is_sliced(getattr(model, "config", None)):
        return
    done, instead = _VERBS[verb]
    label = name if name is not None else getattr(model, "path", "model")
    raise SpliceError(
        f"{label}: a per-layer sliced model (splice slice --basis per-layer) cannot be {done}: "
        f"{_WHY}; {instead}"
    )


def load_sliced_model(
    path: str | os.PathLike[str], *, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """The per-layer sliced model at ``path``, live, built by :data:`LOADER`
    (``splice.surgery.load_sliced``: the source family's transformers model at the sliced
    width, its decoder layers carrying the shortcut matrices)."""
    module, _, name = LOADER.partition(":")
    try:
        load = getattr(importlib.import_module(module), name)
    except ImportError:
        raise SpliceError(
            f"{path}: a per-layer sliced model loads with {module}, which this build lacks"
        ) from None
    return load(path, dtype=dtype, device=device)
