"""Layer statistics on calibration text, and the candidates each surgery chooses from.

The statistics are one :func:`splice.layer_metrics.measure_layers` pass, the same run and the
same choice ``splice analyze activations`` reports: per-layer input/output cosine (first token
excluded, Yi-9B's criterion), ShortGPT's block influence ``1 - cos(in, out)`` over all tokens,
and Gromov et al.'s angular distance ``d(l, l+n)`` between the last token's residual stream
entering layer ``l`` and leaving layer ``l+n-1``. This module reads the candidates off it:

- :func:`yi_candidates` — every block of ``k`` consecutive layers (the first and last layer
  kept out, as :func:`~splice.layer_metrics.duplicate_ranges` does) with the mean of its
  layers' io cosine; the highest is duplicated;
- :func:`angular_candidates` — every block of ``n`` layers with ``d(l, l+n)``; the lowest is
  pruned (:func:`~splice.layer_metrics.prune_blocks` chooses);
- :func:`influence_candidates` — every layer's block influence; the ``n`` lowest are pruned
  (:func:`~splice.layer_metrics.prune_order`).

:class:`Calibration` (how the text is run) is the core's :class:`splice.calib.Calibration`,
re-exported here for the surgery verbs.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

from splice.calib import Calibration

if TYPE_CHECKING:
    from splice.layer_metrics import LayerRun

__all__ = [
    "Calibration",
    "angular_candidates",
    "influence_candidates",
    "layer_report",
    "meta",
    "yi_candidates",
]


def layer_report(
    model: str | os.PathLike[str],
    calibration: str | os.PathLike[str],
    calib: Calibration,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LayerRun:
    """One :func:`~splice.layer_metrics.measure_layers` pass of ``model`` on ``calibration`` (a
    file, ``lm-eval:TASK``, ``zoo`` or ``zoo:both``). A text that does not fill one window of
    ``seq_len`` tokens is refused before the model is loaded."""
    from splice.layer_metrics import measure_layers

    return measure_layers(
        model, calibration, calib, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )


def meta(run: LayerRun) -> dict[str, Any]:
    """What the calibration run was (for the surgery report)."""
    keys = ("calibration", "samples", "seq_len", "device", "dtype", "final_norm", "seconds")
    return {k: run.meta[k] for k in keys if k in run.meta}


def yi_candidates(run: LayerRun, k: int) -> tuple[list[dict[str, Any]], int]:
    """Blocks ``[a, a+k)`` with ``1 <= a`` and ``a + k <= L - 1``, each with the mean io cosine
    of its layers; returns ``(candidates, start of the highest)``."""
    import numpy as np

    n = run.stats.num_layers
    io = run.stats.io_cosine()
    starts = list(range(1, n - k))
    cands = [{"layers": [a, a + k - 1], "value": float(io[a : a + k].mean())} for a in starts]
    best = int(np.argmax([c["value"] for c in cands]))
    return cands, starts[best]


def angular_candidates(run: LayerRun, n_drop: int) -> tuple[list[dict[str, Any]], int]:
    """Blocks ``[l, l+n)`` for every ``l``, each with ``d(l, l+n)``; returns ``(candidates,
    start of the block prune_blocks chooses, the lowest)``. A choice within the standard error
    of its runner-up warns."""
    from splice.layer_metrics import prune_blocks, tie_text

    dist = run.stats.angular_distance()
    n = run.stats.num_layers
    cands = [
        {"layers": [lo, lo + n_drop - 1], "value": float(dist[lo, lo + n_drop])}
        for lo in range(n - n_drop + 1)
    ]
    se, per_window = run.stats.angular_distance_se(), run.stats.angular_distance_windows()
    block = prune_blocks(dist, se, per_window)[n_drop - 1]
    if block.get("within_error"):
        samples = run.meta.get("samples", "?")
        warnings.warn(f"prune --n {n_drop}: {tie_text(block, samples)}", stacklevel=2)
    return cands, block["start"]


def influence_candidates(run: LayerRun, n_drop: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Every layer with its block influence; returns ``(candidates, the n lowest, sorted)``."""
    from splice.layer_metrics import prune_order

    bi = 1 - run.stats.io_cosine(all_positions=True)
    cands = [{"layers": [i, i], "value": float(v)} for i, v in enumerate(bi)]
    return cands, sorted(prune_order(bi)[:n_drop])
