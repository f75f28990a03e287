"""MoE expert collapsing: an MoE model to a dense one, or to one with fewer experts.

``collapse(moe, out, method=...)`` per MoE layer:

- ``uniform`` — the dense MLP is the mean of the experts' gate / up / down weights;
- ``frequency`` — the mean weighted by each expert's routing probability mass on the
  calibration text (the mean softmax probability over its tokens);
- ``slice`` — the ``E`` experts as one wide MLP of ``E·I`` neurons whose down-projection
  columns are scaled by each expert's mean routing weight (its top-k renormalised gate,
  averaged over all tokens, zero where not chosen); the ``I`` (or ``intermediate_size``)
  neurons that contribute most on calibration rows are kept (greedy pivoted selection: each
  pick is the neuron whose scaled activation adds most that the earlier picks do not explain,
  so a neuron duplicated across experts is kept once), their gate/up rows copied, and the down
  projection refit by ridge least squares in float64 so the dense MLP reproduces the MoE
  block's output on the calibration activations;
- ``keep_experts=k`` — a smaller MoE: experts grouped by the cosine similarity of their
  outputs on calibration rows (HC-SMoE; ``scipy.cluster.hierarchy``, average linkage) and
  merged within groups weighted by routing probability mass, the router row of a group the
  same weighted mean of its members' rows; or with ``prune=True`` the ``k`` experts whose
  keeping reconstructs the layer best (NAEE; every subset when there are at most 5000), their
  router rows kept. The config's expert count and top-k are rewritten.
- ``align`` — before any averaging, each expert's intermediate neurons are permuted to match a
  reference expert (the most used one; expert 0 without calibration) by
  ``scipy.optimize.linear_sum_assignment`` on the cosine similarity of the neurons' weights
  (MC-SMoE); the report says the share of the non-reference experts' neurons moved, and the
  error (and the experts' weight spread) before and after.

What is approximated, plainly: a dense MLP cannot route, so every dense method replaces the
token-dependent gates ``g_e(x)`` by constants (a mean of experts is exact only when the experts
are equal; ``slice``'s refit is the least-squares best dense MLP on the kept neurons, on the
calibration rows only, with at most ``max_rows`` rows per layer used for the selection and the
fit). A merged router row is a linear stand-in for the softmax mass of its group. Statistics of
layer ``l`` are taken on the *source* model's activations (the layers before it are not yet
collapsed), and the errors reported are relative Frobenius errors ``‖y − ŷ‖ / ‖y‖`` of the
layer's MoE block output over all calibration tokens (including those used to fit).

Memory: the model is never loaded whole. A skeleton is built on the meta device; layer by layer
one decoder layer (its attention and all its experts) is read, run on the calibration windows
(:func:`splice.calib.run`, sequential mode), decided, and dropped; only small decisions
(weights, permutations, neuron indices) are kept, and ``slice``'s refit down projections are
spilled to a temporary folder. Writing then streams as every other verb (one layer's experts of
one kind in flight). A dense result is written as the matching dense architecture (Mixtral ->
Mistral, the same attention, sliding window and rope settings).

Supported: Mixtral (``model_type`` ``mixtral``, both per-expert and packed storage). Qwen2-MoE
(shared expert, unnormalised top-k) and Qwen3-MoE have no architecture spec here and are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.execute import ExecOptions, Source, TensorTask
from splice.limits import check_number
from splice.scratch import scratch_folder
from splice.sliced_check import refuse_sliced
from splice.surgery.calibration import Calibration
from splice.surgery.collapse_methods import (
    METHODS,
    CollapseOptions,
    Decision,
    decide_layer,
    method_of,
)
from splice.surgery.collapse_report import CollapseReport
from splice.surgery.collapse_stream import (
    EXPERT_KINDS,
    activation,
    calibration_windows,
    expert_name,
    layer_experts,
    stream_layers,
)
from splice.surgery.depth import SurgeryResult, run_surgery, surgery_plan

if TYPE_CHECKING:
    pass

#: the largest --ridge: lambda above 100 times the Gram matrix's mean diagonal leaves the
#: refit down projection close to zero
MAX_RIDGE = 100.0
SUPPORTED = ("mixtral",)
#: MoE model types transformers knows that collapse refuses, with why
UNSUPPORTED = {  # specs exist; collapsing their routing exactly is still to come
    "qwen2_moe": "a shared expert behind a sigmoid gate and unnormalised top-k",
    "qwen3_moe": "its routing (top-k that need not sum to 1) is not collapsed yet",
    "deepseek_v2": "shared experts and grouped top-k routing are not collapsed yet",
    "deepseek_v3": "shared experts and biased, grouped sigmoid routing are not collapsed yet",
    "olmoe": "its routing (top-k that need not sum to 1) is not collapsed yet",
}


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
    check_number(
        "--ridge", ridge, least=0, most=MAX_RIDGE, why="relative to the Gram matrix's diagonal"
    )
    check_number("--max-rows", max_rows, least=1, whole=True)


def _refuse_unsupported(ref: str | os.PathLike[str]) -> None:
    """A known MoE type whose routing collapse cannot reproduce yet is refused before the
    checkpoint is opened."""
    import json

    file = Path(ref) / "config.json"
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # not a local folder with a readable config: open_checkpoint says why
    if model_type in UNSUPPORTED:
        raise SpliceError(
            f"collapse: model type {model_type!r} is not supported ({UNSUPPORTED[model_type]}); "
            f"supported: {', '.join(SUPPORTED)}"
        )


def _check_model(ckpt: Checkpoint) -> None:
    model_type = ckpt.config.get("model_type")
    spec = ckpt.arch
    experts = spec.num_experts(ckpt.config) if spec.experts is not None else None
    if spec.experts is None or not experts:
        moe_keys = [
            k
            for k in ("num_experts", "num_local_experts", "n_routed_experts")
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
    if model_type not in SUPPORTED or not spec.experts.dense_model_type:
        raise SpliceError(
            f"collapse: model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED)}"
        )


# ---- the plan -----------------------------------------------------------------------------
class _Merge:
    """compute: the weighted sum of the source experts' tensors of one kind, each with its
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
    """compute: the kept neurons' rows ``[k, H]`` of the stacked experts' gate/up ``[E·I, H]``."""

    def __init__(self, picks: list[int]) -> None:
        self.picks = picks

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        stacked = torch.cat(tensors)
        return stacked[torch.tensor(self.picks, device=stacked.device)]


class _Spilled:
    """compute: a tensor saved in the run's temporary folder (kept alive by this object)."""

    def __init__(self, path: Path, folder: Any) -> None:
        self.path, self.folder = path, folder

    def __call__(self, _: list[Any]) -> Any:
        import torch

        return torch.load(self.path, weights_only=True)


class _Mix:
    """compute: the router ``[k, H]`` = ``mix [k, E] @ router [E, H]``."""

    def __init__(self, mix: Any) -> None:
        self.mix = mix

    def __call__(self, tensors: list[Any]) -> Any:
        t = tensors[0]
        return self.mix.to(t.device, t.dtype) @ t


def _dense_config(ckpt: Checkpoint, width: int) -> dict[str, Any]:
    """The source config as the dense architecture's: keys the dense config class does not know
    (expert count, top-k, router losses) dropped, ``intermediate_size`` the new width."""
    from transformers import AutoConfig

    from splice.arch import ArchSpec

    assert ckpt.arch.experts is not None
    dense_type = ckpt.arch.experts.dense_model_type
    assert dense_type is not None
    dense = ArchSpec.load(dense_type)
    known = set(AutoConfig.for_model(dense_type).to_dict())
    cfg = {k: v for k, v in ckpt.config.items() if k in known}
    cfg.update(model_type=dense_type, architectures=list(dense.architectures))
    cfg["intermediate_size"] = width
    return cfg


def _tasks(
    ckpt: Checkpoint,
    decisions: dict[int, Decision],
    opts: CollapseOptions,
    dtype: str | None,
    spill: Any,
) -> tuple[list[TensorTask], dict[str, Any]]:
    from splice.arch import ArchSpec

    spec, key = ckpt.arch, str(ckpt.path)
    assert spec.experts is not None
    dense = ArchSpec.load(spec.experts.dense_model_type) if opts.keep_experts is None else None  # type: ignore[arg-type]
    routers = set(spec.layer_tensors.get("router", ()))
    tasks: list[TensorTask] = []
    width = None
    for name, info in ckpt.tensors.items():
        t = spec.parse(name)
        if t.group == "experts":
            continue
        if t.group == "router" or t.kind in routers:
            if dense is None:
                dec = decisions[t.layer]  # type: ignore[index]
                k = dec.router_mix.shape[0]
                tasks.append(
                    TensorTask.copy(
                        name,
                        key,
                        name,
                        info,
                        dtype=dtype,
                        compute=_Mix(dec.router_mix),
                        shape=(k, info.shape[1]),
                        note=" router rows mixed",
                    )
                )
            continue
        tasks.append(TensorTask.copy(name, key, name, info, dtype=dtype))
    for layer in sorted(decisions):
        dec = decisions[layer]
        for kind in EXPERT_KINDS:
            first = ckpt[expert_name(ckpt, layer, kind, 0)]
            out_dtype = dtype or first.dtype
            axis = 1 if kind == "w2" else 0
            if dec.picks is not None:
                width = len(dec.picks)
                name = dense.layer_name(layer, spec.dense_kind(f"{kind}.weight"))  # type: ignore[union-attr]
                count = spec.num_experts(ckpt.config) or 0
                if kind == "w2":
                    shape = (first.shape[0], width)
                    tasks.append(
                        TensorTask(
                            name,
                            shape,
                            out_dtype,
                            (),
                            compute=_Spilled(dec.down_file, spill),  # type: ignore[arg-type]
                            label="down_proj refit (ridge least squares)",
                        )
                    )
                else:
                    srcs = tuple(
                        Source(key, expert_name(ckpt, layer, kind, e)) for e in range(count)
                    )
                    tasks.append(
                        TensorTask(
                            name,
                            (width, first.shape[1]),
                            out_dtype,
                            srcs,
                            compute=_Pick(dec.picks),
                            load_dtype="float32",
                            label=f"{width} neurons of {count} experts",
                        )
                    )
                continue
            width = first.shape[axis]
            for out_e, (members, weights, perms) in enumerate(
                zip(dec.members, dec.weights, dec.perms, strict=True)
            ):
                if dense is not None:
                    name = dense.layer_name(layer, spec.dense_kind(f"{kind}.weight"))
                else:
                    name = expert_name(ckpt, layer, kind, out_e)
                srcs = tuple(Source(key, expert_name(ckpt, layer, kind, e)) for e in members)
                label = " + ".join(f"{w:.3g}*e{e}" for w, e in zip(weights, members, strict=True))
                tasks.append(
                    TensorTask(
                        name,
                        tuple(first.shape),
                        out_dtype,
                        srcs,
                        compute=_Merge(weights, perms, axis),
                        load_dtype="float32",
                        label=label + (" (aligned)" if perms else ""),
                    )
                )
    if dense is not None:
        config = _dense_config(ckpt, width or int(ckpt.config["intermediate_size"]))
    else:
        config = spec.config_with_experts(
            dict(ckpt.config),
            opts.keep_experts,
            opts.top_k or min(spec_top_k(ckpt), opts.keep_experts),  # type: ignore[type-var]
        )
    return tasks, config


def spec_top_k(ckpt: Checkpoint) -> int:
    """The source's experts per token (``num_experts_per_tok`` for Mixtral)."""
    key = ckpt.arch.config_keys.get("experts_per_token", "num_experts_per_tok")
    return int(ckpt.config[key])


def plan_collapse(
    moe: str | os.PathLike[str],
    *,
    method: str = "uniform",
    calibration: str | os.PathLike[str] | None = None,
    intermediate_size: int | None = None,
    keep_experts: int | None = None,
    top_k: int | None = None,
    prune: bool = False,
    align: bool = False,
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
    the source's, which must then be ≤ k); ``ridge`` is ``slice``'s ridge relative to the mean
    diagonal of the Gram matrix; ``max_rows`` the calibration rows per layer used to select and
    fit (a seeded sample when there are more).
    """
    from splice.dtypes import config_with_dtype, output_dtype

    _check_options(
        method, calibration, intermediate_size, keep_experts, top_k, prune, align, ridge, max_rows
    )
    output_dtype(dtype)
    _refuse_unsupported(moe)
    ckpt = open_checkpoint(moe, allow_pickle=allow_pickle)
    refuse_sliced(ckpt, "collapse")
    ckpt.validate()
    _check_model(ckpt)
    count = ckpt.arch.num_experts(ckpt.config) or 0
    src_k = spec_top_k(ckpt)
    width = ckpt[expert_name(ckpt, 0, "w1", 0)].shape[0]
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
    if intermediate_size is not None and intermediate_size > count * width:
        raise SpliceError(
            f"--intermediate-size {intermediate_size}: more than the {count * width} neurons of "
            f"the {count} experts together"
        )
    opts = CollapseOptions(
        method, intermediate_size, keep_experts, top_k, prune, align, ridge, max_rows, seed
    )
    calib = calib or Calibration()
    op = (
        f"collapse --method {method}"
        if keep_experts is None
        else f"collapse --keep-experts {keep_experts}"
    )
    if keep_experts is not None:
        op += " --prune" if prune else " (merge)"
    if align:
        op += " --align"
    report = CollapseReport(
        operation=op,
        source=str(ckpt.path),
        method="prune" if prune else ("merge" if keep_experts is not None else method),
        num_experts=count,
        top_k=src_k,
        intermediate_size=width,
        out_intermediate_size=(intermediate_size or width) if keep_experts is None else width,
        out_experts=keep_experts,
        out_top_k=(top_k or min(src_k, keep_experts)) if keep_experts is not None else None,
        align=align,
        prune=prune,
        dense_model_type=ckpt.arch.experts.dense_model_type if keep_experts is None else None,  # type: ignore[union-attr]
    )
    act = activation(ckpt.config)
    folder = scratch_folder("collapse") if method_of(opts).neurons else None
    spill = Path(folder.name) if folder is not None else None
    decisions: dict[int, Decision] = {}

    def on_layer(i: int, x: Any, y: Any) -> None:
        rec, dec = decide_layer(i, layer_experts(ckpt, i), x, y, opts, src_k, act, spill)
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
    tasks, config = _tasks(ckpt, decisions, opts, dtype, folder)
    if dtype:
        config = config_with_dtype(config, dtype)
    read = {s.name for t in tasks for s in t.sources}
    removed = {  # experts merged or pruned away, and the router of a dense result
        n: "collapsed"
        for n in ckpt.tensors
        if n not in read and ckpt.arch.parse(n).group in ("experts", "router")
    }
    plan = surgery_plan(report, ckpt, tasks, config, ("collapse", report.method), removed)
    return SurgeryResult(plan, report)


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
