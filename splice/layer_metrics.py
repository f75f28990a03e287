"""Per-layer activation metrics on calibration text, and the layer blocks they choose.

:func:`measure_layers` checks the inputs, loads the model and runs one
:class:`~splice.calib.LayerIO` pass over windows of the calibration text (how: one
:class:`~splice.calib.Calibration`); it returns the
summed :class:`~splice.calib.LayerStats` and how they were taken (:class:`LayerRun`).
:func:`prune_blocks` / :func:`duplicate_ranges` choose, for each block length n, the block whose
input and output are closest (Gromov et al.'s angular distance, last token), with its margin
over the runner-up in standard errors; :func:`order_ties` does the same for a per-layer order
(ShortGPT's block influence). Both ``splice.analysis`` (its report, plots and warnings) and
``splice.surgery`` (``prune --by angular|influence``, ``upscale --yi``) use them, so a verb
picks exactly what the analysis recommends.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError

if TYPE_CHECKING:
    from splice.calib import Calibration, LayerStats
    from splice.checkpoint import Checkpoint

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class LayerRun:
    """One calibration pass over ``model``: its summed statistics, and ``meta`` (calibration,
    samples, seq_len, device, dtype, final_norm, seconds)."""

    model: Path
    stats: LayerStats
    meta: dict[str, Any] = field(default_factory=dict)


def measure_layers(
    model: str | os.PathLike[str],
    calibration: str | os.PathLike[str],
    calib: Calibration | None = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
) -> LayerRun:
    """Load ``model``, run it on ``calibration`` (file, ``lm-eval:TASK``, ``zoo``, ``zoo:both``)
    as ``calib`` says (None: :class:`~splice.calib.Calibration`'s defaults).

    ``calib.final_norm``: the last layer's output passes through the model's final norm before
    it is compared (HF's ``hidden_states[-1]``, as PruneMe and ShortGPT); False: before the norm.
    ``threads``: torch CPU threads (None: one when the largest per-layer matrix is small,
    :data:`splice.threads.SMALL_NUMEL`, torch's setting otherwise).

    The calibration text is read (and checked non-empty) and the model folder checked (config,
    weights, shapes) before the model is loaded; a text that does not fill one window of
    ``seq_len`` tokens is refused then too (:func:`~splice.calib.windows_for`). Pickled ``.bin``
    weights are refused unless ``allow_pickle`` (then loaded with ``weights_only=True``); the
    model's own code runs only with ``trust_remote_code``. Hidden states that turn NaN or inf
    are one error line.
    """
    from splice.calib import Calibration, calibration_text, layer_io, windows_for
    from splice.modeling import check_runnable, load_causal_lm, load_tokenizer
    from splice.threads import threads_for

    start = time.perf_counter()
    calib = calib if calib is not None else Calibration()
    seq_len, dtype, device = calib.seq_len, calib.dtype, calib.device
    text = calibration_text(calibration, include_path=calib.include_path)
    ckpt = check_runnable(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    norm = ckpt.arch.final_norm.removesuffix(".weight") if calib.final_norm else None
    if calib.final_norm and not norm:
        raise SpliceError(
            f"{ckpt.path}: its architecture names no final norm; use final_norm=False"
        )
    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=trust_remote_code)
    max_pos = ckpt.config.get("max_position_embeddings")
    if max_pos and seq_len > max_pos:
        raise SpliceError(f"--seq-len {seq_len} exceeds the model's {max_pos} positions")
    ids = windows_for(tokenizer, calibration, calib, text=text)
    check_vocab(ckpt, ids)
    lm = load_causal_lm(
        ckpt,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    with threads_for(largest_layer_tensor(ckpt), threads):
        stats = layer_io.layer_statistics(
            lm,
            ids,
            layer_prefix=ckpt.arch.layer_prefix,
            batch_size=calib.batch_size,
            device=device,
            show_progress=calib.show_progress,
            final_norm=norm,
        )
    if not (np.isfinite(stats.angles).all() and np.isfinite(stats.io_cos_all).all()):
        raise SpliceError(
            f"{ckpt.path}: hidden states became NaN or inf running it in {dtype}"
            + ("; try --calibration-dtype float32" if dtype != "float32" else "")
        )
    meta = {
        "calibration": str(calibration),
        "samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "device": str(device),
        "dtype": dtype,
        "final_norm": bool(calib.final_norm),
        "seconds": time.perf_counter() - start,
    }
    return LayerRun(ckpt.path, stats, meta)


def check_vocab(ckpt: Checkpoint, ids: Any) -> None:
    """One error line if the token ids ``[N, T]`` reach past ``ckpt``'s embedding rows."""
    vocab = vocab_size(ckpt)
    if vocab and int(ids.max()) >= vocab:
        raise SpliceError(
            f"{ckpt.path}: its tokenizer gives token id {int(ids.max())} but the model has "
            f"{vocab} embeddings"
        )


def largest_layer_tensor(*ckpts: Checkpoint) -> int:
    """Elements of the largest per-layer tensor of ``ckpts`` (what :func:`threads_for` sizes)."""
    return max(
        (
            math.prod(info.shape)
            for ckpt in ckpts
            for name, info in ckpt.tensors.items()
            if ckpt.arch.parse(name).layer is not None
        ),
        default=0,
    )


def float_dtype(dtype: str, option: str = "--dtype") -> str:
    """``dtype``'s torch name if a model can run in it, else one error line naming ``option``."""
    from splice.dtypes import dtype_name

    name = dtype_name(dtype)
    if name not in FLOAT_DTYPES:
        raise SpliceError(f"{option} {dtype}: the model runs in {', '.join(FLOAT_DTYPES)}")
    return name


def vocab_size(ckpt: Checkpoint) -> int | None:
    """Rows of the embedding matrix (None where the spec names none)."""
    emb = ckpt.tensors.get(ckpt.arch.embed) if ckpt.arch.embed else None
    return emb.shape[0] if emb is not None and emb.shape else None


# ---- choosing blocks ---------------------------------------------------------------------------
def prune_blocks(
    distance: np.ndarray, se: np.ndarray | None = None, windows: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """For each n = 1..L−1: the block of n layers whose input and output are closest.

    ``distance`` is ``[L+1, L+1]`` (boundaries). Returns dicts with ``n``, ``start``,
    ``layers`` (first and last layer of the block) and ``angular_distance``; with ``se`` (the
    distances' standard errors, ``[L+1, L+1]``) also :func:`choose`'s margin over the runner-up,
    paired over ``windows`` (``[N, L+1, L+1]``, each window's distances) where given.
    """
    n_layers = distance.shape[0] - 1
    return [choose(distance, se, n, range(n_layers - n + 1), windows) for n in range(1, n_layers)]


def duplicate_ranges(
    distance: np.ndarray, se: np.ndarray | None = None, windows: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """For each n = 1..L−2: the range of n layers (not the first or last) to repeat.

    Same criterion as :func:`prune_blocks`, restricted to 1 ≤ l and l + n ≤ L − 1.
    """
    n_layers = distance.shape[0] - 1
    return [
        choose(distance, se, n, range(1, n_layers - n), windows) for n in range(1, n_layers - 1)
    ]


def choose(
    distance: np.ndarray,
    se: np.ndarray | None,
    n: int,
    starts: range,
    windows: np.ndarray | None = None,
) -> dict[str, Any]:
    """The block ``[l, l+n)`` with the smallest ``distance[l, l+n]`` among ``starts`` (the
    first on ties). With ``se``: its ``se``, the ``runner_up`` block (second smallest), the
    ``margin`` between them, its standard error ``margin_se`` and ``within_error`` (margin ≤
    margin_se; None where there is no error estimate: fewer than 2 windows).

    ``margin_se`` is paired where ``windows`` (``[N, L+1, L+1]``, each window's distances) is
    given: the standard error over windows of the per-window difference, the exact error of a
    difference of two means taken on the same windows (``paired: True``). Without it,
    √(se² + se_runner_up²), which treats the two as independent: too large when, as for
    overlapping blocks on the same text, they move together.
    """
    d = np.array([distance[lo, lo + n] for lo in starts])
    order = np.argsort(d, kind="stable")
    k = int(order[0])
    lo = starts[k]
    out: dict[str, Any] = {
        "n": n,
        "start": lo,
        "layers": [lo, lo + n - 1],
        "angular_distance": float(d[k]),
    }
    if se is None:
        return out
    e = np.array([se[s, s + n] for s in starts])
    out["se"] = float(e[k])
    if len(starts) < 2:
        out.update(runner_up=None, margin=None, margin_se=None, within_error=None)
        return out
    j = int(order[1])
    margin = float(d[j] - d[k])
    if windows is not None and windows.shape[0] >= 2:
        diff = windows[:, starts[j], starts[j] + n] - windows[:, lo, lo + n]
        err = float(diff.std(ddof=1) / math.sqrt(diff.shape[0]))
    else:
        err = math.hypot(e[k], e[j])
    out["runner_up"] = {
        "start": starts[j],
        "layers": [starts[j], starts[j] + n - 1],
        "angular_distance": float(d[j]),
        "se": float(e[j]),
    }
    out.update(
        margin=margin,
        margin_se=err,
        paired=windows is not None and windows.shape[0] >= 2,
        within_error=bool(margin <= err) if math.isfinite(err) else None,
    )
    return out


def prune_order(values: np.ndarray) -> list[int]:
    """Layers in the order to prune them: lowest of ``values`` ``[L]`` first (stable)."""
    return [int(i) for i in np.argsort(values, kind="stable")]


def order_ties(values: np.ndarray, se: np.ndarray, windows: np.ndarray | None = None) -> list[int]:
    """The n for which pruning the n lowest of ``values`` ``[L]`` is within error: the n-th and
    (n+1)-th lowest differ by no more than the standard error of their difference, paired over
    ``windows`` (``[N, L]``, each window's values) where given, else √(se_n² + se_{n+1}²)."""
    order = np.argsort(values, kind="stable")
    paired = windows is not None and windows.shape[0] >= 2
    ties = []
    for n in range(1, len(order)):
        a, b = order[n - 1], order[n]
        if paired:
            assert windows is not None
            diff = windows[:, b] - windows[:, a]
            err = float(diff.std(ddof=1) / math.sqrt(diff.shape[0]))
        else:
            err = math.hypot(se[a], se[b])
        if values[b] - values[a] <= err:
            ties.append(n)
    return ties


# ---- in words ----------------------------------------------------------------------------------
def span_text(r: dict[str, Any]) -> str:
    """``layers a-b (d = 0.076 ± 0.004; next best layers c-d, +0.002 ± 0.006)``."""
    a, b = r["layers"]
    se = r.get("se")
    text = f"layers {a}-{b} (d = {r['angular_distance']:.3f}"
    if se is not None and math.isfinite(se):
        text += f" ± {se:.3f}"
    ru = r.get("runner_up")
    if ru is not None and r.get("margin_se") is not None and math.isfinite(r["margin_se"]):
        c, d = ru["layers"]
        text += f"; next best layers {c}-{d}, +{r['margin']:.3f} ± {r['margin_se']:.3f}"
    return text + ")"


def ranges_text(ns: list[int]) -> str:
    """``[1, 2, 3, 5, 7, 8]`` -> ``1-3, 5, 7-8``."""
    parts: list[list[int]] = []
    for n in ns:
        if parts and n == parts[-1][-1] + 1:
            parts[-1].append(n)
        else:
            parts.append([n])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def tie_text(block: dict[str, Any], windows: int) -> str:
    """Why ``block`` (a :func:`choose` entry with ``within_error``) is a near-tie, in words."""
    a, b = block["layers"]
    c, d = block["runner_up"]["layers"]
    return (
        f"layers {a}-{b} (d = {block['angular_distance']:.4f}) "
        f"beat layers {c}-{d} ({block['runner_up']['angular_distance']:.4f}) by "
        f"{block['margin']:.4f}, within the standard error of the difference "
        f"{block['margin_se']:.4f} "
        f"over {windows} windows: more windows (--max-samples) may pick the other"
    )
