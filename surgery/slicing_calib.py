"""The calibration of slicing: the token windows (:func:`slice_windows`), the collectors that
read the stream entering each block (:class:`StreamGram` ``[D, D]`` Gram matrices,
:class:`KeptEnergy` the share inside the kept basis, :class:`ChannelEnergy` ``[C]`` per-channel
energies of a hidden-sized module) and :func:`compute_bases`, which runs them on the model
rebuilt as blocks (:mod:`splice.surgery.sliced`) and returns the kept bases ``Q_d`` ``[D, d]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splice.calib import Collector
from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.surgery.calibration import Calibration
from splice.surgery.sliced import as_layers, units
from splice.surgery.slicing_arch import HiddenSized, SliceArch, slice_arch
from splice.surgery.slicing_math import kept_basis

if TYPE_CHECKING:
    import torch

    from splice.calib import Capture


def slice_windows(ckpt: Checkpoint, calibration: Any, calib: Calibration, tc: bool) -> torch.Tensor:
    """The calibration token ids ``[N, T]`` (``tc``: trust remote code for the tokenizer); a
    one-line ``SpliceError`` when they hold fewer tokens than the hidden size ``D``."""
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


def _stream_rows(c: Capture, stream: str, centred: bool = False) -> torch.Tensor:
    """``[n, D]`` float64: the real tokens' stream entering the block (minus each row's mean
    where ``centred``: what a LayerNorm sees), each row scaled to rms 1 (``stream="normed"``)
    or as it is (``"raw"``, SliceGPT's choice)."""
    import torch

    r = c.rows("input")
    r = r.to("cpu" if r.device.type == "mps" else r.device, torch.float64)
    if centred:
        r = r - r.mean(-1, keepdim=True)
    if stream == "raw":
        return r
    return r / r.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)


@dataclass
class StreamGram(Collector):
    """``Σ x̃ᵀx̃`` ``[D, D]`` float64 of the rms-normed (centred: mean-zero) stream entering
    each block (one per block; ``summed``: one for all blocks together)."""

    site: str = "layer"
    summed: bool = False
    stream: str = "normed"
    centred: bool = False

    def start(self, model: Any, num_layers: int) -> None:
        self._sums: dict[int, torch.Tensor] = {}

    def update(self, c: Capture) -> None:
        r = _stream_rows(c, self.stream, self.centred)
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
    """Per block: the fraction of the rms-normed (centred) stream's energy inside
    ``span(basis)`` (``basis`` ``[D, d]`` orthonormal columns)."""

    basis: Any = None
    site: str = "layer"
    stream: str = "normed"
    centred: bool = False

    def start(self, model: Any, num_layers: int) -> None:
        self._kept: dict[int, float] = {}
        self._total: dict[int, float] = {}

    def update(self, c: Capture) -> None:
        r = _stream_rows(c, self.stream, self.centred)
        k = int(c.layer)
        kept = float((r @ self.basis.to(r.device)).pow(2).sum())
        self._kept[k] = self._kept.get(k, 0.0) + kept
        self._total[k] = self._total.get(k, 0.0) + float(r.pow(2).sum())

    def result(self) -> dict[int, float]:
        return {k: self._kept[k] / self._total[k] for k in sorted(self._kept)}


@dataclass
class ChannelEnergy(Collector):
    """Per block: ``Σ h²`` ``[C]`` float64 per input channel of ``site`` (a writer inside the
    block, ``"mods.conv.out_proj"``) over the real tokens."""

    site: str = ""
    layers: Sequence[int] | None = None

    def start(self, model: Any, num_layers: int) -> None:
        self._sums: dict[int, torch.Tensor] = {}

    def update(self, c: Capture) -> None:
        import torch

        r = c.rows("input")
        e = r.to("cpu" if r.device.type == "mps" else r.device, torch.float64).pow(2).sum(0)
        k = int(c.layer)
        self._sums[k] = self._sums[k] + e if k in self._sums else e

    def take(self, key: int) -> torch.Tensor:
        """The channel energies of block ``key``, dropped from the collector."""
        return self._sums.pop(key)

    def result(self) -> dict[int, torch.Tensor]:
        return dict(self._sums)


def compute_bases(
    live: Any,
    ckpt: Checkpoint,
    windows: torch.Tensor,
    calib: Calibration,
    d: int,
    basis: str,
    stream: str = "normed",
    arch: SliceArch | None = None,
    sized: HiddenSized | None = None,
) -> tuple[
    list[torch.Tensor], list[dict[str, Any]], float | None, dict[tuple[int, str], torch.Tensor]
]:
    """The kept bases ``Q_d`` ``[D, d]`` float64 (one per block input, ``nb·L + 1``; shared: the
    same for all), the retained variance of each, (shared) of all together, and the kept
    channels ``[d]`` of each hidden-sized module group. ``live`` is rebuilt in place into the
    sliced model simulated at full width (:mod:`.sliced`), dropped channels zeroed."""
    import torch

    from splice.calib import decoder_layers, run

    spec = ckpt.arch
    arch = arch or slice_arch(ckpt)
    sized = sized or HiddenSized()
    nb = arch.per_layer
    prefix = spec.layer_prefix
    path = prefix.split("{i}")[0].rstrip(".")
    old = decoder_layers(live, prefix)
    n_layers = len(old)
    blocks = units(live, old, arch.layout)
    parent, _, name = path.rpartition(".")
    setattr(live.get_submodule(parent), name, torch.nn.ModuleList(blocks))
    param = next(live.parameters())
    qs: list[torch.Tensor] = []
    retained: list[dict[str, Any]] = []
    total = None
    centred = arch.centred
    kinds = getattr(live.config, "layer_types", None)
    common = dict(
        device=calib.device,
        batch_size=calib.batch_size,
        sequential=True,
        layer_prefix=prefix,
        # each block runs with its layer's attention mask (sliding / full); the head's is unused
        layer_types=[kinds[min(k // nb, n_layers - 1)] for k in range(len(blocks))]
        if kinds
        else None,
        show_progress=calib.show_progress,
    )

    # hidden-sized channels: one collector per writer site, on the blocks holding one
    groups: dict[int, list[tuple[tuple[int, str], str]]] = {}
    sites: dict[str, list[int]] = {}
    for (layer, top), writer in sized.scored.items():
        k = nb * layer + arch.block_of_module(top)
        site = "mods." + spec.parse(writer).kind.rpartition(".")[0]  # "mods.conv.out_proj"
        groups.setdefault(k, []).append(((layer, top), site))
        sites.setdefault(site, []).append(k)
    scorers = {site: ChannelEnergy(site=site, layers=ks) for site, ks in sites.items()}
    channels: dict[tuple[int, str], torch.Tensor] = {}

    def choose(k: int) -> None:  # keep the d channels of most energy through the writer
        for group, site in groups.get(k, []):
            weight = blocks[k].get_submodule(site).weight  # [D, C]
            size = weight.detach().to("cpu", torch.float64).pow(2).sum(0)
            keep = (scorers[site].take(k).cpu() * size).topk(d).indices.sort().values
            drop = torch.ones(size.numel(), dtype=torch.bool)
            drop[keep] = False
            weight[:, drop.to(weight.device)] = 0
            channels[group] = keep

    def label(k: int) -> dict[str, Any]:
        if k == nb * n_layers:
            return {"layer": None, "block": "head"}
        return {"layer": k // nb, "block": blocks[k].label}

    extra = list(scorers.values())
    if basis == "per-layer":
        gram = StreamGram(stream=stream, centred=centred)

        def after(k: int, _: Any) -> None:
            q, kept = kept_basis(gram.take(k), d, centred)
            qs.append(q.cpu())
            retained.append({**label(k), "value": kept})
            blocks[k].proj = q.to(param.device, param.dtype)
            choose(k)

        run(live, windows, [gram, *extra], after_layer=after, **common)
    else:
        gram = StreamGram(summed=True, stream=stream, centred=centred)
        run(live, windows, [gram, *extra], **common)
        q, total = kept_basis(gram.take(0), d, centred)
        with torch.no_grad():
            for k in sorted(groups):
                choose(k)
        proj = q.to(param.device, param.dtype)
        for b in blocks:
            b.proj = proj
        (kept,) = run(live, windows, [KeptEnergy(q, stream=stream, centred=centred)], **common)
        retained = [{**label(k), "value": v} for k, v in kept.items()]
        qs = [q.cpu()] * len(blocks)
    final = spec.final_norm.rpartition(".")[0]
    as_layers(live, blocks, old, path, final)
    return qs, retained, total, channels
