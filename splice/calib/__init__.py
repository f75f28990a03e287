"""The calibration tier: run a causal LM on calibration text and fold statistics from it.

- :mod:`~splice.calib.settings` — :class:`Calibration`, how text is run (window length and
  count, batch size, device, dtype), checked once when made;
- :mod:`~splice.calib.text` — calibration text sources (a file, ``lm-eval:TASK``, registered
  sources such as the zoo's ``zoo``) and :func:`token_windows`;
- :mod:`~splice.calib.windows` — :func:`windows_for`, from a Calibration to token windows;
- :mod:`~splice.calib.collectors` — :class:`Capture`, :class:`Collector` and the collectors
  :class:`Gram`, :class:`RouterCounts`, :class:`NeuronStats`, :class:`Reservoir`,
  :class:`PooledMean`;
- :mod:`~splice.calib.layer_io` — :class:`LayerIO` -> :class:`LayerStats` (per-layer cosines,
  angular distances, per-window moments) and :func:`layer_statistics`;
- :mod:`~splice.calib.runner` — :func:`run`, the hook runner (batched or sequential).

Importing it loads neither torch nor transformers.
"""

from __future__ import annotations

from splice.calib.collectors import (
    SITES,
    Capture,
    Collector,
    Gram,
    GramSum,
    NeuronMoments,
    NeuronStats,
    PooledMean,
    Reservoir,
    RouterCounts,
    RouterStats,
    Sample,
)
from splice.calib.layer_io import LayerIO, LayerStats, WindowMoments, layer_statistics
from splice.calib.runner import decoder_layers, run
from splice.calib.settings import Calibration
from splice.calib.text import SOURCES, calibration_text, is_text_source, text_tokens, token_windows
from splice.calib.windows import check_windows, windows_for

__all__ = [
    "SITES",
    "SOURCES",
    "Calibration",
    "Capture",
    "Collector",
    "Gram",
    "GramSum",
    "LayerIO",
    "LayerStats",
    "NeuronMoments",
    "NeuronStats",
    "PooledMean",
    "Reservoir",
    "RouterCounts",
    "RouterStats",
    "Sample",
    "WindowMoments",
    "calibration_text",
    "check_windows",
    "decoder_layers",
    "is_text_source",
    "layer_statistics",
    "run",
    "text_tokens",
    "token_windows",
    "windows_for",
]
