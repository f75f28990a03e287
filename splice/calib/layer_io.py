"""Per-layer input/output statistics: :class:`LayerIO` -> :class:`LayerStats`.

Per-layer input/output cosine (Yi-9B's criterion, ShortGPT's block influence, with an
other-position null) and the last token's angles between every pair of layer boundaries
(Gromov et al.), with per-window moments (:class:`WindowMoments`) for standard errors;
:func:`layer_statistics` is one :func:`~splice.calib.runner.run` with :class:`LayerIO`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.calib.collectors import Capture, Collector
from splice.errors import SpliceError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


@dataclass
class WindowMoments:
    """Per-window values of a statistic folded in window by window, for its standard error.

    Holds, per entry of ``shape``, the count ``n``, a shift ``k`` (the first window's value) and
    ``Σ (v − k)``, ``Σ (v − k)²`` over windows: shifting keeps the variance exact when the
    values are close to each other (identical windows give exactly 0), and memory stays flat.
    """

    shape: tuple[int, ...]
    n: np.ndarray = field(init=False)
    shift: np.ndarray = field(init=False)
    s1: np.ndarray = field(init=False)
    s2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.n = np.zeros(self.shape)
        self.shift = np.full(self.shape, np.nan)
        self.s1 = np.zeros(self.shape)
        self.s2 = np.zeros(self.shape)

    def add(self, values: Any, index: Any = ...) -> None:
        """Fold in ``values`` ``[B, *shape[index]]``: one value per window for entry ``index``
        (default: every entry)."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape[0] == 0:
            return
        k = np.where(np.isnan(self.shift[index]), v[0], self.shift[index])
        self.shift[index] = k
        d = v - k
        self.n[index] += v.shape[0]
        self.s1[index] += d.sum(0)
        self.s2[index] += (d * d).sum(0)

    def mean(self) -> np.ndarray:
        """``[*shape]``: the mean over windows (NaN where none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.shift + self.s1 / self.n

    def std(self) -> np.ndarray:
        """``[*shape]``: the sample standard deviation over windows (ddof 1; NaN below 2)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (self.s2 - self.s1 * self.s1 / self.n) / (self.n - 1)
        return np.where(self.n >= 2, np.sqrt(np.clip(var, 0, None)), np.nan)

    def stderr(self) -> np.ndarray:
        """``[*shape]``: the standard error of the mean, ``std / √n`` (NaN below 2 windows)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.std() / np.sqrt(self.n)


@dataclass
class LayerStats:
    """Per-layer statistics summed over calibration batches (:class:`LayerIO`).

    ``io_cos[l]`` sums cos(input, output) of layer l over tokens at positions ≥ 1
    (``tokens`` of them); ``io_cos_all[l]`` over all positions (``tokens_all``);
    ``io_cos_other[l]`` over positions ≥ 1 with the output taken at another position (null).
    ``angles[a, b]`` sums, over samples, the angle in radians between the last token's
    residual stream at boundaries a and b (``[L+1, L+1]``; boundary 0 = input of layer 0,
    boundary l+1 = output of layer l, through the final norm for the last layer when
    ``final_norm``); ``angles_other`` the same between a sample and the next one in its batch
    (``pairs_other`` of them). Per window (:class:`WindowMoments`, for standard errors over
    windows): ``io_cos_w`` the window's mean io cosine at positions ≥ 1, ``io_cos_all_w`` at all
    positions, ``angles_w`` its last token's angles. The same values are also kept window by
    window, for paired differences between two blocks or two layers: ``angles_windows``
    (``[B, L+1, L+1]`` per batch: windows × (L+1)² floats, 0.5 MB for 64 windows of a 32-layer
    model) and, per layer, ``io_cos_windows`` / ``io_cos_all_windows`` (``[B]`` per batch).
    """

    num_layers: int
    samples: int
    tokens: int
    tokens_all: int
    io_cos: np.ndarray
    io_cos_all: np.ndarray
    io_cos_other: np.ndarray
    angles: np.ndarray
    angles_other: np.ndarray
    pairs_other: int
    io_cos_w: WindowMoments | None = None
    io_cos_all_w: WindowMoments | None = None
    angles_w: WindowMoments | None = None
    final_norm: bool = False
    angles_windows: list[np.ndarray] = field(default_factory=list)
    io_cos_windows: dict[int, list[np.ndarray]] = field(default_factory=dict)
    io_cos_all_windows: dict[int, list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def zeros(cls, num_layers: int, final_norm: bool = False) -> LayerStats:
        z = np.zeros(num_layers)
        b = np.zeros((num_layers + 1, num_layers + 1))
        return cls(
            num_layers,
            0,
            0,
            0,
            z.copy(),
            z.copy(),
            z.copy(),
            b.copy(),
            b.copy(),
            0,
            WindowMoments((num_layers,)),
            WindowMoments((num_layers,)),
            WindowMoments(b.shape),
            final_norm,
        )

    def io_cosine(self, all_positions: bool = False) -> np.ndarray:
        """``[L]``: mean cosine between each layer's input and output over positions ≥ 1
        (Yi-9B's criterion) or over all positions (ShortGPT's block influence is 1 minus it)."""
        if all_positions:
            return self.io_cos_all / max(self.tokens_all, 1)
        return self.io_cos / max(self.tokens, 1)

    def angular_distance(self) -> np.ndarray:
        """``[L+1, L+1]``: mean over samples of angle / π between boundaries a and b."""
        return self.angles / (math.pi * max(self.samples, 1))

    def io_cosine_windows(self, all_positions: bool = False) -> np.ndarray | None:
        """``[windows, L]``: each window's mean io cosine (positions ≥ 1, or all positions),
        None unless every layer kept as many windows."""
        kept = self.io_cos_all_windows if all_positions else self.io_cos_windows
        cols = [np.concatenate(kept[i]) if kept.get(i) else None for i in range(self.num_layers)]
        if not cols or any(c is None for c in cols) or len({len(c) for c in cols}) != 1:
            return None
        return np.stack(cols, axis=1)

    def angular_distance_windows(self) -> np.ndarray | None:
        """``[windows, L+1, L+1]``: each window's d(a, b) (angle / π), None if none were kept."""
        if not self.angles_windows:
            return None
        return np.concatenate(self.angles_windows) / math.pi

    def angular_distance_se(self) -> np.ndarray:
        """``[L+1, L+1]``: the standard error over windows of :meth:`angular_distance`."""
        assert self.angles_w is not None
        return self.angles_w.stderr() / math.pi

    def io_cosine_se(self, all_positions: bool = False) -> np.ndarray:
        """``[L]``: the standard error over windows of the mean io cosine (positions ≥ 1, or
        all positions: block influence's, whose error it is too)."""
        w = self.io_cos_all_w if all_positions else self.io_cos_w
        assert w is not None
        return w.stderr()

    def angular_distance_other(self) -> np.ndarray | None:
        """``[L+1, L+1]``: the same between different samples (None if never batched ≥ 2)."""
        return self.angles_other / (math.pi * self.pairs_other) if self.pairs_other else None


def _angles(x: torch.Tensor) -> torch.Tensor:
    """``[B, K, H]`` -> ``[B, K, K]`` angles between every pair of the K vectors of each b."""
    import torch

    u = torch.nn.functional.normalize(x.to(torch.float64), dim=-1)
    cos = (u @ u.transpose(1, 2)).clamp(-1, 1)
    return torch.arccos(cos)


def _cross_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, K, H]`` x2 -> ``[K, K]``: angles summed over B between x[b, a] and y[b, c]."""
    import torch

    u = torch.nn.functional.normalize(x.to(torch.float64), dim=-1)
    v = torch.nn.functional.normalize(y.to(torch.float64), dim=-1)
    return torch.arccos((u @ v.transpose(1, 2)).clamp(-1, 1)).sum(0)


@dataclass
class LayerIO(Collector):
    """Input/output cosines and last-token angles of every decoder layer -> :class:`LayerStats`.

    Cosines are float32 per token, summed per batch; angles float64 between the ``[B, L+1, H]``
    last-token states of a batch, kept (float32, on the CPU) until every layer has run on it
    (in sequential mode that is ``[windows, L+1, H]``). Each window's mean cosines and angles
    are also folded into :class:`WindowMoments` (standard errors over windows). Windows must
    be unpadded.

    ``final_norm``: a module path (``model.norm``) the last layer's output is passed through
    before it is compared, as HF's ``hidden_states[-1]`` is and PruneMe / ShortGPT read it;
    None compares the last layer's raw output (before the final norm).
    """

    final_norm: str | None = None
    site: str = field(default="layer", init=False)
    layers: Sequence[int] | None = field(default=None, init=False)

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        self._norm = None
        if self.final_norm is not None:
            try:
                self._norm = model.get_submodule(self.final_norm)
            except AttributeError:
                raise SpliceError(f"LayerIO: the model has no module {self.final_norm!r}") from None
        self.stats = LayerStats.zeros(num_layers, final_norm=self._norm is not None)
        self._last: dict[int, list[Any]] = {}
        self._seq = 0

    def update(self, c: Capture) -> None:
        import torch

        x, y, index = c.x, c.y, c.layer
        if index == 0 and not bool(c.mask.all()):
            raise SpliceError("layer statistics need unpadded windows (no attention mask zeros)")
        stats = self.stats
        if self._norm is not None and index == stats.num_layers - 1:
            y = self._norm(y)  # HF's hidden_states[-1]
        xf, yf = x.float(), y.float()
        cos = torch.nn.functional.cosine_similarity(xf, yf, dim=-1)  # [B, T]
        stats.io_cos_all[index] += float(cos.sum())
        stats.io_cos[index] += float(cos[:, 1:].sum())
        assert stats.io_cos_w is not None and stats.io_cos_all_w is not None
        per_window = cos.double()
        all_w = per_window.mean(1).cpu().numpy()
        stats.io_cos_all_w.add(all_w, index)
        stats.io_cos_all_windows.setdefault(index, []).append(all_w)
        if cos.shape[1] > 1:
            io_w = per_window[:, 1:].mean(1).cpu().numpy()
            stats.io_cos_w.add(io_w, index)
            stats.io_cos_windows.setdefault(index, []).append(io_w)
        t = x.shape[1]
        if t > 2:
            shifted = torch.roll(yf[:, 1:], shifts=(t - 1) // 2, dims=1)
            other = torch.nn.functional.cosine_similarity(xf[:, 1:], shifted, dim=-1)
            stats.io_cos_other[index] += float(other.sum())
        self._seq = t
        last = self._last.setdefault(c.batch, [None] * (stats.num_layers + 1))
        if index == 0:  # copies: a view would keep the whole batch's states alive
            last[0] = x[:, -1].to("cpu", torch.float32, copy=True)
        last[index + 1] = y[:, -1].to("cpu", torch.float32, copy=True)

    def finish_batch(self, batch: int) -> None:
        import torch

        last = torch.stack(self._last.pop(batch), dim=1)  # [B, L+1, H]
        stats = self.stats
        b, t = last.shape[0], self._seq
        stats.samples += b
        stats.tokens += b * (t - 1)
        stats.tokens_all += b * t
        angles = _angles(last)  # [B, L+1, L+1]
        stats.angles += angles.sum(0).numpy()
        assert stats.angles_w is not None
        stats.angles_w.add(angles.numpy())
        stats.angles_windows.append(angles.numpy())
        if b > 1:
            stats.angles_other += _cross_angles(last, torch.roll(last, 1, dims=0)).numpy()
            stats.pairs_other += b

    def result(self) -> LayerStats:
        if self._seq <= 2:
            self.stats.io_cos_other[:] = np.nan
        return self.stats


def layer_statistics(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    layer_prefix: str = "model.layers.{i}.",
    batch_size: int = 8,
    device: str = "cpu",
    show_progress: bool = False,
    final_norm: str | None = None,
) -> LayerStats:
    """:class:`LayerStats` of ``model`` on unpadded windows ``input_ids`` ``[N, T]``
    (:func:`~splice.calib.runner.run` with :class:`LayerIO`); the last position is each window's last token.
    ``final_norm`` (a module path, e.g. ``model.norm``): take the last layer's output through
    it, as HF's ``hidden_states[-1]`` (None: before it)."""
    from splice.calib.runner import run

    (stats,) = run(
        model,
        input_ids,
        [LayerIO(final_norm=final_norm)],
        device=device,
        batch_size=batch_size,
        layer_prefix=layer_prefix,
        show_progress=show_progress,
    )
    return stats
