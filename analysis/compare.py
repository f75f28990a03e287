"""Activation similarity across two models: linear CKA and cosine of their hidden states, per
layer, on the same calibration windows.

Both models run batch by batch on the same windows (:func:`splice.calib.run`, one batch
at a time): :class:`Boundaries` keeps one batch's residual stream at every boundary, ``emb``
(entering layer 0), the output of each layer ``0 .. L−1`` (before the final norm) and ``norm``
(the last layer's output through the final norm: HF's ``hidden_states[-1]``, what PruneMe /
ShortGPT read). :class:`CrossSimilarity` folds each batch's pair of states into float64 sums
and the states are dropped, so memory holds one batch of states of both models plus, per
boundary, ``XᵀX`` and ``YᵀY`` ``[H, H]`` and per compared pair ``XᵀY``.

One model at a time (:func:`compare_activations`): pass 1 loads A, runs every window and
writes its K states at positions ≥ 1 to a temporary ``np.memmap`` ``[K, N, T−1, H]`` (float32;
float64 for a float64 model, so the copy is exact) in a temporary folder, then frees A; pass 2
loads B, runs the same batches and folds each with A's rows read back from the file
(:func:`spill_states`, :func:`spilled_similarity`). The sums are those of the one-pass
:func:`activation_similarity` of both loaded models (``resident=True``), to float64 rounding.

Tokens at positions ≥ 1 are compared (the first, BOS, is the same in every window, as for
``io_cosine``). For X ``[n, H]`` (model A) and Y (model B) at one boundary:

- ``cka``: linear CKA ``‖X_cᵀY_c‖²_F / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F)``, X_c = X centred over the
  tokens (``X_cᵀY_c = XᵀY − sₓs_yᵀ/n`` from the sums ``sₓ``, ``s_y``): 1 for the same states,
  invariant to rotating and scaling either model's states.
- ``cosine``: the mean over tokens of ``cos(x_t, y_t)``.

Null (``baseline_other_token``): the same with B's state taken at another position of the
window (shifted by ``(T−1)//2`` among positions ≥ 1, as ``io_cosine``'s null): what two
unrelated tokens of one text score. Matrices: ``cka`` and ``cosine`` between every boundary of
A and every boundary of B (when they fit in ``pair_bytes``; its diagonal is the per-layer
value) and ``cka_layers`` / ``cosine_layers`` (value and null per boundary).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.analysis.report import SimilarityMatrix, SimilarityReport, short_names
from splice.calib import Capture, Collector
from splice.errors import SpliceError
from splice.progress import progress
from splice.scratch import scratch_dir
from splice.threads import threads_for

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


# ---- linear CKA from sums ------------------------------------------------------------------------
def cka_from_sums(
    n: int,
    sx: torch.Tensor,
    sy: torch.Tensor,
    xx: torch.Tensor,
    yy: torch.Tensor,
    xy: torch.Tensor,
) -> float:
    """Linear CKA of X ``[n, p]`` and Y ``[n, q]`` from ``sx = Σ x`` ``[p]``, ``sy``, ``xx = XᵀX``
    ``[p, p]``, ``yy = YᵀY`` and ``xy = XᵀY`` ``[p, q]`` (float64): centring is
    ``X_cᵀY_c = XᵀY − sₓs_yᵀ/n``. NaN when either is constant over the tokens."""
    import torch

    cxy = xy - torch.outer(sx, sy) / n
    cxx = xx - torch.outer(sx, sx) / n
    cyy = yy - torch.outer(sy, sy) / n
    den = float(torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy))
    return float((cxy * cxy).sum()) / den if den > 0 else float("nan")


@dataclass
class CKASums:
    """Float64 sums for linear CKA of features X ``[n, p]`` and Y ``[n, q]`` fed in row blocks
    (:meth:`update`); :meth:`cka` is CKA of all the rows seen."""

    tokens: int = 0
    sums: dict[str, Any] = field(default_factory=dict)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the rows ``x`` ``[m, p]``, ``y`` ``[m, q]`` (row t of x pairs with row t of y)."""
        import torch

        x, y = x.to(torch.float64), y.to(torch.float64)
        parts = {"sx": x.sum(0), "sy": y.sum(0), "xx": x.T @ x, "yy": y.T @ y, "xy": x.T @ y}
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.tokens += x.shape[0]

    def cka(self) -> float:
        s = self.sums
        return cka_from_sums(self.tokens, s["sx"], s["sy"], s["xx"], s["yy"], s["xy"])


# ---- collectors -----------------------------------------------------------------------------------
@dataclass
class Boundaries(Collector):
    """One batch's residual stream at every boundary: ``result()`` is ``[emb, out_0, ...,
    out_{L−1}]`` (``[B, T, H]`` each, as the model made them) plus, with ``final_norm`` (a module
    path such as ``model.norm``), the last output through that norm. Keeps the last batch run
    only: for :class:`CrossSimilarity`, which runs one batch at a time."""

    site: str = field(default="layer", init=False)
    layers: Any = field(default=None, init=False)
    final_norm: str | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        self._n = num_layers
        self._norm = model.get_submodule(self.final_norm) if self.final_norm else None
        self.states: list[Any] = [None] * (num_layers + 1 + (self._norm is not None))

    def update(self, c: Capture) -> None:
        if not bool(c.mask.all()):
            raise SpliceError("activation similarity needs unpadded windows")
        if c.layer == 0:
            self.states[0] = c.x
        self.states[c.layer + 1] = c.y
        if self._norm is not None and c.layer == self._n - 1:
            self.states[-1] = self._norm(c.y)

    def result(self) -> list[torch.Tensor]:
        return list(self.states)


@dataclass
class CrossSimilarity:
    """Sums over tokens (positions ≥ 1) of two models' states at K boundaries each: per boundary
    ``Σx``, ``XᵀX`` (A) and ``Σy``, ``YᵀY`` (B); per compared pair (i, j) ``XᵢᵀYⱼ`` and
    ``Σ cos(x, y)``; per boundary the null pairs (B at another position). ``pairs`` None:
    every (i, j); else the given list (e.g. the diagonal)."""

    boundaries: int
    pairs: list[tuple[int, int]] | None = None
    tokens: int = 0
    tokens_null: int = 0

    def __post_init__(self) -> None:
        k = self.boundaries
        if self.pairs is None:
            self.pairs = [(i, j) for i in range(k) for j in range(k)]
        self.sx: list[Any] = [None] * k
        self.sy: list[Any] = [None] * k
        self.xx: list[Any] = [None] * k
        self.yy: list[Any] = [None] * k
        self.xy: dict[tuple[int, int], Any] = {}
        self.cos: dict[tuple[int, int], float] = {}
        self.xy_null: list[Any] = [None] * k
        self.cos_null = np.zeros(k)

    def update(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """Fold in one batch: ``xs[i]``, ``ys[i]`` ``[B, T, H]`` the two models' states at
        boundary i on the same windows."""
        self.update_rows([s[:, 1:] for s in xs], ys)

    def update_rows(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """:meth:`update` with A's states at positions ≥ 1 only: ``xs[i]`` ``[B, T−1, H]``
        (as :func:`spill_states` keeps them; on the device of ``ys[i]`` ``[B, T, H]``)."""
        import torch

        def rows(t: torch.Tensor) -> torch.Tensor:
            dev = "cpu" if t.device.type == "mps" else t.device
            return t.reshape(-1, t.shape[-1]).to(dev, torch.float64)

        def add(store: Any, key: Any, value: torch.Tensor) -> None:
            store[key] = value if store[key] is None else store[key] + value

        b, t = ys[0].shape[:2]
        if xs[0].shape[:2] != (b, t - 1):
            raise SpliceError(
                f"A's states cover {tuple(xs[0].shape[:2])} windows x positions but B's "
                f"{(b, t - 1)}: both need the same batch"
            )
        x = [rows(s) for s in xs]
        y = [rows(s[:, 1:]) for s in ys]
        for i in range(self.boundaries):
            add(self.sx, i, x[i].sum(0))
            add(self.xx, i, x[i].T @ x[i])
            add(self.sy, i, y[i].sum(0))
            add(self.yy, i, y[i].T @ y[i])
        same_width = x[0].shape[1] == y[0].shape[1]
        for i, j in self.pairs:
            p = x[i].T @ y[j]
            self.xy[i, j] = self.xy[i, j] + p if (i, j) in self.xy else p
            if same_width:
                c = torch.nn.functional.cosine_similarity(x[i], y[j], dim=-1)
                self.cos[i, j] = self.cos.get((i, j), 0.0) + float(c.sum())
        self.tokens += b * (t - 1)
        if t > 2:  # the null: B's state at another position ≥ 1 of the same window
            for i in range(self.boundaries):
                other = torch.roll(ys[i][:, 1:], shifts=(t - 1) // 2, dims=1)
                yo = other.reshape(-1, other.shape[-1]).to(x[i].device, torch.float64)
                add(self.xy_null, i, x[i].T @ yo)
                if same_width:
                    c = torch.nn.functional.cosine_similarity(x[i], yo, dim=-1)
                    self.cos_null[i] += float(c.sum())
            self.tokens_null += b * (t - 1)

    def cka(self, i: int, j: int) -> float:
        """CKA of A's boundary i and B's boundary j (a compared pair)."""
        n = self.tokens
        return cka_from_sums(n, self.sx[i], self.sy[j], self.xx[i], self.yy[j], self.xy[i, j])

    def cosine(self, i: int, j: int) -> float:
        """Mean cos(x_t, y_t) of A's boundary i and B's boundary j (NaN: other widths)."""
        return self.cos[i, j] / self.tokens if (i, j) in self.cos else float("nan")

    def cka_null(self, i: int) -> float:
        if self.xy_null[i] is None:
            return float("nan")
        n = self.tokens
        return cka_from_sums(n, self.sx[i], self.sy[i], self.xx[i], self.yy[i], self.xy_null[i])

    def cosine_null(self, i: int) -> float:
        ok = self.tokens_null and self.cos
        return float(self.cos_null[i] / self.tokens_null) if ok else float("nan")


def activation_similarity(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    windows: torch.Tensor,
    *,
    layer_prefix: str = "model.layers.{i}.",
    final_norm: str | None = "model.norm",
    all_pairs: bool = True,
    batch_size: int = 8,
    device: str = "cpu",
    show_progress: bool = False,
) -> CrossSimilarity:
    """:class:`CrossSimilarity` of two loaded models (on ``device``, same depth) on unpadded
    ``windows`` ``[N, T]``: each batch runs through A, then B, and is folded in (both models in
    memory: :func:`compare_activations` spills A's states instead, one model at a time).
    ``all_pairs=False`` compares boundary i of A with boundary i of B only."""
    import torch

    if batch_size < 1:
        raise SpliceError(f"batch_size must be 1 or more, got {batch_size}")
    acc: CrossSimilarity | None = None
    batches = list(torch.split(windows, batch_size))
    for ids in progress(batches, "calibration", enabled=show_progress):
        states = [
            boundary_states(m, ids, layer_prefix=layer_prefix, final_norm=final_norm, device=device)
            for m in (model_a, model_b)
        ]
        if len(states[0]) != len(states[1]):
            raise SpliceError(
                f"the models have {len(states[0])} and {len(states[1])} hidden states: "
                "comparing layer by layer needs one depth"
            )
        if acc is None:
            k = len(states[0])
            acc = CrossSimilarity(k, None if all_pairs else [(i, i) for i in range(k)])
        with torch.no_grad():
            acc.update(*states)
        del states
    assert acc is not None
    return acc


def boundary_states(
    model: PreTrainedModel,
    ids: torch.Tensor,
    *,
    layer_prefix: str = "model.layers.{i}.",
    final_norm: str | None = "model.norm",
    device: str = "cpu",
) -> list[torch.Tensor]:
    """One batch's :class:`Boundaries` states (``[B, T, H]`` each, on ``device``)."""
    from splice.calib import run

    (s,) = run(
        model,
        ids,
        [Boundaries(final_norm=final_norm)],
        device=device,
        batch_size=ids.shape[0],
        layer_prefix=layer_prefix,
    )
    return s


def spill_dtype(dtype: str) -> np.dtype:
    """What :func:`spill_states` stores a model's states in: float32 (exact for float32,
    bfloat16 and float16 models), float64 for a float64 model."""
    return np.dtype(np.float64 if dtype == "float64" else np.float32)


def spill_states(
    model: PreTrainedModel,
    windows: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    layer_prefix: str = "model.layers.{i}.",
    final_norm: str | None = "model.norm",
    batch_size: int = 8,
    device: str = "cpu",
    show_progress: bool = False,
) -> np.memmap:
    """Pass 1 of :func:`compare_activations`: run ``model`` on ``windows`` ``[N, T]`` in batches
    of ``batch_size`` and write its K boundary states at positions ≥ 1 to a new ``np.memmap``
    at ``path`` ``[K, N, T−1, H]`` (float32; float64 for a float64 model), returned open."""
    import torch

    n, t = windows.shape
    if t < 2:
        raise SpliceError("no calibration tokens after the first position: use --seq-len 2+")
    mm: np.memmap | None = None
    start = 0
    batches = list(torch.split(windows, batch_size))
    for ids in progress(batches, "calibration (A)", enabled=show_progress):
        states = boundary_states(
            model, ids, layer_prefix=layer_prefix, final_norm=final_norm, device=device
        )
        if mm is None:
            dt = np.float64 if states[0].dtype == torch.float64 else np.float32
            shape = (len(states), n, t - 1, states[0].shape[-1])
            mm = np.memmap(path, dtype=dt, mode="w+", shape=shape)
        b = ids.shape[0]
        dt_t = torch.float64 if mm.dtype == np.float64 else torch.float32
        for i, s in enumerate(states):
            mm[i, start : start + b] = s[:, 1:].to("cpu", dt_t).numpy()
        start += b
        del states
    assert mm is not None
    mm.flush()
    return mm


def spilled_similarity(
    model_b: PreTrainedModel,
    windows: torch.Tensor,
    spill: np.ndarray,
    *,
    layer_prefix: str = "model.layers.{i}.",
    final_norm: str | None = "model.norm",
    all_pairs: bool = True,
    batch_size: int = 8,
    device: str = "cpu",
    show_progress: bool = False,
) -> CrossSimilarity:
    """Pass 2 of :func:`compare_activations`: :class:`CrossSimilarity` of A's states ``spill``
    (from :func:`spill_states` on the same ``windows`` and ``batch_size``) and ``model_b``'s,
    each batch of B folded in with A's rows for it, read from ``spill`` and moved to B's
    device."""
    import torch

    if batch_size < 1:
        raise SpliceError(f"batch_size must be 1 or more, got {batch_size}")
    k = spill.shape[0]
    acc = CrossSimilarity(k, None if all_pairs else [(i, i) for i in range(k)])
    start = 0
    batches = list(torch.split(windows, batch_size))
    for ids in progress(batches, "calibration (B)", enabled=show_progress):
        ys = boundary_states(
            model_b, ids, layer_prefix=layer_prefix, final_norm=final_norm, device=device
        )
        if len(ys) != k:
            raise SpliceError(
                f"the models have {k} and {len(ys)} hidden states: comparing layer by layer "
                "needs one depth"
            )
        b = ids.shape[0]
        xs = [torch.from_numpy(spill[i, start : start + b]).to(y.device) for i, y in enumerate(ys)]
        with torch.no_grad():
            acc.update_rows(xs, ys)
        start += b
        del ys, xs
    return acc


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _one_at_a_time(
    load: Any,
    paths: tuple[Any, Any],
    windows: torch.Tensor,
    workdir: str | os.PathLike[str] | None,
    *,
    device: str,
    **kw: Any,
) -> CrossSimilarity:
    """Both passes of :func:`compare_activations`: ``load(path)`` A, :func:`spill_states` into
    a new folder under ``workdir`` (None: the system's temporary folder), free A, ``load`` B,
    :func:`spilled_similarity`; the folder is removed on every exit (errors and Ctrl-C too)."""
    all_pairs = kw.pop("all_pairs")
    with scratch_dir("compare", workdir) as folder:  # a killed run's is removed by the next
        spill: np.memmap | None = None
        try:
            model = load(paths[0])
            spill = spill_states(model, windows, str(folder / "a.states"), device=device, **kw)
            del model  # A's weights go before B's are read
            gc.collect()
            if str(device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            model = load(paths[1])
            acc = spilled_similarity(
                model, windows, spill, all_pairs=all_pairs, device=device, **kw
            )
            del model
        finally:
            del spill  # unmap before the file goes
    return acc


# ---- the analysis -------------------------------------------------------------------------------
def compare_activations(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    calibration: str | os.PathLike[str],
    *,
    seq_len: int = 128,
    max_samples: int = 64,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    all_pairs: bool | None = None,
    pair_bytes: int = 2**30,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    include_path: str | None = None,
    show_progress: bool = False,
    threads: int | None = None,
    resident: bool = False,
    workdir: str | os.PathLike[str] | None = None,
) -> SimilarityReport:
    """Linear CKA and cosine of A's and B's hidden states per layer on the same windows of
    ``calibration`` (a file, ``lm-eval:TASK`` or ``zoo``); see the module docstring.

    Both models must tokenize the text alike and have one depth and hidden size (else
    :class:`SpliceError`, before either is loaded). ``all_pairs`` (None: when the ``XᵢᵀYⱼ`` of
    every pair of boundaries fit in ``pair_bytes``) adds the boundaries × boundaries matrices.
    ``threads``: torch CPU threads (None: one when the models' largest per-layer matrix has
    fewer than :data:`~splice.threads.SMALL_NUMEL` elements, torch's setting otherwise).

    One model in memory at a time: A runs first and its hidden states at positions ≥ 1 spill
    to a temporary file of ``K·N·(T−1)·H·4`` bytes (K = layers + 2 hidden states, N windows
    of T tokens; 8 bytes a value for float64 models) in a new folder under ``workdir`` (None:
    the system's temporary folder, ``TMPDIR``), removed at the end, also on an error; a
    :class:`SpliceError` before either model loads if that disk has less free space. Then B
    runs on the same batches against A's states read back. ``resident=True``: both models
    loaded at once and run batch by batch (:func:`activation_similarity`: no spill file, twice
    the model memory; the same figures to float64 rounding, which the tests check).
    """
    import torch

    from splice.calib import Calibration, calibration_text, windows_for
    from splice.layer_metrics import check_vocab, largest_layer_tensor
    from splice.modeling import check_runnable, load_causal_lm, load_tokenizer

    start = time.perf_counter()
    calib = Calibration(
        seq_len=seq_len,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        include_path=include_path,
        show_progress=show_progress,
    )
    dtype, device = calib.dtype, calib.device
    text = calibration_text(calibration, include_path=include_path)
    ckpts = [
        check_runnable(m, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        for m in (a, b)
    ]
    ca, cb = ckpts
    for key, what in (("num_hidden_layers", "layers"), ("hidden_size", "hidden size")):
        va, vb = ca.config.get(key), cb.config.get(key)
        if va != vb:
            raise SpliceError(
                f"{ca.path} has {va} {what} but {cb.path} has {vb}: comparing hidden states "
                "layer by layer needs one depth and width"
            )
    windows = []
    for c in ckpts:
        max_pos = c.config.get("max_position_embeddings")
        if max_pos and seq_len > max_pos:
            raise SpliceError(f"--seq-len {seq_len} exceeds {c.path}'s {max_pos} positions")
        tok = load_tokenizer(c.path, trust_remote_code=trust_remote_code)
        windows.append(windows_for(tok, calibration, calib, text=text))
    if windows[0].shape != windows[1].shape or not torch.equal(*windows):
        raise SpliceError(
            f"{ca.path} and {cb.path} tokenize the calibration text differently: their "
            "activations can only be compared on the same tokens (one tokenizer)"
        )
    ids = windows[0]
    for c in ckpts:
        check_vocab(c, ids)
    n_layers = int(ca.config.get("num_hidden_layers") or 0)
    hidden = int(ca.config.get("hidden_size") or 0)
    k = n_layers + 2
    if all_pairs is None:
        all_pairs = k * k * hidden * hidden * 8 <= pair_bytes
    norm = ca.arch.final_norm.removesuffix(".weight") if ca.arch.final_norm else None
    kept = n_layers + 1 + (norm is not None)  # hidden states per token
    spill_bytes = 0
    if not resident:
        base = os.fspath(workdir) if workdir is not None else tempfile.gettempdir()
        if not os.path.isdir(base):
            raise SpliceError(f"workdir {base}: not a folder")
        n, t = ids.shape
        item = spill_dtype(dtype).itemsize
        spill_bytes = kept * n * (t - 1) * hidden * item
        free = shutil.disk_usage(base).free
        if spill_bytes > free:
            raise SpliceError(
                f"comparing spills {ca.path}'s hidden states to disk: {_human(spill_bytes)} "
                f"({kept} states x {n} windows x {t - 1} positions x {hidden} x {item} bytes) but "
                f"{base} has {_human(free)} free; use a smaller --max-samples or --seq-len "
                "(or point TMPDIR at a larger disk)"
            )

    def load(path: Any) -> Any:
        return load_causal_lm(
            path,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )

    run_kw = dict(
        layer_prefix=ca.arch.layer_prefix,
        final_norm=norm,
        all_pairs=all_pairs,
        batch_size=batch_size,
        device=device,
        show_progress=show_progress,
    )
    with threads_for(largest_layer_tensor(*ckpts), threads):
        if resident:
            models = [load(c.path) for c in ckpts]
            acc = activation_similarity(*models, ids, **run_kw)
            del models
        else:
            acc = _one_at_a_time(load, (ca.path, cb.path), ids, workdir, **run_kw)
    report = similarity_report(acc, [str(ca.path), str(cb.path)], final_norm=norm is not None)
    report.meta.update(
        {
            "calibration": str(calibration),
            "samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
            "tokens": acc.tokens,
            "device": str(device),
            "dtype": dtype,
            "all_pairs": all_pairs,
            "resident": resident,
            "spill_bytes": spill_bytes,
            "seconds": time.perf_counter() - start,
        }
    )
    return report


def boundary_labels(boundaries: int, final_norm: bool) -> list[str]:
    """``emb``, ``0`` .. ``L−1`` (each layer's output) and ``norm`` (after the final norm)."""
    layers = boundaries - 1 - final_norm
    return ["emb", *(str(i) for i in range(layers)), *(["norm"] if final_norm else [])]


def similarity_report(
    acc: CrossSimilarity, models: list[str], *, final_norm: bool = True
) -> SimilarityReport:
    """A :class:`SimilarityReport` from :class:`CrossSimilarity` (``analysis`` is
    ``activation_similarity``; records per boundary, ``kind`` its label)."""
    if acc.tokens == 0:
        raise SpliceError("no calibration tokens after the first position: use --seq-len 2+")
    labels = boundary_labels(acc.boundaries, final_norm)
    records: list[dict[str, Any]] = []
    lines = {
        "cka": np.full((2, acc.boundaries), np.nan),
        "cosine": np.full((2, acc.boundaries), np.nan),
    }
    for i, label in enumerate(labels):
        layer = int(label) if label.isdigit() else None
        for metric, value, null in (
            ("cka", acc.cka(i, i), acc.cka_null(i)),
            ("cosine", acc.cosine(i, i), acc.cosine_null(i)),
        ):
            lines[metric][:, i] = value, null
            records.append(
                {
                    "kind": label,
                    "layer": layer,
                    "metric": metric,
                    "value": value,
                    "baseline_other_token": null,
                }
            )
    names = short_names(models)
    matrices = {}
    for metric in ("cka", "cosine"):
        matrices[f"{metric}_layers"] = SimilarityMatrix(
            f"{metric} of {names[0]} and {names[1]} per hidden state (row 2: other-token null)",
            metric,
            lines[metric],
            [metric, "null"],
            labels,
            "",
            "hidden state",
        )
    full = len(acc.pairs) == acc.boundaries**2
    if full:
        cka = np.array(
            [[acc.cka(i, j) for j in range(acc.boundaries)] for i in range(acc.boundaries)]
        )
        matrices["cka"] = SimilarityMatrix(
            f"cka: {names[0]} (rows) vs {names[1]} (columns)", "cka", cka, labels, labels,
            names[0], names[1],
        )  # fmt: skip
        if acc.cos:
            cos = np.array(
                [[acc.cosine(i, j) for j in range(acc.boundaries)] for i in range(acc.boundaries)]
            )
            matrices["cosine"] = SimilarityMatrix(
                f"cosine: {names[0]} (rows) vs {names[1]} (columns)", "cosine", cos, labels,
                labels, names[0], names[1],
            )  # fmt: skip
    return SimilarityReport(
        "activation_similarity",
        models,
        records,
        matrices,
        meta={"boundaries": labels, "tokens": acc.tokens},
    )


def summary(report: SimilarityReport) -> str:
    """Plain-text table of a :func:`compare_activations` report: per hidden state, CKA and
    cosine with their other-token nulls."""
    names = short_names(report.models)
    lines = [
        f"activation similarity: {names[0]} vs {names[1]} "
        f"({report.meta.get('tokens', '?')} tokens; null: B at another position)",
        f"{'hidden state':<12}  {'cka (null)':>18}  {'cosine (null)':>18}",
    ]
    for label in report.meta["boundaries"]:
        cells = []
        for metric in ("cka", "cosine"):
            (r,) = report.values(metric, kind=label)
            v, b = r["value"], r["baseline_other_token"]
            null = "n/a" if b is None or b != b else f"{b:.4f}"
            cells.append("n/a" if v is None or v != v else f"{v:.4f} ({null})")
        lines.append(f"{label:<12}  " + "  ".join(f"{c:>18}" for c in cells))
    if "seconds" in report.meta:
        lines.append(f"time: {report.meta['seconds']:.1f} s")
    return "\n".join(lines)
