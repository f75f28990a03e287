"""SliceGPT slicing: rotate the residual stream into its PCA basis and delete trailing dims.

Every RMSNorm scale ``γ`` folds into the linears it feeds (``W <- W·diag(γ)``), after which the
norms are rotation-invariant and the stream can be rotated by any orthogonal ``Q`` ``[D, D]``:
embeddings ``E <- E·Q``, readers (q/k/v, gate/up, router, experts' w1/w3, a convolution's
in_proj) ``W <- W·diag(γ)·Q``, writers (o_proj, down_proj, experts' w2) ``W <- Qᵀ·W``, the
head ``W <- W·diag(γ_final)·Q``. Keeping the first ``d`` columns of ``Q`` (``Q_d`` ``[D, d]``)
deletes the stream's trailing dimensions. The PCA is of the rms-normed stream entering each
block (the stream each reader sees, every token weighted alike), ``Σ x̃ᵀx̃`` in float64 on the
calibration text, ``eigh``; ``stream="raw"`` takes it of the un-normed stream as SliceGPT does
(big-norm tokens weigh more).

LayerNorm (``norm.kind`` ``layer``: StarCoder2, Phi, Cohere) first subtracts the mean, which
no rotation commutes with; SliceGPT's fold makes the stream mean-zero first: embedding rows
``E <- E - mean_row(E)``, writers ``W <- C·W`` and their biases ``b <- C·b`` with
``C = I - 11ᵀ/D`` (exact: every norm subtracts the mean anyway). A mean-zero stream's
LayerNorm is ``γ ⊙ x/rms(x) + β``, an RMSNorm: ``γ`` folds as above and ``β`` into the readers'
biases (``b <- b + W·β``; the head's too, Phi's ``lm_head.bias``). Where a reader of a norm
has no bias (StarCoder2's tied head), ``β`` stays in the norm: its output bias becomes ``1_d``
and each reader ``W' <- W·diag(γ)·Q_d·C_d + (W·β)·1_dᵀ/d`` (``C_d = I - 11ᵀ/d``), exact
because a LayerNorm's output minus its bias is orthogonal to ``1_d``. The output is still the
stock family, whose LayerNorms subtract the mean of the ``d`` kept coordinates; that mean stays
zero because every basis keeps ``e = 1/√D`` (a direction a mean-zero stream has no energy in)
as one of its ``d`` columns, the PCA (of the centred stream) taken in ``e⊥``, and is then
reflected by a Householder ``R`` ``[d, d]`` with ``R·1_d = √d·u_0`` (``u_0`` the coordinate of
``e``): ``Q_d·1_d ∝ 1_D``, so ``mean(x·Q_d) = 0`` for a mean-zero ``x`` and the output's
LayerNorm is the RMSNorm the fold assumed. That costs one of the ``d`` dims (``d - 1`` carry
the stream's energy).

Blocks come from the spec's roles, not its family: a layer is the blocks of its norms, in
``norm_feeds`` order, and a residual writer belongs to the block of the norm that feeds its
module's readers (:func:`splice.surgery.sliced.layout_of`). Pre-norm layers have two blocks
(attention then MLP; LFM2's first block is attention or a short convolution by layer), parallel
layers (Phi, Cohere) one, whose attention and MLP read the same norm and write the stream
together (``x + attn(norm(x)) + mlp(norm(x))``): one block input per layer.

- ``basis="per-layer"`` is SliceGPT: one basis ``Q_k`` per block input (``nb`` blocks per
  layer: ``nb·L + 1`` with the head), each computed on the model whose earlier blocks are
  already sliced (the runner's sequential mode, each block with its layer's attention mask).
  The residual path then needs ``S_k = Q_kᵀ·Q_{k+1}`` ``[d, d]`` between blocks: saved as
  ``model.layers.{i}.attn_shortcut_Q`` / ``mlp_shortcut_Q`` (a parallel layer's:
  ``layer_shortcut_Q``) in the safetensors output; :func:`splice.surgery.load_sliced` loads it
  (stock transformers modules plus the shortcuts, no remote code).
- ``basis="shared"``: one basis for the whole stream, the eigenvectors of the Gram matrices of
  all block inputs summed (on the unsliced model). No shortcut is needed, and the output is a
  standard checkpoint of the same family with ``hidden_size = d`` that ``AutoModelForCausalLM``
  loads; ``head_dim`` is written explicitly and the head untied from the embeddings (the final
  norm folds into the head only).

Both outputs are models of width ``d`` whose norms average over ``d`` coordinates, not ``D``:
their stream is the source's times ``c = √(d/D)`` (embeddings and writers, weights and biases,
scaled by ``c``; a ``sqrt(hidden_size)`` embedding scale shrinks by ``c`` by itself), so that a
norm over the ``d`` kept coordinates sees ``c²·‖x‖²/d = ‖x‖²/D``, the source's mean square, with
the source's eps, and the norm weights are ``√(D/d)`` (``1/c``). No eps changes, so the q/k
norms and a linear attention's gated norm, which read the same eps config key, stay exact.

``d`` is ``(1 - sparsity)·D`` rounded down to a multiple of ``lcm(8, num_attention_heads)`` (so
``hidden_size % num_attention_heads == 0`` holds; SliceGPT rounds to multiples of 8), and is the
same for both bases. Both outputs are exactly the source model with the stream projected onto
``span(Q_d)`` at every block input (``x <- x·Q_d·Q_dᵀ``): that full-width model is what the
calibration runs on and what :attr:`SliceResult.model` holds. One exception widens the cut: a
module whose inner width transformers sizes from ``hidden_size`` (LFM2's short convolution:
``in_proj`` ``[3D, D]``, depthwise ``conv`` ``[D, 1, L]``, ``out_proj`` ``[D, D]``) must
shrink to ``d`` channels too; those are found by building the family's model at width ``d`` on
the meta device, and each such module keeps the ``d`` channels of most calibrated energy
(``Σ h_c²·‖W_out[:, c]‖²`` over the calibration tokens, on the block's input before its own
projection), its other channels zeroed in the in-memory model as well (channel pruning beyond
the rotation, said in the report's notes). Architectures: every spec
that gives every tensor a residual-stream role and whose norms feed their blocks (pre-norm or
parallel; RMSNorm or LayerNorm; gemma's norm offset and embedding scale fold too).

This module is the verb (:func:`plan_slice`, :func:`slice_model`) and its report; the rest is
:mod:`.slicing_arch` (what an architecture needs: its blocks, its hidden-sized dims, the output's
config), :mod:`.slicing_calib` (the calibration: collectors and the bases), :mod:`.slicing_math`
(the tensor math: ``d``, PCA, Householder, the folds) and :mod:`.slicing_tasks` (one task per
output tensor).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from splice.checkpoint import open_checkpoint
from splice.errors import SpliceError
from splice.execute import ExecOptions
from splice.mtp import removed_mtp
from splice.multimodal import LanguageModel
from splice.sliced_check import refuse_sliced
from splice.surgery.calibration import Calibration
from splice.surgery.depth import SurgeryResult, run_surgery, surgery_plan
from splice.surgery.report import Recorded
from splice.surgery.slicing_arch import (
    HiddenSized,
    SliceArch,
    hidden_sized,
    slice_arch,
    sliced_config,
)
from splice.surgery.slicing_calib import compute_bases, slice_windows
from splice.surgery.slicing_math import new_width
from splice.surgery.slicing_tasks import module_writer_tasks, slice_tasks
from splice.text import plural

if TYPE_CHECKING:
    import torch

BASES = ("per-layer", "shared")
#: what the PCA is of: the stream each token scaled to rms 1 (what readers see), or as it is
STREAMS = ("normed", "raw")


@dataclass
class SliceReport(Recorded):
    """One slicing of ``source``: ``hidden_size`` ``D`` -> ``new_hidden_size`` ``d``.

    ``retained`` has one entry per block input (``layer``, ``block`` attn / mlp / head,
    ``value``): the fraction of the (rms-normed, or raw) stream's energy there in the kept
    ``d`` dimensions, measured on the model whose earlier blocks are sliced (per-layer: the top
    ``d`` eigenvalues over the trace of that block's Gram matrix). ``total_retained`` (shared):
    the same fraction of the Gram matrices of all blocks summed, on the unsliced model.
    ``notes``: what else the slicing did (LayerNorm's mean-centring, channels pruned).
    """

    operation: str
    source: str
    basis: str
    sparsity: float
    num_layers: int
    hidden_size: int
    new_hidden_size: int
    params_source: int
    params_output: int
    retained: list[dict[str, Any]] = field(default_factory=list)
    total_retained: float | None = None
    stream: str = "normed"
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    kind: ClassVar[str] = "slice"

    @property
    def title(self) -> str:
        return (
            f"{self.operation}: hidden {self.hidden_size} -> {self.new_hidden_size} "
            f"({plural(self.num_layers, 'layer')})"
        )

    @property
    def mean_retained(self) -> float:
        """Mean of ``retained`` over the block inputs."""
        values = [r["value"] for r in self.retained]
        return float(sum(values) / len(values)) if values else float("nan")

    def summary(self) -> str:
        """Plain text for the terminal."""
        share = self.params_output / self.params_source if self.params_source else float("nan")
        lines = [
            self.title,
            f"  parameters: {self.params_source:,} -> {self.params_output:,} ({share:.1%})",
            f"  retained variance of the {self.stream} stream, per block input (mean "
            f"{self.mean_retained:.4f}):",
        ]
        by_layer: dict[Any, list[str]] = {}
        for r in self.retained:
            by_layer.setdefault(r["layer"], []).append(f"{r['block']} {r['value']:.4f}")
        for layer, parts in by_layer.items():
            label = f"layer {layer}" if layer is not None else "head"
            lines.append(f"    {label:<9} " + "  ".join(parts))
        if self.total_retained is not None:
            lines.append(f"  shared basis, all block inputs together: {self.total_retained:.4f}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += self.score_lines()
        return "\n".join(lines)

    def card_details(self) -> str:
        """Markdown for the model card."""
        load = (
            "Load it with `splice.surgery.load_sliced(path)`: the residual path carries "
            "shortcut matrices (`model.layers.{i}.*_shortcut_Q`) between blocks."
            if self.basis == "per-layer"
            else "A standard checkpoint: `AutoModelForCausalLM.from_pretrained(path)`."
        )
        lines = [
            f"SliceGPT slicing of `{self.source}`, basis `{self.basis}`, sparsity "
            f"{self.sparsity:g}: hidden size {self.hidden_size} -> {self.new_hidden_size}, "
            f"parameters {self.params_source:,} -> {self.params_output:,}.",
            "",
            load,
        ]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        if self.meta.get("calibration"):
            lines += [
                "",
                f"Calibration: `{self.meta['calibration']}`, {self.meta.get('samples')} windows "
                f"of {self.meta.get('seq_len')} tokens.",
            ]
        lines += ["", "| layer | block | retained variance |", "|---|---|---:|"]
        for r in self.retained:
            layer = "" if r["layer"] is None else r["layer"]
            lines.append(f"| {layer} | {r['block']} | {r['value']:.4f} |")
        lines += ["", self.record_line()]
        return "\n".join(lines)


@dataclass
class SliceResult(SurgeryResult):
    """A planned slicing: the plan, its :class:`SliceReport`, where it went, and ``model``:
    the sliced model in memory (the source at full width with the stream projected onto the
    kept subspace at every block input; it computes what the output computes)."""

    model: Any = field(default=None, repr=False)

    def score(
        self, *, text: str | None = None, tasks: Any = None, **kwargs: Any
    ) -> dict[str, dict[str, float]]:
        """Score the source and the written output (a per-layer output through
        :func:`splice.surgery.load_sliced`); the numbers also go into ``report.scores``."""
        if self.report.basis == "shared" or self.out is None:  # type: ignore[attr-defined]
            return super().score(text=text, tasks=tasks, **kwargs)
        from splice.scoring import evaluate
        from splice.surgery.sliced import load_sliced

        with _quiet_transformers():  # no "Loading weights" bar
            live = load_sliced(self.out, device=kwargs.get("device", "cpu"))
        source = evaluate({"source": self.report.source}, text=text, tasks=tasks, **kwargs)
        # the output's tokenizer is loaded from its folder, whose config.json is of model type
        # splice_sliced: transformers warns that it is not a tokenizer's config type
        with _quiet_transformers():
            output = evaluate(
                {"output": live}, text=text, tasks=tasks, tokenizer=str(self.out), **kwargs
            )
        self.report.scores = {**source, **output}
        return self.report.scores


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off inside, restored after (as they were)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_sparsity(sparsity: Any) -> float:
    """``sparsity`` (the fraction of dims deleted) as a float in ``[0, 1)``, else a one-line
    ``SpliceError``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise SpliceError(f"--sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise SpliceError(
            f"--sparsity {sparsity}: must be in [0, 1) (the fraction of dims deleted)"
        )
    return float(sparsity)


def _notes(arch: SliceArch, sized: HiddenSized, d: int, hidden: int) -> list[str]:
    """What the report says beyond the rotation (LayerNorm's centring, pruned channels)."""
    notes = []
    if arch.centred:
        notes.append(
            "LayerNorm: the stream is made mean-zero (embeddings and writers centred) and "
            f"every basis keeps the all-ones direction, so {d - 1} of the {d} kept dims carry "
            "the stream's energy"
        )
    if sized.scored:
        modules = sorted({top for _, top in sized.scored})
        notes.append(
            f"{', '.join(modules)}: {len(sized.scored)} modules whose channels transformers "
            f"sizes from hidden_size keep {d} of {hidden} channels each (most calibrated energy "
            "through the writer; channel pruning beyond the rotation)"
        )
    return notes


def plan_slice(
    model: str | os.PathLike[str],
    *,
    sparsity: float = 0.25,
    calibration: str | os.PathLike[str] | torch.Tensor | None = None,
    basis: str = "per-layer",
    stream: str = "normed",
    calib: Calibration | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> SliceResult:
    """Plan a sliced copy of ``model`` (the calibration runs; nothing is written).

    ``calibration``: a text file, ``lm-eval:TASK``, ``zoo``, or ``[N, T]`` token ids (cut to
    ``calib.max_samples`` windows of ``calib.seq_len``). Options, the architecture and the
    calibration text are checked before the model is loaded."""
    from splice.dtypes import output_dtype
    from splice.modeling import check_runnable, load_causal_lm

    sparsity = _check_sparsity(sparsity)
    output_dtype(dtype)
    if basis not in BASES:
        raise SpliceError(f"--basis {basis}: choose from {', '.join(BASES)}")
    if stream not in STREAMS:
        raise SpliceError(f"--pca-of {stream}: choose from {', '.join(STREAMS)}")
    if calibration is None:
        raise SpliceError("slice needs --calibration FILE (a text file, lm-eval:TASK or zoo)")
    ckpt = open_checkpoint(model, allow_pickle=allow_pickle)
    refuse_sliced(ckpt, "slice")
    check_runnable(ckpt, trust_remote_code=trust_remote_code)
    arch = slice_arch(ckpt)
    if isinstance(ckpt, LanguageModel) and ckpt.layout.unsliceable:
        raise SpliceError(
            f"{ckpt.path}: slice: the language model of {ckpt.mm_config['model_type']} cannot "
            f"be sliced in place: {ckpt.layout.unsliceable}; the text model convert --text-only writes can be sliced"
        )
    if basis == "per-layer" and isinstance(ckpt, LanguageModel):
        raise SpliceError(
            f"{ckpt.path}: --basis per-layer writes splice's own model type, which has no "
            f"multimodal form; slice {ckpt.mm_config['model_type']} with --basis shared (or "
            "its language model alone: convert --text-only first)"
        )
    hidden = int(ckpt.config["hidden_size"])
    d = new_width(hidden, int(ckpt.config["num_attention_heads"]), sparsity)
    sized = hidden_sized(ckpt, d, arch)
    calib = calib or Calibration()
    windows = slice_windows(ckpt, calibration, calib, trust_remote_code)
    live = load_causal_lm(
        ckpt,
        dtype=calib.dtype,
        device=calib.device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        why="slicing needs finite weights",
    )
    qs, retained, total, channels = compute_bases(
        live, ckpt, windows, calib, d, basis, stream, arch, sized
    )
    if not isinstance(calibration, (str, os.PathLike)):
        calibration = f"{windows.shape[0]} given windows"
    tasks = slice_tasks(ckpt, qs, d, basis, dtype, arch, sized, channels)
    params_output = sum(math.prod(t.shape) for t in tasks)  # the language model's, as the source's
    tasks += module_writer_tasks(ckpt, qs, d, dtype, arch)
    config = sliced_config(ckpt, d, basis, dtype, arch)
    source_params = sum(math.prod(i.shape) for i in ckpt.tensors.values())
    report = SliceReport(
        operation=f"slice --sparsity {sparsity:g} --basis {basis}"
        + (f" --pca-of {stream}" if stream != "normed" else ""),
        source=str(ckpt.path),
        basis=basis,
        sparsity=sparsity,
        num_layers=ckpt.num_layers,
        hidden_size=hidden,
        new_hidden_size=d,
        params_source=source_params,
        params_output=params_output,
        retained=retained,
        total_retained=total,
        stream=stream,
        notes=_notes(arch, sized, d, hidden),
        meta={
            "calibration": str(calibration),
            "samples": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "device": calib.device,
            "dtype": calib.dtype,
        },
    )
    if ckpt.mtp:  # a multi-token-prediction layer would need slicing too
        report.notes.append(
            f"the {len(ckpt.arch.mtp_layers(ckpt.config))} multi-token-prediction layer(s) left "
            "out (num_nextn_predict_layers 0): they read the full-width stream"
        )
    removed = removed_mtp(ckpt, "multi-token prediction: not sliced")
    plan = surgery_plan(report, ckpt, tasks, config, ("slice",), removed)
    return SliceResult(plan, report, model=live)


def slice_model(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    sparsity: float = 0.25,
    calibration: str | os.PathLike[str] | None = None,
    basis: str = "per-layer",
    dry_run: bool = False,
    options: ExecOptions | None = None,
    **kwargs: Any,
) -> SliceResult:
    """Slice ``model`` into ``out`` (atomically) as :func:`plan_slice` plans it; with
    ``dry_run`` only plan. ``out`` is locked and checked before the calibration runs."""
    return run_surgery(
        plan_slice,
        model,
        out,
        dry_run=dry_run,
        options=options,
        sparsity=sparsity,
        calibration=calibration,
        basis=basis,
        **kwargs,
    )
