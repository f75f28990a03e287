"""Layer redundancy from activations on calibration text, on top of :mod:`splice.activations`.

Per layer l (records): ``io_cosine`` (mean cosine between the layer's input and output hidden
states, first token excluded: Yi-9B's criterion), ``block_influence`` (ShortGPT: 1 − mean
cosine over all tokens) and ``angular_distance_next`` (d(l, l+1)). Their nulls:
``baseline_other_token`` (the cosine with the output at another position) and
``baseline_other_sample`` (the angle to another sample's last token).

Gromov et al.: d(l, l+n) = arccos(cos(x_l, x_{l+n})) / π on the last token, averaged over
samples, where x_l is the residual stream entering layer l. x_L, what leaves the last layer, is
taken through the final norm by default (``final_norm=True``): HF's ``hidden_states[-1]``, what
PruneMe and ShortGPT compare; ``final_norm=False`` (``--last-before-norm``) takes it before the
norm. The same x_L is the last layer's output for its io cosine and block influence.
Matrix ``angular_distance`` has rows n = 1..L and columns l; for each n the
block to prune is layers l*..l*+n−1 with l* = argmin_l d(l, l+n). The range to duplicate for
depth up-scaling is the same argmin with the first and last layer kept out of it
(1 ≤ l, l+n ≤ L−1): the block whose output is closest to its input, so a second copy changes
the stream least.

Uncertainty: every value is a mean over windows, and carries its standard error over windows
(``se`` in the records, sample std / √windows; matrix ``angular_distance_se``). Each block in
``prune_blocks`` / ``duplicate_ranges`` names its ``runner_up`` and its ``margin`` over it with
``margin_se`` = √(se² + se_runner_up²) (the two treated as independent: an overestimate when,
as for overlapping blocks, they are positively correlated); ``within_error`` when the margin
is not larger. The headline recommendations (``prune L//4 layers``, ``duplicate L//4 layers``)
warn (``warnings.warn``) when they are within error: more windows would be needed to decide.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import numpy as np

from splice.analysis.report import SimilarityMatrix, SimilarityReport
from splice.errors import SpliceError


def analyze_activations(
    model: str | os.PathLike[str],
    calibration: str | os.PathLike[str],
    *,
    seq_len: int = 128,
    max_samples: int = 64,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    include_path: str | None = None,
    show_progress: bool = False,
    final_norm: bool = True,
    threads: int | None = None,
    warn_ties: bool = True,
) -> SimilarityReport:
    """Load ``model``, run it on ``calibration`` (file, ``lm-eval:TASK`` or ``zoo``), report.

    ``final_norm``: the last layer's output passes through the model's final norm before it is
    compared (HF's ``hidden_states[-1]``, as PruneMe and ShortGPT); False: before the norm.
    Near-tied recommendations warn (see the module docstring) unless ``warn_ties`` is False (a
    caller that makes its own choice from the report warns about that). ``threads``: torch CPU threads
    (None: one when the largest per-layer matrix is small, ``common.SMALL_NUMEL``, torch's
    setting otherwise).

    The calibration text is read (and checked non-empty) and the model folder checked
    (config, weights, shapes) before the model is loaded. Pickled ``.bin`` weights are refused
    unless ``allow_pickle`` (then loaded with ``weights_only=True``); the model's own code runs
    only with ``trust_remote_code``.
    """
    from splice.activations import (
        calibration_text,
        check_model_code,
        layer_statistics,
        load_model,
        token_windows,
    )
    from splice.analysis.common import threads_for
    from splice.checkpoint import open_checkpoint
    from splice.modeling import load_tokenizer

    start = time.perf_counter()
    for name, value, least in (("seq_len", seq_len, 2), ("max_samples", max_samples, 1)):
        if value < least:
            raise SpliceError(f"{name} must be {least} or more, got {value}")
    if batch_size < 1:
        raise SpliceError(f"batch_size must be 1 or more, got {batch_size}")
    dtype = _float_dtype(dtype)
    text = calibration_text(calibration, include_path=include_path)
    ckpt = open_checkpoint(model, allow_pickle=allow_pickle)
    check_model_code(ckpt.path, trust_remote_code)
    ckpt.validate()
    norm = ckpt.arch.final_norm.removesuffix(".weight") if final_norm else None
    if final_norm and not norm:
        raise SpliceError(
            f"{ckpt.path}: its architecture names no final norm; use final_norm=False"
        )
    tokenizer = load_tokenizer(ckpt.path, trust_remote_code=trust_remote_code)
    max_pos = ckpt.config.get("max_position_embeddings")
    if max_pos and seq_len > max_pos:
        raise SpliceError(f"--seq-len {seq_len} exceeds the model's {max_pos} positions")
    ids = token_windows(tokenizer, text, seq_len, max_samples)
    vocab = _vocab_size(ckpt)
    if vocab and int(ids.max()) >= vocab:
        raise SpliceError(
            f"{ckpt.path}: its tokenizer gives token id {int(ids.max())} but the model has "
            f"{vocab} embeddings"
        )
    lm = load_model(
        ckpt.path,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    largest = max(
        (
            math.prod(i.shape)
            for n, i in ckpt.tensors.items()
            if ckpt.arch.parse(n).layer is not None
        ),
        default=0,
    )
    with threads_for(largest, threads):
        stats = layer_statistics(
            lm,
            ids,
            layer_prefix=ckpt.arch.layer_prefix,
            batch_size=batch_size,
            device=device,
            show_progress=show_progress,
            final_norm=norm,
        )
    if not (np.isfinite(stats.angles).all() and np.isfinite(stats.io_cos_all).all()):
        raise SpliceError(
            f"{ckpt.path}: hidden states became NaN or inf running it in {dtype}"
            + ("; try --dtype float32" if dtype != "float32" else "")
        )
    report = activation_report(stats, str(ckpt.path), warn_ties=warn_ties)
    report.meta.update(
        {
            "calibration": str(calibration),
            "samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
            "device": str(device),
            "dtype": dtype,
            "final_norm": bool(final_norm),
            "seconds": time.perf_counter() - start,
        }
    )
    return report


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _float_dtype(dtype: str) -> str:
    from splice.dtypes import dtype_name

    name = dtype_name(dtype)
    if name not in FLOAT_DTYPES:
        raise SpliceError(f"--dtype {dtype}: the model runs in {', '.join(FLOAT_DTYPES)}")
    return name


def _vocab_size(ckpt: Any) -> int | None:
    """Rows of the embedding matrix (None where the spec names none)."""
    emb = ckpt.tensors.get(ckpt.arch.embed) if ckpt.arch.embed else None
    return emb.shape[0] if emb is not None and emb.shape else None


def prune_blocks(distance: np.ndarray, se: np.ndarray | None = None) -> list[dict[str, Any]]:
    """For each n = 1..L−1: the block of n layers whose input and output are closest.

    ``distance`` is ``[L+1, L+1]`` (boundaries). Returns dicts with ``n``, ``start``,
    ``layers`` (first and last layer of the block) and ``angular_distance``; with ``se`` (the
    distances' standard errors, ``[L+1, L+1]``) also :func:`choose`'s margin over the runner-up.
    """
    n_layers = distance.shape[0] - 1
    return [choose(distance, se, n, range(n_layers - n + 1)) for n in range(1, n_layers)]


def duplicate_ranges(distance: np.ndarray, se: np.ndarray | None = None) -> list[dict[str, Any]]:
    """For each n = 1..L−2: the range of n layers (not the first or last) to repeat.

    Same criterion as :func:`prune_blocks`, restricted to 1 ≤ l and l + n ≤ L − 1.
    """
    n_layers = distance.shape[0] - 1
    return [choose(distance, se, n, range(1, n_layers - n)) for n in range(1, n_layers - 1)]


def choose(distance: np.ndarray, se: np.ndarray | None, n: int, starts: range) -> dict[str, Any]:
    """The block ``[l, l+n)`` with the smallest ``distance[l, l+n]`` among ``starts`` (the
    first on ties). With ``se``: its ``se``, the ``runner_up`` block (second smallest), the
    ``margin`` between them, ``margin_se`` = √(se² + se_runner_up²) and ``within_error``
    (margin ≤ margin_se; None where there is no error estimate: fewer than 2 windows)."""
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
    margin, err = float(d[j] - d[k]), math.hypot(e[k], e[j])
    out["runner_up"] = {
        "start": starts[j],
        "layers": [starts[j], starts[j] + n - 1],
        "angular_distance": float(d[j]),
        "se": float(e[j]),
    }
    out.update(
        margin=margin,
        margin_se=err,
        within_error=bool(margin <= err) if math.isfinite(err) else None,
    )
    return out


def order_ties(values: np.ndarray, se: np.ndarray) -> list[int]:
    """The n for which pruning the n lowest of ``values`` ``[L]`` is within error: the n-th and
    (n+1)-th lowest differ by no more than √(se_n² + se_{n+1}²)."""
    order = np.argsort(values, kind="stable")
    return [
        n
        for n in range(1, len(order))
        if values[order[n]] - values[order[n - 1]] <= math.hypot(se[order[n - 1]], se[order[n]])
    ]


def activation_report(stats: Any, model: str, *, warn_ties: bool = True) -> SimilarityReport:
    """A :class:`SimilarityReport` from :class:`splice.activations.LayerStats`; near-tied L/4
    recommendations warn unless ``warn_ties`` is False."""
    n_layers = stats.num_layers
    if stats.samples == 0:
        raise SpliceError("no calibration samples were run")
    io = stats.io_cos / max(stats.tokens, 1)
    io_all = stats.io_cos_all / max(stats.tokens_all, 1)
    io_other = stats.io_cos_other / max(stats.tokens, 1)
    dist = stats.angular_distance()
    dist_other = stats.angular_distance_other()
    io_se, all_se = stats.io_cosine_se(), stats.io_cosine_se(all_positions=True)
    dist_se = stats.angular_distance_se()
    records: list[dict[str, Any]] = []
    for layer in range(n_layers):
        other_sample = float(dist_other[layer, layer + 1]) if dist_other is not None else None
        records += [
            {
                "layer": layer,
                "metric": "io_cosine",
                "value": float(io[layer]),
                "se": _finite(io_se[layer]),
                "baseline_other_token": float(io_other[layer]),
                "baseline_other_sample": None,
            },
            {
                "layer": layer,
                "metric": "block_influence",
                "value": float(1 - io_all[layer]),
                "se": _finite(all_se[layer]),
                "baseline_other_token": float(1 - io_other[layer]),
                "baseline_other_sample": None,
            },
            {
                "layer": layer,
                "metric": "angular_distance_next",
                "value": float(dist[layer, layer + 1]),
                "se": _finite(dist_se[layer, layer + 1]),
                "baseline_other_token": None,
                "baseline_other_sample": other_sample,
            },
        ]
    by_n = np.full((n_layers, n_layers), np.nan)
    by_n_se = np.full((n_layers, n_layers), np.nan)
    for n in range(1, n_layers + 1):
        for lo in range(n_layers - n + 1):
            by_n[n - 1, lo] = dist[lo, lo + n]
            by_n_se[n - 1, lo] = dist_se[lo, lo + n]
    boundaries = ["emb"] + [str(i) for i in range(n_layers)]
    matrices = {
        "angular_distance": SimilarityMatrix(
            "angular distance d(l, l+n), last token",
            "angular_distance",
            by_n,
            [str(n) for n in range(1, n_layers + 1)],
            [str(i) for i in range(n_layers)],
            "n",
            "layer",
        ),
        "angular_distance_se": SimilarityMatrix(
            "standard error over windows of d(l, l+n)",
            "angular_distance_se",
            by_n_se,
            [str(n) for n in range(1, n_layers + 1)],
            [str(i) for i in range(n_layers)],
            "n",
            "layer",
            panel=False,
        ),
        "angular_distance_pairs": SimilarityMatrix(
            "angular distance between layer boundaries (emb = input of layer 0; "
            "i = output of layer i), last token",
            "angular_distance",
            dist,
            boundaries,
            boundaries,
            "boundary",
            "boundary",
            panel=False,
        ),
    }
    if dist_other is not None:
        matrices["angular_distance_pairs_baseline_other_sample"] = SimilarityMatrix(
            "angular distance between boundaries of different samples (null)",
            "angular_distance",
            dist_other,
            boundaries,
            boundaries,
            "boundary",
            "boundary",
            panel=False,
        )
    prune = prune_blocks(dist, dist_se)
    dup = duplicate_ranges(dist, dist_se)
    quarter = max(1, n_layers // 4)
    recommendations: dict[str, Any] = {
        "prune_blocks": prune,
        "duplicate_ranges": dup,
        "prune_order_block_influence": [int(i) for i in np.argsort(1 - io_all, kind="stable")],
        "prune_order_io_cosine": [int(i) for i in np.argsort(-io, kind="stable")],
        "prune_order_block_influence_ties": order_ties(1 - io_all, all_se),
        "prune_order_io_cosine_ties": order_ties(-io, io_se),
    }
    for what, blocks in (("prune", prune), ("duplicate", dup)):
        if len(blocks) >= quarter:
            block = blocks[quarter - 1]
            recommendations[f"{what} {quarter} layers"] = _span(block)
            if warn_ties and block.get("within_error"):
                warnings.warn(_tie_warning(what, block, blocks, stats.samples), stacklevel=2)
    return SimilarityReport(
        "activations",
        [model],
        records,
        matrices,
        recommendations,
        meta={"num_layers": n_layers},
    )


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _span(r: dict[str, Any]) -> str:
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


def _ranges(ns: list[int]) -> str:
    """``[1, 2, 3, 5, 7, 8]`` -> ``1-3, 5, 7-8``."""
    parts: list[list[int]] = []
    for n in ns:
        if parts and n == parts[-1][-1] + 1:
            parts[-1].append(n)
        else:
            parts.append([n])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def _tie_warning(
    what: str, block: dict[str, Any], blocks: list[dict[str, Any]], windows: int
) -> str:
    """One line: the headline block is within error of its runner-up (and which other n are)."""
    others = [x["n"] for x in blocks if x.get("within_error") and x is not block]
    also = f"; also tied for n = {_ranges(others)}" if others else ""
    return f"{what} {block['n']} layers: {tie_text(block, windows)}{also}"


def tie_text(block: dict[str, Any], windows: int) -> str:
    """Why ``block`` (a :func:`choose` entry with ``within_error``) is a near-tie, in words."""
    a, b = block["layers"]
    c, d = block["runner_up"]["layers"]
    return (
        f"layers {a}-{b} (d = {block['angular_distance']:.4f}) "
        f"beat layers {c}-{d} ({block['runner_up']['angular_distance']:.4f}) by "
        f"{block['margin']:.4f}, within the combined standard error {block['margin_se']:.4f} "
        f"over {windows} windows: more windows (--max-samples) may pick the other"
    )
