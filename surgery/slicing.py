"""SliceGPT slicing: rotate the residual stream into its PCA basis and delete trailing dims.

Every RMSNorm scale ``γ`` folds into the linears it feeds (``W <- W·diag(γ)``), after which the
norms are rotation-invariant and the stream can be rotated by any orthogonal ``Q`` ``[D, D]``:
embeddings ``E <- E·Q``, readers (q/k/v, gate/up, router, experts' w1/w3) ``W <- W·diag(γ)·Q``,
writers (o_proj, down_proj, experts' w2) ``W <- Qᵀ·W``, the head ``W <- W·diag(γ_final)·Q``.
Keeping the first ``d`` columns of ``Q`` (``Q_d`` ``[D, d]``) deletes the stream's trailing
dimensions. The PCA is of the rms-normed stream entering each block (the stream each reader
sees, every token weighted alike), ``Σ x̃ᵀx̃`` in float64 on the calibration text, ``eigh``;
``stream="raw"`` takes it of the un-normed stream as SliceGPT does (big-norm tokens weigh more).

- ``basis="per-layer"`` is SliceGPT: one basis ``Q_k`` per block input (attention and MLP of
  every layer, and the head), each computed on the model whose earlier blocks are already
  sliced (the runner's sequential mode). The residual path then needs ``S_k = Q_kᵀ·Q_{k+1}``
  ``[d, d]`` between blocks: saved as ``model.layers.{i}.attn_shortcut_Q`` / ``mlp_shortcut_Q``
  in the safetensors output; :func:`splice.surgery.load_sliced` loads it (stock transformers
  modules plus the shortcuts, no remote code).
- ``basis="shared"``: one basis for the whole stream, the eigenvectors of the Gram matrices of
  all block inputs summed (on the unsliced model). No shortcut is needed, and the output is a
  standard checkpoint of the same family with ``hidden_size = d`` that ``AutoModelForCausalLM``
  loads: RMSNorm over ``d`` dims instead of ``D`` differs by ``√(D/d)`` (folded into the norm
  weights) and its eps by ``D/d`` (``rms_norm_eps`` scaled), exact up to the discarded energy;
  ``head_dim`` is written explicitly and the head untied from the embeddings (the final norm
  folds into the head only).

``d`` is ``(1 - sparsity)·D`` rounded down to a multiple of ``lcm(8, num_attention_heads)`` (so
``hidden_size % num_attention_heads == 0`` holds; SliceGPT rounds to multiples of 8), and is the
same for both bases. Both outputs are exactly the source model with the stream projected onto
``span(Q_d)`` at every block input (``x <- x·Q_d·Q_dᵀ``): that full-width model is what the
calibration runs on and what :attr:`SliceResult.model` holds. Architectures: every one whose
spec gives every tensor a residual-stream role and has two pre-norm blocks per layer (llama,
mistral, qwen2, mixtral, phi3; gemma's norm offset and embedding scale fold too).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from splice.calib import Collector
from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.execute import ExecOptions, Source, TensorTask
from splice.sliced_check import refuse_sliced
from splice.surgery.calibration import Calibration
from splice.surgery.depth import SurgeryResult, run_surgery, surgery_plan
from splice.surgery.report import Recorded
from splice.surgery.sliced import SHORTCUTS, SLICED_FROM, SLICED_TYPE, as_layers, units

if TYPE_CHECKING:
    import torch

    from splice.calib import Capture

BASES = ("per-layer", "shared")
#: what the PCA is of: the stream each token scaled to rms 1 (what readers see), or as it is
STREAMS = ("normed", "raw")


# ---- the report ---------------------------------------------------------------------------------
@dataclass
class SliceReport(Recorded):
    """One slicing of ``source``: ``hidden_size`` ``D`` -> ``new_hidden_size`` ``d``.

    ``retained`` has one entry per block input (``layer``, ``block`` attn / mlp / head,
    ``value``): the fraction of the (rms-normed, or raw) stream's energy there in the kept
    ``d`` dimensions, measured on the model whose earlier blocks are sliced (per-layer: the top
    ``d`` eigenvalues over the trace of that block's Gram matrix). ``total_retained`` (shared):
    the same fraction of the Gram matrices of all blocks summed, on the unsliced model.
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
    meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    kind: ClassVar[str] = "slice"

    @property
    def title(self) -> str:
        return (
            f"{self.operation}: hidden {self.hidden_size} -> {self.new_hidden_size} "
            f"({self.num_layers} layers)"
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
        lines += self.score_lines()
        return "\n".join(lines)

    def card_details(self) -> str:
        """Markdown for the model card."""
        load = (
            "Load it with `splice.surgery.load_sliced(path)`: the residual path carries "
            "`attn_shortcut_Q` / `mlp_shortcut_Q` matrices between blocks."
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

        live = load_sliced(self.out, device=kwargs.get("device", "cpu"))
        source = evaluate({"source": self.report.source}, text=text, tasks=tasks, **kwargs)
        output = evaluate(
            {"output": live}, text=text, tasks=tasks, tokenizer=str(self.out), **kwargs
        )
        self.report.scores = {**source, **output}
        return self.report.scores


# ---- checks -------------------------------------------------------------------------------------
def new_width(hidden: int, heads: int, sparsity: float) -> int:
    """``d``: ``(1 - sparsity)·hidden`` rounded down to a multiple of ``lcm(8, heads)``."""
    step = math.lcm(8, heads)
    d = int((1.0 - sparsity) * hidden + 1e-9) // step * step
    if d < step:
        raise SpliceError(
            f"--sparsity {sparsity:g}: keeps {(1 - sparsity) * hidden:.1f} of {hidden} dims, fewer "
            f"than one multiple of {step} (lcm of 8 and {heads} heads); slice less"
        )
    return d


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise SpliceError(f"--sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise SpliceError(
            f"--sparsity {sparsity}: must be in [0, 1) (the fraction of dims deleted)"
        )
    return float(sparsity)


def block_names(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """The spec's norms (``norm_feeds`` keys) and residual writers, attention first; a one-line
    ``SpliceError`` when the spec lacks the roles slicing needs."""
    spec = ckpt.arch
    mt = spec.model_type
    why = None
    if spec.block in ("post_norm", "sandwich"):
        why = (
            "its blocks normalise their own output before the residual add (post-norm), and a "
            "norm there does not commute with a rotation of the stream, so no exact slicing "
            "exists"
        )
    elif spec.block == "parallel":
        why = (
            "attention and MLP read one norm in parallel blocks, which slicing does not handle yet"
        )
    elif spec.inferred or not spec.norm_feeds or not spec.residual_writers:
        why = "its spec declares no norm_feeds / residual_writers roles"
    elif spec.norm.get("kind") != "rms":
        why = f"its norms are {spec.norm.get('kind')!r}, not RMSNorm"
    elif len(spec.norm_feeds) != 2 or len(spec.residual_writers) != 2:
        why = "its layers are not two pre-norm blocks (attention, MLP)"
    elif spec.embed_scale not in (None, "sqrt_hidden_size") and not str(
        spec.embed_scale
    ).startswith("config:"):
        why = f"its embedding scale {spec.embed_scale!r} is not known to slicing"
    else:
        other = [n for n in ckpt.tensors if spec.role(n) == "other"]
        if other:
            why = f"its spec gives no residual-stream role to {other[0]}" + (
                f" and {len(other) - 1} more tensors" if len(other) > 1 else ""
            )
    if why is None and "rms_norm_eps" not in ckpt.config:
        why = "its config has no rms_norm_eps"
    if why is None and not (
        ckpt.config.get("hidden_size") and ckpt.config.get("num_attention_heads")
    ):
        why = "its config has no hidden_size / num_attention_heads"
    if why is not None:
        raise SpliceError(f"slice: architecture {mt!r} is not supported: {why}")
    return list(spec.norm_feeds), list(spec.residual_writers)


def _windows(ckpt: Checkpoint, calibration: Any, calib: Calibration, tc: bool) -> torch.Tensor:
    import torch

    from splice.calib import windows_for

    windows = windows_for(ckpt, calibration, calib, trust_remote_code=tc)
    if isinstance(calibration, torch.Tensor):
        calibration = f"{windows.shape[0]} given windows"
    hidden = int(ckpt.config["hidden_size"])
    if windows.numel() < hidden:
        raise SpliceError(
            f"--calibration {calibration}: {windows.numel()} tokens, fewer than the hidden size "
            f"{hidden}: the PCA basis would be underdetermined (give more text or --max-samples)"
        )
    return windows


# ---- collectors -----------------------------------------------------------------------------------
def _stream_rows(c: Capture, stream: str) -> torch.Tensor:
    """``[n, D]`` float64: the real tokens' stream entering the block, each row scaled to rms 1
    (``stream="normed"``) or as it is (``"raw"``, SliceGPT's choice)."""
    import torch

    r = c.rows("input")
    r = r.to("cpu" if r.device.type == "mps" else r.device, torch.float64)
    if stream == "raw":
        return r
    return r / r.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)


@dataclass
class StreamGram(Collector):
    """``Σ x̃ᵀx̃`` ``[D, D]`` float64 of the rms-normed stream entering each block (one per
    block; ``summed``: one for all blocks together)."""

    site: str = "layer"
    summed: bool = False
    stream: str = "normed"

    def start(self, model: Any, num_layers: int) -> None:
        self._sums: dict[int, torch.Tensor] = {}

    def update(self, c: Capture) -> None:
        r = _stream_rows(c, self.stream)
        key = 0 if self.summed else int(c.layer)
        g = r.T @ r
        self._sums[key] = self._sums[key] + g if key in self._sums else g

    def take(self, key: int) -> torch.Tensor:
        """The Gram matrix of ``key``, dropped from the collector."""
        return self._sums.pop(key)

    def result(self) -> dict[int, torch.Tensor]:
        return dict(self._sums)


@dataclass
class KeptEnergy(Collector):
    """Per block: the fraction of the rms-normed stream's energy inside ``span(basis)``
    (``basis`` ``[D, d]`` orthonormal columns)."""

    basis: Any = None
    site: str = "layer"
    stream: str = "normed"

    def start(self, model: Any, num_layers: int) -> None:
        self._kept: dict[int, float] = {}
        self._total: dict[int, float] = {}

    def update(self, c: Capture) -> None:
        r = _stream_rows(c, self.stream)
        k = int(c.layer)
        kept = float((r @ self.basis.to(r.device)).pow(2).sum())
        self._kept[k] = self._kept.get(k, 0.0) + kept
        self._total[k] = self._total.get(k, 0.0) + float(r.pow(2).sum())

    def result(self) -> dict[int, float]:
        return {k: self._kept[k] / self._total[k] for k in sorted(self._kept)}


def pca(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues [D] descending, eigenvectors [D, D] as columns)`` of a float64 Gram."""
    import torch

    vals, vecs = torch.linalg.eigh(gram.to(torch.float64))
    return vals.flip(0), vecs.flip(1)


# ---- calibration: the bases ---------------------------------------------------------------------------
def _block_label(k: int, n_layers: int) -> dict[str, Any]:
    if k == 2 * n_layers:
        return {"layer": None, "block": "head"}
    return {"layer": k // 2, "block": ("attn", "mlp")[k % 2]}


def compute_bases(
    live: Any,
    ckpt: Checkpoint,
    windows: torch.Tensor,
    calib: Calibration,
    d: int,
    basis: str,
    stream: str = "normed",
) -> tuple[list[torch.Tensor], list[dict[str, Any]], float | None]:
    """The kept bases ``Q_d`` ``[D, d]`` float64 (one per block input, ``2L + 1``; shared: the
    same for all), the retained variance of each, and (shared) of all together. ``live`` is
    rebuilt in place into the sliced model simulated at full width (:mod:`.sliced`)."""
    import torch

    from splice.calib import decoder_layers, run

    spec = ckpt.arch
    norms, writers = block_names(ckpt)
    prefix = spec.layer_prefix
    path = prefix.split("{i}")[0].rstrip(".")
    old = decoder_layers(live, prefix)
    n_layers = len(old)
    blocks = units(live, old, norms, writers)
    parent, _, name = path.rpartition(".")
    setattr(live.get_submodule(parent), name, torch.nn.ModuleList(blocks))
    param = next(live.parameters())
    qs: list[torch.Tensor] = []
    retained: list[dict[str, Any]] = []
    total = None
    kinds = getattr(live.config, "layer_types", None)
    common = dict(
        device=calib.device,
        batch_size=calib.batch_size,
        sequential=True,
        layer_prefix=prefix,
        # each block runs with its layer's attention mask (sliding / full); the head's is unused
        layer_types=[kinds[min(k // 2, n_layers - 1)] for k in range(len(blocks))]
        if kinds
        else None,
        show_progress=calib.show_progress,
    )
    if basis == "per-layer":
        gram = StreamGram(stream=stream)

        def after(k: int, _: Any) -> None:
            vals, vecs = pca(gram.take(k))
            q = vecs[:, :d].contiguous()
            qs.append(q.cpu())
            kept = float(vals[:d].clamp_min(0).sum() / vals.clamp_min(0).sum())
            retained.append({**_block_label(k, n_layers), "value": kept})
            blocks[k].proj = q.to(param.device, param.dtype)

        run(live, windows, [gram], after_layer=after, **common)
    else:
        gram = StreamGram(summed=True, stream=stream)
        run(live, windows, [gram], **common)
        vals, vecs = pca(gram.take(0))
        q = vecs[:, :d].contiguous()
        total = float(vals[:d].clamp_min(0).sum() / vals.clamp_min(0).sum())
        proj = q.to(param.device, param.dtype)
        for b in blocks:
            b.proj = proj
        (kept,) = run(live, windows, [KeptEnergy(q, stream=stream)], **common)
        retained = [{**_block_label(k, n_layers), "value": v} for k, v in kept.items()]
        qs = [q.cpu()] * len(blocks)
    as_layers(live, blocks, old, path)
    return qs, retained, total


# ---- the plan --------------------------------------------------------------------------------------
def _tasks(
    ckpt: Checkpoint, qs: list[torch.Tensor], d: int, basis: str, dtype: str | None
) -> list[TensorTask]:
    """One task per output tensor, in float64 (see the module docstring for the formulas)."""
    import torch

    spec = ckpt.arch
    key = str(ckpt.path)
    norms, writers = block_names(ckpt)
    hidden = int(ckpt.config["hidden_size"])
    n_layers = ckpt.num_layers
    offset = float(spec.norm.get("offset", 0.0))
    root = math.sqrt(hidden / d)
    # sqrt(hidden) changes with the width; a config multiplier (granite) stays as it is
    emb_scale = root if spec.embed_scale == "sqrt_hidden_size" else 1.0
    head_q = qs[2 * n_layers]

    def task(
        name: str, shape: tuple[int, ...], like: str, sources: tuple[str, ...], fn: Any, label: str
    ) -> TensorTask:
        info = ckpt[like]
        return TensorTask(
            name=name,
            shape=tuple(shape),
            dtype=dtype or info.dtype,
            sources=tuple(Source(key, s) for s in sources),
            compute=fn,
            load_dtype="float64",
            label=label,
        )

    def const(value: torch.Tensor) -> Any:
        return lambda _: value

    def reads(q: torch.Tensor) -> Any:  # [out, D] · diag(γ [D]) · Q_d [D, d] -> [out, d]
        return lambda t: (t[0] * (t[1] + offset)) @ q.to(t[0].device)

    def writes(q: torch.Tensor) -> Any:  # [D, in] -> [d, in]; bias [D] -> [d]
        return lambda t: q.to(t[0].device).T @ t[0] if t[0].dim() == 2 else t[0] @ q.to(t[0].device)

    tasks: list[TensorTask] = []
    for name, info in ckpt.tensors.items():
        role = spec.role(name)
        shape = tuple(info.shape)
        if role == "embed":
            q0 = qs[0]
            tasks.append(
                task(
                    name,
                    (shape[0], d),
                    name,
                    (name,),
                    lambda t, q0=q0: (t[0] @ q0.to(t[0].device)) * emb_scale,
                    f"{key}:{name} @ Q_0",
                )
            )
            if ckpt.tied:
                tasks.append(
                    task(
                        spec.lm_head,
                        (shape[0], d),
                        name,
                        (name, spec.final_norm),
                        reads(head_q),
                        f"{key}:{name} (untied) * final norm @ Q_head",
                    )
                )
        elif role == "head":
            tasks.append(
                task(
                    name,
                    (shape[0], d),
                    name,
                    (name, spec.final_norm),
                    reads(head_q),
                    f"{key}:{name} * final norm @ Q_head",
                )
            )
        elif role in ("norm", "final_norm"):
            value = torch.full((d,), root - offset, dtype=torch.float64)
            tasks.append(task(name, (d,), name, (), const(value), f"const sqrt(D/d)={root:.6g}"))
        elif role == "reader":
            norm = spec.feeding_norm(name)
            layer = spec.layer_of(name)
            assert norm is not None and layer is not None
            k = 2 * layer + norms.index(spec.parse(norm).kind)
            if len(shape) == 2:
                tasks.append(
                    task(
                        name,
                        (shape[0], d),
                        name,
                        (name, norm),
                        reads(qs[k]),
                        f"{key}:{name} * norm @ Q_{k}",
                    )
                )
            else:
                tasks.append(TensorTask.copy(name, key, name, info, dtype=dtype))
        elif role == "inner":  # off the stream (q/k norms over head dims): as it is
            tasks.append(TensorTask.copy(name, key, name, info, dtype=dtype))
        elif role == "writer":
            layer = spec.layer_of(name)
            module = spec._module(name)
            assert layer is not None and module is not None
            k = 2 * layer + writers.index(module[1])
            out_shape = (d, *shape[1:])
            tasks.append(
                task(
                    name, out_shape, name, (name,), writes(qs[k + 1]), f"Q_{k + 1}^T @ {key}:{name}"
                )
            )
        else:  # block_names refused these
            raise SpliceError(f"{name}: no residual-stream role")
    if basis == "per-layer":
        like = spec.final_norm
        for i in range(n_layers):
            for j, kind in enumerate(SHORTCUTS):
                k = 2 * i + j
                s = (qs[k].T @ qs[k + 1]).contiguous()
                tasks.append(
                    task(
                        spec.layer_prefix.format(i=i) + kind,
                        (d, d),
                        like,
                        (),
                        const(s),
                        f"Q_{k}^T Q_{k + 1}",
                    )
                )
    return tasks


def _config(ckpt: Checkpoint, d: int, basis: str, dtype: str | None) -> dict[str, Any]:
    from splice.dtypes import config_with_dtype

    spec = ckpt.arch
    cfg = dict(ckpt.config)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    cfg["head_dim"] = int(cfg.get("head_dim") or hidden // heads)
    cfg["hidden_size"] = d
    cfg["rms_norm_eps"] = float(cfg["rms_norm_eps"]) * hidden / d
    cfg["tie_word_embeddings"] = False
    if basis == "per-layer":
        cfg[SLICED_FROM] = cfg["model_type"]
        cfg["model_type"] = SLICED_TYPE
        cfg["splice_slicing"] = {
            "basis": basis,
            "source_hidden_size": hidden,
            "layer_prefix": spec.layer_prefix,
            "layers": spec.layer_prefix.split("{i}")[0].rstrip("."),
            "norms": list(spec.norm_feeds),
            "writers": list(spec.residual_writers),
            "shortcuts": list(SHORTCUTS),
        }
    if dtype:
        cfg = config_with_dtype(cfg, dtype)
    return cfg


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
    block_names(ckpt)
    hidden = int(ckpt.config["hidden_size"])
    d = new_width(hidden, int(ckpt.config["num_attention_heads"]), sparsity)
    calib = calib or Calibration()
    windows = _windows(ckpt, calibration, calib, trust_remote_code)
    live = load_causal_lm(
        ckpt.path,
        dtype=calib.dtype,
        device=calib.device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        why="slicing needs finite weights",
    )
    qs, retained, total = compute_bases(live, ckpt, windows, calib, d, basis, stream)
    if not isinstance(calibration, (str, os.PathLike)):
        calibration = f"{windows.shape[0]} given windows"
    tasks = _tasks(ckpt, qs, d, basis, dtype)
    config = _config(ckpt, d, basis, dtype)
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
        params_output=sum(math.prod(t.shape) for t in tasks),
        retained=retained,
        total_retained=total,
        stream=stream,
        meta={
            "calibration": str(calibration),
            "samples": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "device": calib.device,
            "dtype": calib.dtype,
        },
    )
    plan = surgery_plan(report, ckpt, tasks, config, ("slice",))
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
