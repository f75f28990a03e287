"""Layer statistics on calibration text, and the candidates each surgery chooses from.

The statistics are :func:`splice.analysis.activations.analyze_activations`' (one
:class:`splice.activations.LayerIO` pass): per-layer input/output cosine (first token excluded,
Yi-9B's criterion), ShortGPT's block influence ``1 - cos(in, out)`` over all tokens, and Gromov
et al.'s angular distance ``d(l, l+n)`` between the last token's residual stream entering layer
``l`` and leaving layer ``l+n-1``. This module only reads the candidates off that report:

- :func:`yi_candidates` — every block of ``k`` consecutive layers (the first and last layer
  kept out, as :func:`~splice.analysis.activations.duplicate_ranges` does) with the mean of its
  layers' io cosine; the highest is duplicated;
- :func:`angular_candidates` — every block of ``n`` layers with ``d(l, l+n)``; the lowest is
  pruned (:func:`~splice.analysis.activations.prune_blocks` chooses);
- :func:`influence_candidates` — every layer's block influence; the ``n`` lowest are pruned
  (the report's ``prune_order_block_influence``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Calibration:
    """How calibration text is run: windows of ``seq_len`` tokens (at most ``max_samples``),
    ``batch_size`` windows a batch, the model in ``dtype`` on ``device``; the last layer's
    output through the final norm (``final_norm``, HF's ``hidden_states[-1]``) or before it."""

    seq_len: int = 128
    max_samples: int = 64
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    include_path: str | None = None
    show_progress: bool = False
    final_norm: bool = True

    def __post_init__(self) -> None:
        from splice.activations import resolve_device

        for name, least in (("seq_len", 2), ("max_samples", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SpliceError(
                    f"{name} must be a whole number of {least} or more, got {value!r}"
                )
        self.device = resolve_device(self.device)


def layer_report(
    model: str | os.PathLike[str],
    calibration: str | os.PathLike[str],
    calib: Calibration,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Any:
    """The activation :class:`~splice.analysis.report.SimilarityReport` of ``model`` on
    ``calibration`` (a file, ``lm-eval:TASK`` or ``zoo``). A text that does not fill one window
    of ``seq_len`` tokens is refused before the model is loaded."""
    from splice.activations import calibration_text, token_windows
    from splice.analysis.activations import analyze_activations
    from splice.modeling import load_tokenizer

    text = calibration_text(calibration, include_path=calib.include_path)
    tok = load_tokenizer(model, trust_remote_code=trust_remote_code)
    first = token_windows(tok, text, calib.seq_len, 1)
    if first.shape[1] < calib.seq_len:
        raise SpliceError(
            f"--calibration {calibration}: the text is too short: {first.shape[1]} tokens, fewer "
            f"than one window of {calib.seq_len} (give a longer text or a smaller --seq-len)"
        )
    return analyze_activations(
        model,
        calibration,
        seq_len=calib.seq_len,
        max_samples=calib.max_samples,
        batch_size=calib.batch_size,
        device=calib.device,
        dtype=calib.dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        include_path=calib.include_path,
        show_progress=calib.show_progress,
        final_norm=calib.final_norm,
        warn_ties=False,  # the analysis' L/4 picks are not the verb's: it warns on its own
    )


def meta(report: Any) -> dict[str, Any]:
    """What the report says about the calibration run (for the surgery report)."""
    keys = ("calibration", "samples", "seq_len", "device", "dtype", "final_norm", "seconds")
    return {k: report.meta[k] for k in keys if k in report.meta}


def _per_layer(report: Any, metric: str) -> np.ndarray:
    import numpy as np

    n = report.meta["num_layers"]
    return np.array([report.values(metric, layer=i)[0]["value"] for i in range(n)])


def yi_candidates(report: Any, k: int) -> tuple[list[dict[str, Any]], int]:
    """Blocks ``[a, a+k)`` with ``1 <= a`` and ``a + k <= L - 1``, each with the mean io cosine
    of its layers; returns ``(candidates, start of the highest)``."""
    import numpy as np

    n = report.meta["num_layers"]
    io = _per_layer(report, "io_cosine")
    starts = list(range(1, n - k))
    cands = [{"layers": [a, a + k - 1], "value": float(io[a : a + k].mean())} for a in starts]
    best = int(np.argmax([c["value"] for c in cands]))
    return cands, starts[best]


def angular_candidates(report: Any, n_drop: int) -> tuple[list[dict[str, Any]], int]:
    """Blocks ``[l, l+n)`` for every ``l``, each with ``d(l, l+n)``; returns ``(candidates,
    start of the block prune_blocks chooses, the lowest)``."""
    from splice.analysis.activations import prune_blocks, tie_text

    dist = report.matrices["angular_distance_pairs"].values
    n = dist.shape[0] - 1
    cands = [
        {"layers": [lo, lo + n_drop - 1], "value": float(dist[lo, lo + n_drop])}
        for lo in range(n - n_drop + 1)
    ]
    blocks = report.recommendations.get("prune_blocks") or prune_blocks(dist)
    block = blocks[n_drop - 1]
    if block.get("within_error"):
        samples = report.meta.get("samples", "?")
        warnings.warn(f"prune --n {n_drop}: {tie_text(block, samples)}", stacklevel=2)
    return cands, block["start"]


def influence_candidates(report: Any, n_drop: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Every layer with its block influence; returns ``(candidates, the n lowest, sorted)``."""
    bi = _per_layer(report, "block_influence")
    cands = [{"layers": [i, i], "value": float(v)} for i, v in enumerate(bi)]
    order = report.recommendations["prune_order_block_influence"]
    return cands, sorted(int(i) for i in order[:n_drop])
