"""Layer redundancy from activations on calibration text: the report of one
:func:`splice.layer_metrics.measure_layers` pass (the run and the block choice live in the core,
so the surgery verbs pick what this report recommends without importing it).

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
``margin_se``, the standard error over windows of the per-window difference between the two
(paired: both are measured on the same windows, so what moves them together cancels);
``within_error`` when the margin is not larger. ``prune_order_*_ties`` are paired the same way. The headline recommendations (``prune L//4 layers``, ``duplicate L//4 layers``)
warn (``warnings.warn``) when they are within error: more windows would be needed to decide.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np

from splice.analysis.report import SimilarityMatrix, SimilarityReport
from splice.errors import SpliceError
from splice.layer_metrics import (
    duplicate_ranges,
    measure_layers,
    order_ties,
    prune_blocks,
    prune_order,
    ranges_text,
    span_text,
    tie_text,
)

__all__ = ["activation_report", "analyze_activations", "duplicate_ranges", "prune_blocks"]


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

    The run is :func:`splice.layer_metrics.measure_layers` (its arguments, checks and
    ``final_norm``: the last layer's output through the model's final norm, HF's
    ``hidden_states[-1]`` as PruneMe and ShortGPT read it; False: before the norm).
    Near-tied recommendations warn (see the module docstring) unless ``warn_ties`` is False.
    A per-layer sliced model (``splice slice --basis per-layer``) is refused in one line: its
    residual stream changes basis at every block, so its layers' inputs and outputs are not
    comparable (``--basis shared`` writes one that is).
    """
    from splice.calib import Calibration

    calib = Calibration(
        seq_len=seq_len,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        include_path=include_path,
        show_progress=show_progress,
        final_norm=final_norm,
    )
    run = measure_layers(
        model,
        calibration,
        calib,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        threads=threads,
    )
    report = activation_report(run.stats, str(run.model), warn_ties=warn_ties)
    report.meta.update(run.meta)
    return report


def activation_report(stats: Any, model: str, *, warn_ties: bool = True) -> SimilarityReport:
    """A :class:`SimilarityReport` from :class:`splice.calib.LayerStats`; near-tied L/4
    recommendations warn unless ``warn_ties`` is False."""
    n_layers = stats.num_layers
    if stats.samples == 0:
        raise SpliceError("no calibration samples were run")
    io = stats.io_cosine()
    io_all = stats.io_cosine(all_positions=True)
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
    per_window = stats.angular_distance_windows()
    io_w, io_all_w = stats.io_cosine_windows(), stats.io_cosine_windows(all_positions=True)
    influence_w = None if io_all_w is None else 1 - io_all_w  # per window, as 1 - io_all
    prune = prune_blocks(dist, dist_se, per_window)
    dup = duplicate_ranges(dist, dist_se, per_window)
    quarter = max(1, n_layers // 4)
    recommendations: dict[str, Any] = {
        "prune_blocks": prune,
        "duplicate_ranges": dup,
        "prune_order_block_influence": prune_order(1 - io_all),
        "prune_order_io_cosine": prune_order(-io),
        "prune_order_block_influence_ties": order_ties(1 - io_all, all_se, influence_w),
        "prune_order_io_cosine_ties": order_ties(-io, io_se, None if io_w is None else -io_w),
    }
    for what, blocks in (("prune", prune), ("duplicate", dup)):
        if len(blocks) >= quarter:
            block = blocks[quarter - 1]
            recommendations[f"{what} {quarter} layers"] = span_text(block)
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


def _tie_warning(
    what: str, block: dict[str, Any], blocks: list[dict[str, Any]], windows: int
) -> str:
    """One line: the headline block is within error of its runner-up (and which other n are)."""
    others = [x["n"] for x in blocks if x.get("within_error") and x is not block]
    also = f"; also tied for n = {ranges_text(others)}" if others else ""
    return f"{what} {block['n']} layers: {tie_text(block, windows)}{also}"
