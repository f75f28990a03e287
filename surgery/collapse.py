"""MoE expert collapsing: an MoE model to a dense one, or to one with fewer experts.

``collapse(moe, out, method=...)`` per MoE layer (layers that are dense MLPs already are copied):

- ``uniform`` — the dense MLP is the mean of the experts' gate / up / down weights;
- ``frequency`` — the mean weighted by each expert's routing score mass on the calibration
  text (the mean softmax probability, or sigmoid score, over its tokens);
- ``slice`` — the ``E`` experts as one wide MLP of ``E·I`` neurons whose down-projection
  columns are scaled by each expert's mean routing weight (the family's top-k weight,
  averaged over all tokens, zero where not chosen); the ``I`` (or ``intermediate_size``)
  neurons that contribute most on calibration rows are kept (greedy pivoted selection: each
  pick is the neuron whose scaled activation adds most that the earlier picks do not explain,
  so a neuron duplicated across experts is kept once), their gate/up rows copied, and the down
  projection refit by ridge least squares in float64 so the dense MLP reproduces the routed
  experts' output on the calibration activations;
- ``keep_experts=k`` — a smaller MoE: experts grouped by the cosine similarity of their
  outputs on calibration rows (HC-SMoE; ``scipy.cluster.hierarchy``, average linkage) and
  merged within groups weighted by routing score mass, the router row (and selection bias) of
  a group the same weighted mean of its members'; or with ``prune=True`` ``k`` experts kept as
  they are, with their router rows and biases, chosen ``by``: ``naee`` (default) the ``k``
  whose keeping reconstructs the layer best (NAEE; every subset when there are at most 5000),
  ``reap`` the ``k`` of highest REAP saliency (the mean over the tokens routed to expert ``e``
  of ``g_e(x)·‖E_e(x)‖₂``; Cerebras' REAP). The config's expert count and top-k are rewritten,
  and DeepSeek's expert groups kept where the kept experts fill them equally, else dropped
  (``n_group`` / ``topk_group`` 1, said in the report).
- ``align`` — before any averaging, each expert's intermediate neurons are permuted to match a
  reference expert (the most used one; expert 0 without calibration) by
  ``scipy.optimize.linear_sum_assignment`` on the cosine similarity of the neurons' weights
  (MC-SMoE); the report says the share of the non-reference experts' neurons moved, and the
  error (and the experts' weight spread) before and after.

Routing (:mod:`splice.surgery.collapse_routing`): each family's router is reproduced exactly
(softmax or sigmoid scores, selection biases, expert groups, renormalisation,
``routed_scaling_factor``). A dense MLP stands for ``Σ_e g_e(x) E_e(x)``; where the weights of a
token do not sum to a constant (``norm_topk_prob: false``: Qwen, OLMoE, DeepSeek-V2 and dots1's
defaults) a mean's down projection is scaled by the routed mass measured on the calibration
text (``uniform`` then needs ``calibration``), where they do (Mixtral, renormalised top-k,
``routed_scaling_factor``) by that constant exactly: identical experts collapse exactly.

The written form of a dense result (``CollapseReport.form``), the most compact exact one:

- ``sibling``: the family's dense architecture (``dense_model_type``: Mixtral -> Mistral,
  Qwen3-MoE -> Qwen3, Qwen2-MoE -> Qwen2; the same attention, sliding window and rope settings)
  with ``intermediate_size`` the collapsed width, when every layer that already is dense has
  that width. Shared experts are folded in exactly (their neurons concatenated: ``[gate;
  gate_s]``, ``[up; up_s]``, ``[down | down_s]``); Qwen's sigmoid-gated shared expert folds
  only approximately, at its mean gate on the calibration text (``shared_gate="mean"``, the
  cost measured per layer as ``shared_gate_error``);
- ``one-expert``: otherwise (no dense sibling: OLMoE, Qwen3-Next, DeepSeek-V2, ERNIE; dense
  layers of another width: DeepSeek's ``first_k_dense_replace``, Qwen's ``mlp_only_layers``,
  ERNIE's ``moe_layer_start_index``; Qwen's gated shared expert kept exact by default) the same
  family with one routed expert at top-1 beside the shared experts, which stay as they are, and
  the dense layers as they were (their placement fields unchanged). Its router and selection
  bias are zero: a softmax of one logit is 1, so the down projection is only divided by the
  constant ``routed_scaling_factor``;
- ``split``: where one expert cannot be written, the collapsed MLP's neurons as ``m`` experts
  every token chooses (top-``m`` of ``m``, zero router: each gets the same constant weight,
  divided out of its down projection): routers that sum the best two scores of each expert
  group (DeepSeek-V3, GLM-4-MoE, dots1) need two experts, and where the shared experts' width
  is counted in expert widths (DeepSeek's ``n_shared_experts``, ERNIE's
  ``moe_num_shared_experts`` times ``moe_intermediate_size``) the expert width must divide it
  (``slice`` to another width); the least zero padding, then the fewest experts.

The report gives the parameter counts before and after.

What is approximated, plainly: a dense MLP cannot route, so every dense method replaces the
token-dependent gates ``g_e(x)`` by constants (a mean of experts is exact only when the experts
are equal and the routed mass constant; ``slice``'s refit is the least-squares best dense MLP on
the kept neurons, on the calibration rows only, with at most ``max_rows`` rows per layer used
for the selection and the fit). A merged router row is a linear stand-in for the score mass of
its group. Statistics of layer ``l`` are taken on the *source* model's activations (the layers
before it are not yet collapsed), and the errors reported are relative Frobenius errors
``‖y − ŷ‖ / ‖y‖`` of the layer's MoE block output (shared experts included) over all
calibration tokens (including those used to fit).

Memory: the model is never loaded whole. A skeleton is built on the meta device; layer by layer
one decoder layer (its attention and all its experts) is read, run on the calibration windows
(:func:`splice.calib.run`, sequential mode), decided, and dropped; only small decisions
(weights, permutations, neuron indices) are kept, and ``slice``'s refit down projections are
spilled to a temporary folder. Writing then streams as every other verb (one layer's experts of
one kind in flight).

Supported: every MoE family of ``collapse_routing.FAMILIES``: Mixtral (per-expert and packed
storage), Qwen2-MoE, Qwen3-MoE, Qwen3-Next, OLMoE, DeepSeek-V2/V3, GLM-4-MoE, dots1,
ERNIE-4.5-MoE, and the two that store experts packed on disk (splice.stored), read per expert
and written packed again: GraniteMoE (dense sibling: Granite) and gpt-oss (biased experts, a
clamped SwiGLU and a router bias: the one-expert form; ``--method slice``, whose refit has no
bias term, refuses it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.execute import ExecOptions, Source, TensorTask
from splice.limits import check_number
from splice.mtp import removed_mtp
from splice.multimodal import LanguageModel
from splice.scratch import scratch_folder
from splice.sliced_check import refuse_sliced
from splice.surgery.calibration import Calibration
from splice.surgery.collapse_methods import (
    METHODS,
    PRUNE_BY,
    CollapseOptions,
    Decision,
    decide_layer,
    method_of,
)
from splice.surgery.collapse_report import CollapseReport
from splice.surgery.collapse_routing import (
    FAMILIES,
    Family,
    Routing,
    full_config,
    load_shared,
    shared_kinds,
)
from splice.surgery.collapse_stream import (
    BIAS_KINDS,
    activation,
    calibration_windows,
    expert_kind,
    expert_kinds,
    expert_name,
    layer_experts,
    moe_layers,
    stream_layers,
)
from splice.surgery.depth import SurgeryResult, run_surgery, surgery_plan

#: the largest --ridge: lambda above 100 times the Gram matrix's mean diagonal leaves the
#: refit down projection close to zero
MAX_RIDGE = 100.0
SUPPORTED = tuple(sorted(FAMILIES))
#: Qwen's sigmoid shared-expert gate: kept exact (one-expert form) or folded at its mean
SHARED_GATES = ("keep", "mean")


# ---- options ------------------------------------------------------------------------------
def _check_options(
    method: str,
    calibration: Any,
    intermediate_size: int | None,
    keep_experts: int | None,
    top_k: int | None,
    prune: bool,
    align: bool,
    ridge: float,
    max_rows: int,
    by: str | None = None,
    shared_gate: str = "keep",
) -> None:
    """Everything that can be said before the model is opened."""
    if method not in METHODS:
        raise SpliceError(f"--method {method}: choose from {', '.join(METHODS.names())}")
    chosen = METHODS.get(method)
    for name, value in (
        ("--intermediate-size", intermediate_size),
        ("--keep-experts", keep_experts),
        ("--top-k", top_k),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise SpliceError(f"{name} {value}: must be a whole number of 1 or more")
    if by is not None:
        if by not in PRUNE_BY:
            raise SpliceError(f"--by {by}: choose from {', '.join(PRUNE_BY.names())}")
        if not prune:
            raise SpliceError("--by chooses the experts --prune keeps; give --prune")
    if shared_gate not in SHARED_GATES:
        raise SpliceError(f"--shared-gate {shared_gate}: choose from {', '.join(SHARED_GATES)}")
    if keep_experts is None:
        if prune:
            raise SpliceError(
                "--prune keeps the best --keep-experts k experts; give --keep-experts"
            )
        if top_k is not None:
            raise SpliceError("--top-k is for --keep-experts (a dense result has no routing)")
        if chosen.calibrated and calibration is None:
            raise SpliceError(
                f"--method {method} needs --calibration FILE (a text file, lm-eval:TASK or zoo)"
            )
        if intermediate_size is not None and not chosen.neurons:
            raise SpliceError(
                f"--intermediate-size is for --method slice (a {method} mean keeps the experts' "
                "width)"
            )
        if align and chosen.neurons:
            raise SpliceError(
                "--align is for averaging (uniform, frequency, --keep-experts); "
                "slice selects neurons instead"
            )
        if shared_gate == "mean" and calibration is None:
            raise SpliceError(
                "--shared-gate mean folds the shared expert at its mean gate on --calibration; "
                "give --calibration FILE"
            )
    else:
        if calibration is None:
            raise SpliceError(
                "--keep-experts needs --calibration FILE (experts are grouped or pruned on it)"
            )
        if chosen.neurons or intermediate_size is not None:
            raise SpliceError(
                "--keep-experts merges or prunes whole experts; --method slice and "
                "--intermediate-size are for a dense result"
            )
        if prune and align:
            raise SpliceError("--align is for merging; --prune keeps experts as they are")
        if shared_gate != "keep":
            raise SpliceError("--shared-gate is for a dense result (--keep-experts keeps it)")
    check_number(
        "--ridge", ridge, least=0, most=MAX_RIDGE, why="relative to the Gram matrix's diagonal"
    )
    check_number("--max-rows", max_rows, least=1, whole=True)


def _num_experts(ckpt: Checkpoint, cfg: Any) -> int:
    """The expert count, through the config class's aliases (Qwen3-MoE's ``num_experts``)."""
    key = ckpt.arch.config_key("num_experts", ckpt.config)
    found = ckpt.arch.num_experts(ckpt.config)
    if found is None and key:
        found = getattr(cfg, key, None)
    return int(found or 0)


def _check_model(ckpt: Checkpoint, cfg: Any) -> Family:
    model_type = ckpt.config.get("model_type")
    spec = ckpt.arch
    experts = _num_experts(ckpt, cfg) if spec.experts is not None else 0
    if spec.experts is None or not experts or not moe_layers(ckpt):
        moe_keys = [
            k
            for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
            if ckpt.config.get(k)
        ]
        if moe_keys:
            raise SpliceError(
                f"collapse: model type {model_type!r} is not supported (no expert spec); "
                f"supported: {', '.join(SUPPORTED)}"
            )
        raise SpliceError(
            f"collapse: {ckpt.path} is a dense model ({model_type}); there are no experts "
            "to collapse"
        )
    if model_type not in FAMILIES:
        why = spec.unsupported.get("collapse") or "its routing is not described for collapse"
        raise SpliceError(
            f"collapse: model type {model_type!r} is not supported ({why}); supported: "
            f"{', '.join(SUPPORTED)}"
        )
    return FAMILIES[model_type]


# ---- the written form -------------------------------------------------------------------------
@dataclass(frozen=True)
class Form:
    """How the result is written (see the module docstring): ``kind`` sibling | one-expert |
    split | experts; ``model_type``; per MoE layer ``experts`` written and ``top_k``;
    ``weight`` the routing weight the written router gives each written expert of a collapsed
    layer (its down projection is divided by it); ``fold_shared``: the shared experts
    concatenated into the dense MLP; ``width`` the collapsed MLP's width (shared folded in for
    a sibling), ``expert_width`` each written expert's (the last one padded with zero neurons
    where the width does not divide); ``shared_count`` the shared experts' count where their
    width is counted in expert widths (DeepSeek, ERNIE)."""

    kind: str
    model_type: str
    experts: int | None = None
    top_k: int | None = None
    weight: float = 1.0
    fold_shared: bool = False
    width: int = 0
    expert_width: int = 0
    shared_count: int | None = None
    why: str = ""


def _dense_widths(ckpt: Checkpoint, moe: list[int]) -> dict[int, int]:
    """``{layer: width}`` of the layers that are dense MLPs already."""
    spec = ckpt.arch
    assert spec.experts is not None
    kind = spec.experts.dense_equivalent.get(expert_kind(ckpt, "w1"))
    if kind is None:
        return {}  # the family has no dense MLP (OLMoE)
    out = {}
    for layer in range(ckpt.num_layers):
        name = spec.layer_name(layer, kind)
        if layer not in moe and name in ckpt.tensors:
            out[layer] = int(ckpt[name].shape[0])
    return out


def _split(width: int, least: int, shared: int, align: int) -> tuple[int, int]:
    """``(experts, expert width)`` to write ``width`` neurons as experts every token chooses: at
    least ``least`` of them, each a multiple of ``align`` neurons wide (transformers' grouped
    expert kernels want 16-byte rows), and where the shared experts' width ``shared`` is
    counted in expert widths, a width dividing it. The least zero padding, then the fewest
    experts."""
    if shared:
        widths = [w for w in range(1, shared + 1) if shared % w == 0]
        widths = [w for w in widths if w % align == 0] or widths
    else:
        w = max(1, -(-width // least))
        widths = [-(-w // align) * align]
    options = [(max(least, -(-width // w)), w) for w in widths]
    return min(options, key=lambda mw: (mw[0] * mw[1] - width, mw[0]))


def _dense_form(
    ckpt: Checkpoint, family: Family, routing: Routing, moe: list[int], width: int, gate: str
) -> Form:
    """The written form of a dense result of collapsed width ``width`` (see Form)."""
    spec = ckpt.arch
    assert spec.experts is not None
    # a multimodal model's language model keeps its family (its text_config's class)
    sibling = None if isinstance(ckpt, LanguageModel) else spec.experts.dense_model_type
    kinds = shared_kinds(ckpt, family, moe[0])
    shared = int(ckpt[spec.layer_name(moe[0], kinds["gate"])].shape[0]) if kinds else 0
    gated = bool(family.shared_gate and spec.layer_name(moe[0], family.shared_gate) in ckpt.tensors)
    biased = any(k.endswith("_bias") for k in kinds)
    fold = bool(kinds) and not biased and (not gated or gate == "mean")
    total = width + (shared if fold else 0)
    dense = _dense_widths(ckpt, moe)
    other = sorted(layer for layer, w in dense.items() if w != total)
    if sibling and (fold or not kinds) and not other:
        return Form("sibling", sibling, fold_shared=fold, width=total, expert_width=total)
    if gate == "mean":
        why = (
            f"{ckpt.config.get('model_type')} has no dense architecture to write"
            if not sibling
            else f"layers {other} are dense MLPs of {dense[other[0]]} neurons, not {total}"
        )
        raise SpliceError(
            f"--shared-gate mean writes one dense MLP per layer, but {why}; leave it out to keep "
            "the family with one routed expert and the shared expert's gate exact"
        )
    counted = shared if family.shared_count_key else 0
    source = int(ckpt[spec.layer_name(moe[0], expert_kind(ckpt, "w1"), 0)].shape[0])
    count, size = _split(width, family.min_per_group, counted, 8 if source % 8 == 0 else 1)
    if isinstance(ckpt, LanguageModel):
        why = f"the language model of a {ckpt.mm_config.get('model_type')} keeps its family"
    elif not sibling:
        why = f"{ckpt.config.get('model_type')} has no dense architecture"
    elif kinds and not fold:
        why = (
            "the shared expert's sigmoid gate is kept exact (--shared-gate mean folds it into a "
            f"dense {sibling} at its mean)"
            if gated
            else "the shared experts have biases a dense MLP cannot hold"
        )
    else:
        why = f"layers {other} are dense MLPs of {dense[other[0]]} neurons, not {total}"
    return Form(
        "one-expert" if count == 1 else "split",
        str(ckpt.config.get("model_type")),
        count,
        count,
        routing.weight_always_on(count),
        width=width,
        expert_width=size,
        shared_count=counted // size if counted else None,
        why=why,
    )


# ---- the plan -----------------------------------------------------------------------------
class _Merge:
    """make: the weighted sum of the source experts' tensors of one kind, each with its
    intermediate neurons permuted first (rows of gate/up ``[I, H]``, columns of down ``[H, I]``)."""

    def __init__(self, weights: list[float], perms: list[Any] | None, axis: int) -> None:
        self.weights, self.perms, self.axis = weights, perms, axis

    def __call__(self, tensors: list[Any]) -> Any:
        out = None
        for j, (w, t) in enumerate(zip(self.weights, tensors, strict=True)):
            if self.perms is not None:
                t = t.index_select(self.axis, self.perms[j].to(t.device))
            out = t * w if out is None else out + t * w
        return out


class _Pick:
    """make: the kept neurons' rows ``[k, H]`` of the stacked experts' gate/up ``[E·I, H]``."""

    def __init__(self, picks: list[int]) -> None:
        self.picks = picks

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        stacked = torch.cat(tensors)
        return stacked[torch.tensor(self.picks, device=stacked.device)]


class _Spilled:
    """make: a tensor saved in the run's temporary folder (kept alive by this object)."""

    def __init__(self, path: Path, folder: Any) -> None:
        self.path, self.folder = path, folder

    def __call__(self, _: list[Any]) -> Any:
        import torch

        return torch.load(self.path, weights_only=True)


class _Collapsed:
    """compute: one kind of a layer's collapsed MLP. ``make`` builds it from the first ``n``
    sources (the experts); it is multiplied by ``scale`` (down projections: the routed mass
    over the written router's weight); the next source, the shared experts' tensor of the same
    kind, is concatenated times ``shared_scale`` when given; then neurons ``[lo, lo + size)``
    along ``axis`` are taken, zero neurons padding past the end (the split form)."""

    def __init__(
        self,
        make: Any,
        n: int,
        axis: int,
        scale: float = 1.0,
        shared: bool = False,
        shared_scale: float = 1.0,
        part: tuple[int, int] | None = None,
    ) -> None:
        self.make, self.n, self.axis, self.scale = make, n, axis, scale
        self.shared, self.shared_scale, self.part = shared, shared_scale, part

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        t = self.make(tensors[: self.n])
        if self.scale != 1.0:
            t = t * self.scale
        if self.shared:
            s = tensors[self.n]
            t = torch.cat([t, s * self.shared_scale if self.shared_scale != 1.0 else s], self.axis)
        if self.part is not None:
            lo, size = self.part
            t = t.narrow(self.axis, lo, min(size, t.shape[self.axis] - lo))
            if t.shape[self.axis] < size:
                pad = list(t.shape)
                pad[self.axis] = size - t.shape[self.axis]
                t = torch.cat([t, t.new_zeros(pad)], self.axis)
        return t.contiguous()


class _Mix:
    """compute: the router ``[k, H]`` = ``mix [k, E] @ router [E, H]``; a selection bias
    ``[E]`` (or ERNIE's ``[1, E]``) mixed alike."""

    def __init__(self, mix: Any) -> None:
        self.mix = mix

    def __call__(self, tensors: list[Any]) -> Any:
        t = tensors[0]
        mix = self.mix.to(t.device, t.dtype)
        if t.dim() == 1:
            return mix @ t
        if t.shape[0] == 1 and t.shape[1] == mix.shape[1]:
            return (mix @ t[0])[None]
        return mix @ t


class _Zeros:
    """compute: a zero tensor (the constant router of a one-expert or split layer)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, _: list[Any]) -> Any:
        import torch

        return torch.zeros(self.shape, dtype=torch.float32)


def _set(config: dict[str, Any], key: str, value: Any, cfg: Any) -> None:
    """``config[key] = value``, dropping any alias of ``key`` (the config class's
    ``attribute_map``), so two spellings of one field never disagree."""
    amap = getattr(cfg, "attribute_map", {}) or {}
    canonical = amap.get(key, key)
    for k in list(config):
        if k != key and amap.get(k, k) == canonical:
            del config[k]
    config[key] = value


def _dense_config(ckpt: Checkpoint, dense_type: str, width: int, full: Any) -> dict[str, Any]:
    """The source config as the dense architecture's: keys the dense config class does not know
    (expert count, top-k, router losses, MoE layer placement) dropped, ``intermediate_size``
    the new width. Read from the source's whole config object (``full``), since a
    ``config.json`` holds only what differs from its own class's defaults, which are not the
    dense class's (Qwen3-MoE's ``head_dim``)."""
    from transformers import AutoConfig

    from splice.arch import ArchSpec

    dense = ArchSpec.load(dense_type)
    known = set(AutoConfig.for_model(dense_type).to_dict())
    source = {**full.to_dict(), **ckpt.config}
    cfg = {k: v for k, v in source.items() if k in known}
    if "head_dim" in known and not source.get("head_dim"):
        # the MoE attention's own rule (Qwen3-MoE has no head_dim field; Qwen3's default is 128)
        cfg["head_dim"] = int(source["hidden_size"]) // int(source["num_attention_heads"])
    cfg.update(model_type=dense_type, architectures=list(dense.architectures))
    cfg["intermediate_size"] = width
    return cfg


def _router_kinds(family: Family) -> dict[str, str]:
    """The layer-relative kinds of a collapsed layer's router: weight and selection bias."""
    out = {"router": family.router}
    if family.bias:
        out["bias"] = family.bias
    if family.router_bias:
        out["router_bias"] = family.router_bias
    return out


def _tasks(
    ckpt: Checkpoint,
    decisions: dict[int, Decision],
    opts: CollapseOptions,
    dtype: str | None,
    spill: Any,
    form: Form,
    family: Family,
    cfg: Any,
) -> tuple[list[TensorTask], dict[str, Any]]:
    from splice.arch import ArchSpec

    spec, key = ckpt.arch, str(ckpt.path)
    assert spec.experts is not None
    dense = ArchSpec.load(form.model_type) if form.kind == "sibling" else None
    routers = set(_router_kinds(family).values())
    tasks: list[TensorTask] = []
    for name, info in ckpt.tensors.items():
        t = spec.parse(name)
        if t.group == "experts":
            continue
        if t.layer in decisions:
            if t.kind in routers:
                continue  # written below
            if dense is not None and t.kind == family.shared_gate:
                continue  # folded at its mean
            if form.fold_shared and t.kind in set(shared_kinds(ckpt, family, t.layer).values()):
                continue  # concatenated into the dense MLP
        tasks.append(TensorTask.copy(name, key, name, info, dtype=dtype))
    count = _num_experts(ckpt, cfg)
    for layer in sorted(decisions):
        dec = decisions[layer]
        tasks += _router_tasks(ckpt, layer, dec, form, family, dtype)
        shared = shared_kinds(ckpt, family, layer) if form.fold_shared else {}
        for kind in expert_kinds(ckpt):
            first = ckpt[expert_name(ckpt, layer, kind, 0)]
            out_dtype = dtype or first.dtype
            axis = 1 if kind == "w2" else 0
            ekind = expert_kind(ckpt, kind)
            down = kind in ("w2", "b2")
            whole = kind == "b2"  # a down bias [H]: no neurons to permute or split
            if form.kind == "experts":
                for out_e, (members, weights, perms) in enumerate(
                    zip(dec.members, dec.weights, dec.perms, strict=True)
                ):
                    perms = None if whole else perms
                    srcs = tuple(Source(key, expert_name(ckpt, layer, kind, e)) for e in members)
                    label = " + ".join(
                        f"{w:.3g}*e{e}" for w, e in zip(weights, members, strict=True)
                    )
                    tasks.append(
                        TensorTask(
                            expert_name(ckpt, layer, kind, out_e),
                            tuple(first.shape),
                            out_dtype,
                            srcs,
                            compute=_Merge(weights, perms, axis),
                            load_dtype="float32",
                            label=label + (" (aligned)" if perms else ""),
                        )
                    )
                continue
            # a collapsed layer: one MLP, written as the sibling's, one expert or split
            if dec.picks is not None:
                if down:
                    srcs: tuple[Source, ...] = ()
                    make: Any = _Spilled(dec.down_file, spill)  # type: ignore[arg-type]
                    label = "down_proj refit (ridge least squares)"
                else:
                    srcs = tuple(
                        Source(key, expert_name(ckpt, layer, kind, e)) for e in range(count)
                    )
                    make = _Pick(dec.picks)
                    label = f"{len(dec.picks)} neurons of {count} experts"
                scale = 1.0
            else:
                (members,), (weights,), (perms,) = dec.members, dec.weights, dec.perms
                srcs = tuple(Source(key, expert_name(ckpt, layer, kind, e)) for e in members)
                make = _Merge(weights, None if whole else perms, axis)
                label = " + ".join(f"{w:.3g}*e{e}" for w, e in zip(weights, members, strict=True))
                label += " (aligned)" if perms else ""
                scale = dec.down_scale if down else 1.0
            if down and form.weight != 1.0:
                scale /= form.weight
                label += f" /{form.weight:g} (the router's weight)"
            if whole and (form.experts or 1) > 1:  # every written expert adds its bias
                scale /= form.experts or 1
                label += f" /{form.experts} (added by each written expert)"
            if down and scale != 1.0:
                label += f" x{scale:.6g}"
            n = len(srcs)
            skind = shared.get({"w1": "gate", "w3": "up", "w2": "down"}.get(kind, ""))
            if skind is not None:
                srcs = (*srcs, Source(key, spec.layer_name(layer, skind)))
                label += " + shared experts" + (
                    f" x{dec.shared_scale:.4g} (mean gate)"
                    if down and dec.shared_scale != 1
                    else ""
                )
            outer = first.shape[1] if kind in ("w1", "w3") else first.shape[0]

            def shape(width: int, outer: int = outer, kind: str = kind) -> tuple[int, ...]:
                return {"w2": (outer, width), "b1": (width,), "b3": (width,), "b2": (outer,)}.get(
                    kind, (width, outer)
                )

            common = dict(
                n=n,
                axis=axis,
                scale=scale,
                shared=skind is not None,
                shared_scale=dec.shared_scale if down else 1.0,
            )
            if dense is not None:
                tasks.append(
                    TensorTask(
                        dense.layer_name(layer, spec.dense_kind(ekind)),
                        shape(form.width),
                        out_dtype,
                        srcs,
                        compute=_Collapsed(make, **common),  # type: ignore[arg-type]
                        load_dtype="float32",
                        label=label,
                    )
                )
                continue
            size = form.expert_width
            for out_e in range(form.experts or 1):
                part = (
                    (out_e * size, size)
                    if not whole and ((form.experts or 1) > 1 or size != form.width)
                    else None
                )
                tasks.append(
                    TensorTask(
                        expert_name(ckpt, layer, kind, out_e),
                        shape(size),
                        out_dtype,
                        srcs,
                        compute=_Collapsed(make, part=part, **common),  # type: ignore[arg-type]
                        load_dtype="float32",
                        label=label + (f" neurons {part[0]}.." if part else ""),
                    )
                )
    return tasks, _config(ckpt, form, opts, decisions, family, cfg)


def _router_tasks(
    ckpt: Checkpoint, layer: int, dec: Decision, form: Form, family: Family, dtype: str | None
) -> list[TensorTask]:
    """A collapsed layer's router and selection bias: mixed rows (``--keep-experts``), a zero
    router of the written experts (one-expert, split), or none (sibling)."""
    if form.kind == "sibling":
        return []
    spec, key, out = ckpt.arch, str(ckpt.path), []
    for what, kind in _router_kinds(family).items():
        name = spec.layer_name(layer, kind)
        if name not in ckpt.tensors:
            continue
        info = ckpt[name]
        rows = form.experts if form.kind != "experts" else dec.router_mix.shape[0]
        if what == "router":
            shape: tuple[int, ...] = (rows, info.shape[1])
        elif len(info.shape) == 2:  # ERNIE's moe_statics [1, E]
            shape = (info.shape[0], rows)
        else:
            shape = (rows,)
        if form.kind == "experts":
            note = " router rows mixed" if what == "router" else " selection bias mixed"
            out.append(
                TensorTask.copy(
                    name,
                    key,
                    name,
                    info,
                    dtype=dtype,
                    compute=_Mix(dec.router_mix),
                    shape=shape,
                    note=note,
                )
            )
        else:
            out.append(
                TensorTask(
                    name,
                    shape,
                    dtype or info.dtype,
                    (),
                    compute=_Zeros(shape),
                    label=f"zero {what}: every token routed alike",
                )
            )
    return out


def _config(
    ckpt: Checkpoint,
    form: Form,
    opts: CollapseOptions,
    decisions: dict[int, Decision],
    family: Family,
    cfg: Any,
) -> dict[str, Any]:
    """The written config: the sibling's, or the family's with the written experts' count,
    top-k, width and expert groups (the MoE layers stay where they were)."""
    spec = ckpt.arch
    if form.kind == "sibling":
        return _dense_config(ckpt, form.model_type, form.width, cfg)
    config = dict(ckpt.config)
    if form.kind == "experts":
        routing = next(d.routing for d in decisions.values() if d.routing is not None)
        experts, top_k = opts.keep_experts, routing.top_k
        groups = routing.config_fields()
    else:
        experts, top_k = form.experts, form.top_k
        groups = {"n_group": 1, "topk_group": 1} if family.groups else {}
        _set(config, family.width_key, form.expert_width, cfg)
        if form.shared_count is not None and family.shared_count_key:
            _set(config, family.shared_count_key, form.shared_count, cfg)
    _set(config, spec.config_key("num_experts", config) or "num_experts", experts, cfg)
    key = spec.config_key("experts_per_token", config) or "num_experts_per_tok"
    _set(config, key, top_k, cfg)
    for k, v in groups.items():
        _set(config, k, v, cfg)
    return config


def _params(ckpt: Checkpoint) -> int:
    from math import prod

    return sum(prod(info.shape) for info in ckpt.tensors.values())


def plan_collapse(
    moe: str | os.PathLike[str],
    *,
    method: str = "uniform",
    calibration: str | os.PathLike[str] | None = None,
    intermediate_size: int | None = None,
    keep_experts: int | None = None,
    top_k: int | None = None,
    prune: bool = False,
    by: str | None = None,
    align: bool = False,
    shared_gate: str = "keep",
    calib: Calibration | None = None,
    ridge: float = 1e-6,
    max_rows: int = 4096,
    seed: int = 0,
    dtype: str | None = None,
    allow_pickle: bool = False,
) -> SurgeryResult:
    """Plan the collapse of ``moe`` (see the module docstring); calibration runs here, nothing
    is written. Returns the plan and its :class:`CollapseReport`.

    ``keep_experts=k`` gives an MoE of ``k`` experts (``top_k``: its experts per token, default
    the source's, which must then be ≤ k; ``prune``: keep ``k`` experts chosen ``by`` ``naee``
    or ``reap`` instead of merging); ``shared_gate``: ``keep`` (Qwen's sigmoid-gated shared
    expert stays, exact: the family with one routed expert) or ``mean`` (folded into a dense
    sibling at its calibration mean gate); ``ridge`` is ``slice``'s ridge relative to the mean
    diagonal of the Gram matrix; ``max_rows`` the calibration rows per layer used to select,
    fit and score (a seeded sample when there are more).
    """
    from math import prod

    from splice.dtypes import config_with_dtype, output_dtype

    _check_options(
        method, calibration, intermediate_size, keep_experts, top_k, prune, align, ridge,
        max_rows, by, shared_gate,
    )  # fmt: skip
    output_dtype(dtype)
    ckpt = open_checkpoint(moe, allow_pickle=allow_pickle)
    refuse_sliced(ckpt, "collapse")
    ckpt.validate()
    cfg = full_config(ckpt)
    family = _check_model(ckpt, cfg)
    routing = Routing.of(ckpt, family, cfg)
    biased = bool(set(BIAS_KINDS) & set(expert_kinds(ckpt)))
    if keep_experts is None and METHODS.get(method).neurons and biased:
        raise SpliceError(
            f"--method {method}: {ckpt.config.get('model_type')}'s experts have biases, "
            "which its down-projection refit does not fit; use uniform or frequency"
        )
    moe_at = moe_layers(ckpt)
    count = routing.experts or _num_experts(ckpt, cfg)
    src_k = routing.top_k
    width = ckpt[expert_name(ckpt, moe_at[0], "w1", 0)].shape[0]
    model_type = str(ckpt.config.get("model_type"))
    if keep_experts is not None:
        if keep_experts > count:
            raise SpliceError(
                f"--keep-experts {keep_experts}: the model has only {count} experts per layer"
            )
        if top_k is None and keep_experts < src_k:
            raise SpliceError(
                f"--keep-experts {keep_experts} is fewer than the {src_k} experts each token "
                "uses; give --top-k (at most the kept count) too"
            )
        if top_k is not None and top_k > keep_experts:
            raise SpliceError(f"--top-k {top_k}: more than the {keep_experts} kept experts")
        if keep_experts < family.min_per_group:
            raise SpliceError(
                f"--keep-experts {keep_experts}: {model_type}'s router sums the best "
                f"{family.min_per_group} scores of each expert group, so it needs at least "
                f"{family.min_per_group} experts"
            )
    if intermediate_size is not None and intermediate_size > count * width:
        raise SpliceError(
            f"--intermediate-size {intermediate_size}: more than the {count * width} neurons of "
            f"the {count} experts together"
        )
    if keep_experts is None and calibration is None and routing.constant_mass() is None:
        raise SpliceError(
            f"--method {method} on {model_type}: {routing.mass_rule()}, so a token's routed "
            "experts add up to a token-dependent share; the dense MLP's scale is measured on "
            "--calibration FILE: give one"
        )
    opts = CollapseOptions(
        method, intermediate_size, keep_experts, top_k, prune, align, ridge, max_rows, seed,
        by or "naee", shared_gate,
    )  # fmt: skip
    if keep_experts is None:
        form = _dense_form(ckpt, family, routing, moe_at, intermediate_size or width, shared_gate)
    else:
        form = Form("experts", model_type, keep_experts, top_k or min(src_k, keep_experts))
    calib = calib or Calibration()
    op = (
        f"collapse --method {method}"
        if keep_experts is None
        else f"collapse --keep-experts {keep_experts}"
    )
    if keep_experts is not None:
        op += f" --prune --by {opts.by}" if prune else " (merge)"
    if align:
        op += " --align"
    if shared_gate != "keep":
        op += f" --shared-gate {shared_gate}"
    report = CollapseReport(
        operation=op,
        source=str(ckpt.path),
        method="prune" if prune else ("merge" if keep_experts is not None else method),
        num_experts=count,
        top_k=src_k,
        intermediate_size=width,
        out_intermediate_size=(form.width if keep_experts is None else width),
        out_experts=keep_experts,
        out_top_k=form.top_k if keep_experts is not None else None,
        align=align,
        prune=prune,
        dense_model_type=form.model_type if form.kind == "sibling" else None,
        form=form.kind,
        out_model_type=form.model_type,
        form_experts=form.experts if keep_experts is None else None,
        form_width=form.expert_width if keep_experts is None else None,
        prune_by=opts.by if prune else None,
    )
    report.notes += _notes(ckpt, form, routing, family, moe_at, calibration is not None)
    act = activation(ckpt.config)
    folder = scratch_folder("collapse") if method_of(opts).neurons else None
    spill = Path(folder.name) if folder is not None else None
    decisions: dict[int, Decision] = {}

    def on_layer(i: int, x: Any, y: Any) -> None:
        if i not in moe_at:
            return  # a dense MLP already: copied as it is
        rec, dec = decide_layer(
            i, layer_experts(ckpt, i, family), x, y, opts, routing, act, spill,
            family=family, shared=load_shared(ckpt, family, i),
        )  # fmt: skip
        report.layers.append(rec)
        decisions[i] = dec

    if calibration is None:
        for i in range(ckpt.num_layers):
            on_layer(i, None, None)
    else:
        import time

        windows = calibration_windows(ckpt, calibration, calib)
        start = time.perf_counter()
        stream_layers(ckpt, windows, calib, on_layer)
        report.meta.update(
            calibration=str(calibration),
            samples=int(windows.shape[0]),
            seq_len=int(windows.shape[1]),
            device=calib.device,
            dtype=calib.dtype,
            seconds=round(time.perf_counter() - start, 3),
            max_rows=max_rows,
            ridge=ridge,
        )
    report.notes += sorted({d.note for d in decisions.values() if d.note})
    groups = {(d.routing.n_group, d.routing.topk_group) for d in decisions.values() if d.routing}
    if len(groups) > 1:  # one config for every layer: the groups go wherever one layer drops them
        dropped = [i for i, d in sorted(decisions.items()) if d.note]
        for d in decisions.values():
            d.routing = replace(d.routing, n_group=1, topk_group=1)
        report.notes.append(
            f"expert groups dropped in every layer, as layers {dropped} need (one config for all)"
        )
    tasks, config = _tasks(ckpt, decisions, opts, dtype, folder, form, family, cfg)
    if dtype:
        config = config_with_dtype(config, dtype)
    # experts merged or pruned away, routers and gates of a dense result (the ones still
    # read by a task need no entry: splice.verify counts a read tensor as kept)
    gates = (*_router_kinds(family).values(), family.shared_gate)
    parsed = {n: ckpt.arch.parse(n) for n in ckpt.tensors}
    removed = {
        n: "collapsed"
        for n, t in parsed.items()
        if t.layer in decisions and (t.group in ("experts", "router") or t.kind in gates)
    }
    if ckpt.mtp:  # its MoE would need the same collapse, with no calibration rows to fit
        removed.update(removed_mtp(ckpt, "multi-token prediction: not collapsed"))
        report.notes.append(
            f"the {len(ckpt.arch.mtp_layers(ckpt.config))} multi-token-prediction layer(s) left "
            "out (num_nextn_predict_layers 0): their experts are not collapsed"
        )
    report.params_before = _params(ckpt)
    report.params_after = sum(prod(t.shape) for t in tasks)
    plan = surgery_plan(report, ckpt, tasks, config, ("collapse", report.method), removed)
    return SurgeryResult(plan, report)


def _notes(
    ckpt: Checkpoint, form: Form, routing: Routing, family: Family, moe: list[int], calib: bool
) -> list[str]:
    """What the report should say beyond the numbers: the form and what it approximates."""
    out = []
    if form.kind == "experts":
        return out
    if form.kind == "sibling" and form.fold_shared:
        gated = family.shared_gate and ckpt.arch.layer_name(moe[0], family.shared_gate) in ckpt
        out.append(
            "shared experts folded into the dense MLP"
            + (
                " at their mean sigmoid gate on the calibration text (an approximation: "
                "shared_gate_error per layer)"
                if gated
                else " exactly"
            )
        )
    if form.kind in ("one-expert", "split"):
        what = (
            "one routed expert at top-1"
            if form.kind == "one-expert"
            else f"{form.experts} routed experts of {form.expert_width} neurons, all chosen"
        )
        pad = (form.experts or 1) * form.expert_width - form.width
        out.append(
            f"{form.why}: the family kept, the collapsed MLP written as {what} by a zero router "
            f"(weight {form.weight:.6g} each, divided out of the down projection)"
            + (f", {pad} zero neurons padding the last" if pad else "")
            + (
                f"; the shared experts as they were ({form.shared_count} of "
                f"{form.expert_width} neurons)"
                if form.shared_count
                else ""
            )
        )
        if family.min_per_group > 1 and form.kind == "split":
            out.append(
                "the router sums each expert group's best two scores, so one expert cannot run"
            )
    mass = routing.constant_mass()
    if mass is None:
        out.append(
            f"routed mass not constant ({routing.mass_rule()}): a mean's down projection is "
            "scaled by its calibration mean (mass per layer)"
        )
    elif mass != 1.0:
        out.append(f"routed mass {mass:g} (routed_scaling_factor) folded into the down projection")
    return out


def collapse(
    moe: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    method: str = "uniform",
    calibration: str | os.PathLike[str] | None = None,
    intermediate_size: int | None = None,
    keep_experts: int | None = None,
    prune: bool = False,
    align: bool = False,
    dry_run: bool = False,
    options: ExecOptions | None = None,
    **kwargs: Any,
) -> SurgeryResult:
    """Collapse ``moe`` into ``out`` (atomically) as :func:`plan_collapse` plans it; with
    ``dry_run`` only plan. ``out`` is locked and checked before calibration runs. Returns a
    :class:`SurgeryResult` whose ``report`` is a :class:`CollapseReport`."""
    return run_surgery(
        plan_collapse,
        moe,
        out,
        dry_run=dry_run,
        options=options,
        method=method,
        calibration=calibration,
        intermediate_size=intermediate_size,
        keep_experts=keep_experts,
        prune=prune,
        align=align,
        **kwargs,
    )
