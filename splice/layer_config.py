"""Per-layer config fields through a layer map (upscale, prune, passthrough and data-flow merges).

A layer map says, for each output layer, which source layer it copies. Three kinds of config
field describe layers and must follow the map, or transformers refuses the output
(``num_hidden_layers`` ... must equal the number of ``layer_types``) or, worse, builds a layer
of another kind than the weights it is given:

* **lists** with one value per layer (``layer_types``, ``no_rope_layers``, and, for a model
  type with no spec, any top-level list as long as the layer count): output value ``j`` is the
  source's value at ``map[j]``;
* **index lists** (LFM2's ``full_attn_idxs``, Qwen's ``mlp_only_layers``): the output positions
  whose source layer is listed;
* **interval rules** (``decoder_sparse_step``: MoE every k-th layer; ``first_k_dense_replace`` /
  ``moe_layer_freq``; ``moe_layer_start_index`` / ``_end_index`` / ``_interval``;
  ``interleave_moe_layer_step``): which layers are MoE follows from the index. After a map the
  rule is kept when it still describes every output layer; else its fields are refitted (a new
  start, end or step) where some values describe the output, else replaced by the explicit form
  the family accepts (``mlp_only_layers`` with a step of 1), and where there is none the map is
  refused in one line naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError

if TYPE_CHECKING:
    from splice.checkpoint import Checkpoint

#: config keys holding one value per layer in some family, whatever the layer count
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
#: config keys listing layer indices
INDEX_KEYS = ("full_attn_idxs", "mlp_only_layers")
#: list-valued config keys that are never per layer, even when as long as the layer count
_NOT_PER_LAYER = ("architectures",)


@dataclass(frozen=True)
class IntervalRule:
    """A config rule deciding per layer index whether a layer is MoE. ``refits`` proposes new
    values of its fields for a wanted MoE pattern (each tried in turn); ``explicit`` turns the
    pattern into config fields that list it, or is None where the family has no such form."""

    fields: tuple[str, ...]
    is_moe: Callable[[Mapping[str, Any], int], bool]
    refits: Callable[[list[bool]], Iterable[dict[str, Any]]]
    explicit: Callable[[list[bool]], dict[str, Any]] | None = None


def _experts(cfg: Mapping[str, Any]) -> int:
    for key in ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"):
        if cfg.get(key):
            return int(cfg[key])
    return 0


def _sparse_step(cfg: Mapping[str, Any], i: int) -> bool:
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = cfg.get("mlp_only_layers") or []
    return i not in dense and _experts(cfg) > 0 and (i + 1) % step == 0


def _interleaved(cfg: Mapping[str, Any], i: int) -> bool:
    """Llama 4: its ``moe_layers`` list where the config has one (transformers reads the step
    only to make that list), else every ``interleave_moe_layer_step``-th layer."""
    listed = cfg.get("moe_layers")
    if isinstance(listed, list):
        return i in listed
    return (i + 1) % int(cfg.get("interleave_moe_layer_step") or 1) == 0


def _first(want: list[bool]) -> int:
    return next((j for j, m in enumerate(want) if m), len(want))


def _last(want: list[bool]) -> int:
    return max((j for j, m in enumerate(want) if m), default=-1)


def _steps(want: list[bool]) -> range:
    return range(1, len(want) + 1)


INTERVAL_RULES = (
    IntervalRule(
        ("decoder_sparse_step",),
        _sparse_step,
        lambda want: ({"decoder_sparse_step": k, "mlp_only_layers": []} for k in _steps(want)),
        lambda want: {
            "decoder_sparse_step": 1,
            "mlp_only_layers": [j for j, m in enumerate(want) if not m],
        },
    ),
    IntervalRule(
        ("first_k_dense_replace", "moe_layer_freq"),
        lambda c, i: (
            _experts(c) > 0
            and i >= int(c.get("first_k_dense_replace") or 0)
            and i % int(c.get("moe_layer_freq") or 1) == 0
        ),
        lambda want: (
            {"first_k_dense_replace": _first(want), "moe_layer_freq": k} for k in _steps(want)
        ),
    ),
    IntervalRule(
        ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"),
        lambda c, i: (
            _experts(c) > 0
            and (i + 1) % int(c.get("moe_layer_interval") or 1) == 0
            and i >= int(c.get("moe_layer_start_index") or 0)
            and (c.get("moe_layer_end_index") in (None, -1) or i <= int(c["moe_layer_end_index"]))
        ),
        lambda want: (
            {
                "moe_layer_start_index": _first(want),
                "moe_layer_end_index": _last(want),
                "moe_layer_interval": k,
            }
            for k in _steps(want)
        ),
    ),
    IntervalRule(
        ("interleave_moe_layer_step",),
        lambda c, i: _experts(c) > 0 and _interleaved(c, i),
        lambda want: ({"interleave_moe_layer_step": k} for k in _steps(want)),
    ),
)


def per_layer_keys(ckpt: Checkpoint) -> list[str]:
    """The config keys of ``ckpt`` that hold one value per layer: its spec's ``per_layer``
    keys, the known ones (``layer_types``: sliding / full / linear attention or convolution per
    layer; ``no_rope_layers``), and any other top-level list exactly as long as the layer count
    (two or more layers; token ids, index lists and ``architectures`` excepted)."""
    n = ckpt.num_layers
    keys = [*ckpt.arch.config_keys.get("per_layer", []), *PER_LAYER_KEYS]
    index = set(index_keys(ckpt))
    if n >= 2:
        keys += [
            k
            for k, v in ckpt.config.items()
            if isinstance(v, list)
            and len(v) == n
            and k not in _NOT_PER_LAYER
            and k not in index
            and not k.endswith(("_token_id", "_token_ids"))
        ]
    return [k for k in dict.fromkeys(keys) if k in ckpt.config and k not in index]


def index_keys(ckpt: Checkpoint) -> list[str]:
    """The config keys of ``ckpt`` that list layer indices (spec ``layer_indices`` and known)."""
    keys = [*ckpt.arch.config_keys.get("layer_indices", []), *INDEX_KEYS]
    return [k for k in dict.fromkeys(keys) if isinstance(ckpt.config.get(k), list)]


def mapped_config(
    models: Mapping[str, Checkpoint], layers: Sequence[Any], donor: str
) -> dict[str, Any]:
    """The donor's config for the output layers ``layers`` (each ``.model``, ``.layer``): the
    layer count and every per-layer field mapped (see the module docstring); ``SpliceError``
    if an interval rule cannot describe the output and the family has no explicit form."""
    donor_ckpt = models[donor]
    moved = len(layers) != donor_ckpt.num_layers or any(
        ref.layer != j or getattr(ref, "scale", 1.0) != 1.0 for j, ref in enumerate(layers)
    )
    if moved:
        donor_ckpt.arch.refuse("layer_map")
    cfg = dict(donor_ckpt.config)
    cfg[donor_ckpt.arch.num_layers_key] = len(layers)
    for key in per_layer_keys(donor_ckpt):
        values: list[Any] | None = []
        for ref in layers:
            ckpt = models[ref.model]
            src = ckpt.config.get(key)
            if not isinstance(src, list) or len(src) != ckpt.num_layers:
                values = None
                break
            values.append(src[ref.layer])
        if values is not None:
            cfg[key] = values
        else:
            del cfg[key]  # let transformers rebuild its default for the new depth
    for key in index_keys(donor_ckpt):
        cfg[key] = [
            j
            for j, ref in enumerate(layers)
            if ref.layer in (models[ref.model].config.get(key) or [])
        ]
    for rule in INTERVAL_RULES:
        present = [f for f in rule.fields if f in cfg]
        if present:
            want = [rule.is_moe(models[ref.model].config, ref.layer) for ref in layers]
            cfg.update(_fit(rule, cfg, want, present, donor_ckpt.arch.model_type))
    return cfg


def _fit(
    rule: IntervalRule, cfg: dict[str, Any], want: list[bool], present: list[str], family: str
) -> dict[str, Any]:
    """Config fields under which ``rule`` gives the MoE pattern ``want``: none changed if it
    already does, else refitted values of its fields, else the family's explicit form."""

    def gives(fields: Mapping[str, Any]) -> bool:
        new = {**cfg, **fields}
        return [rule.is_moe(new, j) for j in range(len(want))] == want

    if gives({}):
        return {}
    for proposal in rule.refits(want):
        fields = {k: v for k, v in proposal.items() if k in cfg}  # absent: the default
        if gives(fields):
            return fields
    if rule.explicit is not None and "mlp_only_layers" in cfg:
        return rule.explicit(want)
    raise SpliceError(
        f"{family}: its config places MoE layers by {' / '.join(present)}, which cannot "
        f"describe the new layer order (MoE layers at {[j for j, m in enumerate(want) if m]}) "
        "and the family has no per-layer form of it; choose a map that keeps the pattern"
    )
