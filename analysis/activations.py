"""Layer redundancy from activations on calibration text, on top of :mod:`splice.activations`.

Per layer l (records): ``io_cosine`` (mean cosine between the layer's input and output hidden
states, first token excluded: Yi-9B's criterion), ``block_influence`` (ShortGPT: 1 − mean
cosine over all tokens) and ``angular_distance_next`` (d(l, l+1)). Their nulls:
``baseline_other_token`` (the cosine with the output at another position) and
``baseline_other_sample`` (the angle to another sample's last token).

Gromov et al.: d(l, l+n) = arccos(cos(x_l, x_{l+n})) / π on the last token, averaged over
samples, where x_l is the residual stream entering layer l (x_L leaves the last layer, before
the final norm). Matrix ``angular_distance`` has rows n = 1..L and columns l; for each n the
block to prune is layers l*..l*+n−1 with l* = argmin_l d(l, l+n). The range to duplicate for
depth up-scaling is the same argmin with the first and last layer kept out of it
(1 ≤ l, l+n ≤ L−1): the block whose output is closest to its input, so a second copy changes
the stream least.
"""

from __future__ import annotations

import os
import time
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
) -> SimilarityReport:
    """Load ``model``, run it on ``calibration`` (file, ``lm-eval:TASK`` or ``zoo``), report.

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
    stats = layer_statistics(
        lm,
        ids,
        layer_prefix=ckpt.arch.layer_prefix,
        batch_size=batch_size,
        device=device,
        show_progress=show_progress,
    )
    if not (np.isfinite(stats.angles).all() and np.isfinite(stats.io_cos_all).all()):
        raise SpliceError(
            f"{ckpt.path}: hidden states became NaN or inf running it in {dtype}"
            + ("; try --dtype float32" if dtype != "float32" else "")
        )
    report = activation_report(stats, str(ckpt.path))
    report.meta.update(
        {
            "calibration": str(calibration),
            "samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
            "device": str(device),
            "dtype": dtype,
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


def prune_blocks(distance: np.ndarray) -> list[dict[str, Any]]:
    """For each n = 1..L−1: the block of n layers whose input and output are closest.

    ``distance`` is ``[L+1, L+1]`` (boundaries). Returns dicts with ``n``, ``start``,
    ``layers`` (first and last layer of the block) and ``angular_distance``.
    """
    n_layers = distance.shape[0] - 1
    out = []
    for n in range(1, n_layers):
        d = [distance[lo, lo + n] for lo in range(n_layers - n + 1)]
        lo = int(np.argmin(d))
        out.append(
            {"n": n, "start": lo, "layers": [lo, lo + n - 1], "angular_distance": float(d[lo])}
        )
    return out


def duplicate_ranges(distance: np.ndarray) -> list[dict[str, Any]]:
    """For each n = 1..L−2: the range of n layers (not the first or last) to repeat.

    Same criterion as :func:`prune_blocks`, restricted to 1 ≤ l and l + n ≤ L − 1.
    """
    n_layers = distance.shape[0] - 1
    out = []
    for n in range(1, n_layers - 1):
        starts = list(range(1, n_layers - n))
        d = [distance[lo, lo + n] for lo in starts]
        k = int(np.argmin(d))
        lo = starts[k]
        out.append(
            {"n": n, "start": lo, "layers": [lo, lo + n - 1], "angular_distance": float(d[k])}
        )
    return out


def activation_report(stats: Any, model: str) -> SimilarityReport:
    """A :class:`SimilarityReport` from :class:`splice.activations.LayerStats`."""
    n_layers = stats.num_layers
    if stats.samples == 0:
        raise SpliceError("no calibration samples were run")
    io = stats.io_cos / max(stats.tokens, 1)
    io_all = stats.io_cos_all / max(stats.tokens_all, 1)
    io_other = stats.io_cos_other / max(stats.tokens, 1)
    dist = stats.angular_distance()
    dist_other = stats.angular_distance_other()
    records: list[dict[str, Any]] = []
    for layer in range(n_layers):
        other_sample = float(dist_other[layer, layer + 1]) if dist_other is not None else None
        records += [
            {
                "layer": layer,
                "metric": "io_cosine",
                "value": float(io[layer]),
                "baseline_other_token": float(io_other[layer]),
                "baseline_other_sample": None,
            },
            {
                "layer": layer,
                "metric": "block_influence",
                "value": float(1 - io_all[layer]),
                "baseline_other_token": float(1 - io_other[layer]),
                "baseline_other_sample": None,
            },
            {
                "layer": layer,
                "metric": "angular_distance_next",
                "value": float(dist[layer, layer + 1]),
                "baseline_other_token": None,
                "baseline_other_sample": other_sample,
            },
        ]
    by_n = np.full((n_layers, n_layers), np.nan)
    for n in range(1, n_layers + 1):
        for lo in range(n_layers - n + 1):
            by_n[n - 1, lo] = dist[lo, lo + n]
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
    prune = prune_blocks(dist)
    dup = duplicate_ranges(dist)
    quarter = max(1, n_layers // 4)
    recommendations: dict[str, Any] = {
        "prune_blocks": prune,
        "duplicate_ranges": dup,
        "prune_order_block_influence": [int(i) for i in np.argsort(1 - io_all, kind="stable")],
        "prune_order_io_cosine": [int(i) for i in np.argsort(-io, kind="stable")],
    }
    if len(prune) >= quarter:
        recommendations[f"prune {quarter} layers"] = _span(prune[quarter - 1])
    if len(dup) >= quarter:
        recommendations[f"duplicate {quarter} layers"] = _span(dup[quarter - 1])
    return SimilarityReport(
        "activations",
        [model],
        records,
        matrices,
        recommendations,
        meta={"num_layers": n_layers},
    )


def _span(r: dict[str, Any]) -> str:
    a, b = r["layers"]
    return f"layers {a}-{b} (d = {r['angular_distance']:.3f})"
