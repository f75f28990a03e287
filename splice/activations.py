"""Run a causal LM on calibration text with pluggable collectors, batch by batch.

:func:`run` hooks modules of the decoder layers (a *site*: the layer itself, its attention or
MLP block, an MoE router, the MLP intermediate) and hands what each hooked module saw on a
batch (:class:`Capture`) to the collectors that asked for it; every collector folds it into
running sums and the hidden states are dropped, so memory stays at one batch whatever the
number of windows. Collectors shipped here:

- :class:`LayerIO` — per-layer input/output cosine (Yi-9B's criterion, ShortGPT's block
  influence, with an other-position null) and the last token's angles between every pair of
  layer boundaries (Gromov et al.), as :class:`LayerStats`;
- :class:`Gram` — ``Σ xᵀx`` in float64 of a site's input or output (SliceGPT's PCA);
- :class:`RouterCounts` — top-k selections and softmax probability mass per expert;
- :class:`NeuronStats` — per-neuron mean ``|h|``, mean ``h²`` and count of the MLP
  intermediate (per expert in an MoE layer);
- :class:`Reservoir` — a seeded uniform sample of (input, output) rows of a site (refits);
- :class:`PooledMean` — the mean over windows of a site's last-real-token (or mean) vector.

``sequential=True`` is SliceGPT's procedure: layer by layer, each layer fed the outputs of the
already modified layers before it (callbacks ``before_layer`` / ``after_layer``).

Calibration text comes from a text file, an lm-eval task (``lm-eval:TASK``) or the zoo
(``zoo``), and is cut into windows of ``seq_len`` tokens (:func:`token_windows`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splice.errors import SpliceError
from splice.progress import progress

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def resolve_device(device: str | None) -> str:
    """``auto``/None -> ``cuda`` when available else ``cpu``; a cuda device must exist.

    ``cpu`` is returned without importing torch, so a verb that only copies files (``splice
    upscale --solar``) never loads it.
    """
    if device == "cpu":
        return device
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SpliceError(f"--device {device}: not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpliceError(f"--device {device}: no CUDA device here (use cpu or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SpliceError(
                f"--device {device}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise SpliceError(f"--device {device}: no MPS device here (use cpu or auto)")
    elif dev.type != "cpu":
        raise SpliceError(f"--device {device}: cannot run here; use cpu, cuda, cuda:N or mps")
    return device


# ---- finite weights (also splice.modeling.load_causal_lm's check) -------------------------------
def check_finite(t: torch.Tensor, label: str, why: str = "analysis needs finite weights") -> None:
    """``SpliceError`` naming ``label`` (and ``why``) if the float tensor ``t`` holds NaN or inf.

    Checked block by block, so no tensor-sized mask is made.
    """
    import torch

    if not t.is_floating_point():
        return
    v = t.detach().reshape(-1)
    step = 1 << 22
    blocks = range(0, v.numel(), step)
    if all(bool(torch.isfinite(v[i : i + step]).all()) for i in blocks):
        return
    nan = sum(int(torch.isnan(v[i : i + step]).sum()) for i in blocks)
    inf = sum(int(torch.isinf(v[i : i + step]).sum()) for i in blocks)
    what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "inf")) if n)
    raise SpliceError(f"{label} has {what} values; {why}")


# ---- calibration text ---------------------------------------------------------------------------
def calibration_text(source: str | os.PathLike[str], *, include_path: str | None = None) -> str:
    """Text of a calibration source: a text file, ``lm-eval:TASK``, or the zoo's corpus: ``zoo``
    (English), ``zoo:both`` (English and Zeta alternately), ``zoo:zeta``."""
    src = str(source)
    if src.startswith("lm-eval:"):
        text = _lm_eval_text(src.removeprefix("lm-eval:"), include_path)
    elif src in ZOO_SOURCES and not Path(src).exists():
        text = _zoo_text(ZOO_SOURCES[src])
    else:
        path = Path(src)
        if not path.is_file():
            raise SpliceError(
                f"{src}: no such calibration file (give a text file, lm-eval:TASK or zoo)"
            )
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise SpliceError(f"{src}: calibration file is not UTF-8 text") from None
    if not text.strip():
        raise SpliceError(f"{src}: calibration text is empty")
    return text


def _lm_eval_text(task: str, include_path: str | None) -> str:
    """Documents of an lm-eval task (its evaluation split), each prompt plus its target."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SpliceError("lm-eval:TASK needs lm-eval (pip install 'splice[eval]')") from None
    try:
        manager = TaskManager(include_path=include_path)
        tasks = manager.load([task])["tasks"]
    except Exception as e:  # lm-eval raises many types for unknown tasks / missing datasets
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpliceError(f"lm-eval task {task!r} cannot be loaded ({first})") from None
    texts = []
    for t in tasks.values():
        for doc in t.eval_docs:
            prompt = t.doc_to_text(doc)
            target = t.doc_to_target(doc)
            if isinstance(target, int) and hasattr(t, "doc_to_choice"):
                choices = t.doc_to_choice(doc)
                target = choices[target] if isinstance(choices, list) else ""
            texts.append(f"{prompt}{t.config.target_delimiter}{target}".strip())
    return "\n\n".join(texts)


#: calibration sources drawn from the zoo's corpus: source name -> language
ZOO_SOURCES = {"zoo": "en", "zoo:en": "en", "zoo:both": "both", "zoo:zeta": "zeta"}


def _zoo_text(language: str) -> str:
    try:
        from splice.zoo import calibration_text as zoo_text
    except ImportError:
        raise SpliceError(
            "--calibration zoo: this build has no zoo corpus (splice.zoo.calibration_text); "
            "give a text file instead"
        ) from None
    return zoo_text(language=language)


def text_tokens(tokenizer: Any, text: str, need: int | None = None) -> list[int]:
    """Token ids of ``text`` (no special tokens), as tokenizing the whole text at once gives.

    With ``need``, only a prefix is tokenized when the text is long: one ending at a blank line
    (a document boundary; else at a line end) at least ``PREFIX_CHARS_PER_TOKEN * need``
    characters in, doubled until it gives ``need`` tokens and ``PREFIX_SLACK`` more, so the
    tokens near the cut (which may differ from the whole text's) are never among the first
    ``need``. Tokenizing pieces one after the other instead (e.g. every 256 lines) adds tokens
    at each piece's start and shifts every window after it.
    """

    def tok(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]

    chars = PREFIX_CHARS_PER_TOKEN * need if need is not None else len(text)
    while chars < len(text):
        cut = text.find("\n\n", chars)
        cut = cut if cut >= 0 else text.find("\n", chars)
        if cut < 0:
            break
        ids = tok(text[:cut])
        if len(ids) >= need + PREFIX_SLACK:  # type: ignore[operator]
            return ids
        chars = 2 * cut
    return tok(text)


#: a prefix of this many characters per token needed is tokenized first (:func:`text_tokens`)
PREFIX_CHARS_PER_TOKEN = 16
#: tokens past the ones needed that a prefix must give before its cut is trusted
PREFIX_SLACK = 64


def token_windows(tokenizer: Any, text: str, seq_len: int, max_samples: int) -> torch.Tensor:
    """``[N, T]`` token ids: consecutive windows of the tokenized text, N ≤ ``max_samples``.

    Each window starts with the tokenizer's BOS (if it has one) followed by ``seq_len - 1``
    text tokens (``seq_len`` when there is no BOS): the windows of the whole text tokenized at
    once (:func:`text_tokens` reads only a long enough prefix, cut at a document boundary). A
    text shorter than one window gives one shorter window.
    """
    import torch

    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    ids = text_tokens(tokenizer, text, body * max_samples)
    if not ids:
        raise SpliceError("calibration text has no tokens for this tokenizer")
    count = min(max_samples, max(1, len(ids) // body))
    width = min(body, len(ids))
    rows = [ids[i * body : i * body + width] for i in range(count)]
    t = torch.tensor(rows, dtype=torch.long)
    if bos is not None:
        t = torch.cat([torch.full((count, 1), bos, dtype=torch.long), t], dim=1)
    if t.shape[1] < 2:
        raise SpliceError("calibration text is too short: fewer than 2 tokens in a window")
    return t


# ---- what a hook sees -----------------------------------------------------------------------------
#: named hook sites of a decoder layer; any other site is a module path inside the layer
#: (``"mlp.up_proj"``), whose first input and first output are captured
SITES: dict[str, str] = {
    "layer": "the decoder layer: x the residual stream entering it [B, T, H], y leaving it",
    "attn": "the attention module: x its normed input [B, T, H], y its output [B, T, H]",
    "mlp": "the MLP (or MoE) block: x its normed input [B, T, H], y its output [B, T, H]",
    "router": "the MoE router: x its input [B*T, H], y the router logits [B*T, E]",
    "mlp_hidden": "the MLP intermediate, input of down_proj [B, T, I]; for an MoE layer, per "
    "expert, the [n, I] intermediate of the n tokens routed to it (input of its w2)",
}

Key = int | tuple[int, int]  # a layer, or (layer, expert)


@dataclass(frozen=True)
class Capture:
    """What one hooked module saw on one batch.

    ``x`` is the module's input and ``y`` its output: ``[B, T, D]``, or ``[B*T, D]`` inside an
    MoE block. ``mask`` (bool, ``x``'s leading shape) is True at real tokens. For
    ``mlp_hidden`` of an MoE layer there is one capture per expert hit in the batch: ``x`` the
    ``[n, I]`` intermediate of the ``n`` real tokens routed to ``expert``, ``y`` the ``[n, H]``
    output of its down projection before weighting, ``weight`` ``[n]`` their routing weights.
    """

    layer: int
    batch: int
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    expert: int | None = None
    weight: torch.Tensor | None = None

    @property
    def key(self) -> Key:
        """``layer``, or ``(layer, expert)`` for an expert's capture."""
        return self.layer if self.expert is None else (self.layer, self.expert)

    def rows(self, part: str = "input") -> torch.Tensor:
        """``[n, D]``: the real tokens' rows of ``x`` (``part="input"``) or ``y``."""
        t = self.x if part == "input" else self.y
        return t[self.mask]


class Collector:
    """A statistic folded in batch by batch from the captures of one hook ``site``.

    Subclasses set ``site`` (a key of :data:`SITES` or a module path inside the layer) and
    ``layers`` (None: every layer), and implement ``update`` and ``result``; ``start`` is called
    once before the first batch, ``finish_batch(b)`` once every layer has run on batch ``b``.
    ``result()`` may be read at any time: in sequential mode ``after_layer`` reads the
    statistics of the layer just run from it.
    """

    site: str = "layer"
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        """Reset; ``num_layers`` is the model's decoder layer count."""

    def update(self, capture: Capture) -> None:
        raise NotImplementedError

    def finish_batch(self, batch: int) -> None:
        """Every hooked layer has seen batch ``batch``."""

    def result(self) -> Any:
        raise NotImplementedError


def _part(part: str, who: str) -> str:
    if part not in ("input", "output"):
        raise SpliceError(f"{who}: part must be 'input' or 'output', got {part!r}")
    return part


def _acc_device(t: torch.Tensor) -> torch.device:
    """Where float64 sums live: the tensor's device, except MPS (no float64) -> CPU."""
    import torch

    return torch.device("cpu") if t.device.type == "mps" else t.device


def _add(sums: dict[Key, torch.Tensor], key: Key, value: torch.Tensor) -> None:
    if key in sums:
        sums[key] += value
    else:
        sums[key] = value.clone()


# ---- collectors -----------------------------------------------------------------------------------
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


@dataclass
class GramSum:
    """``xtx`` ``[D, D]`` float64: ``Σ xᵀx`` over ``tokens`` real tokens."""

    xtx: torch.Tensor
    tokens: int


@dataclass
class Gram(Collector):
    """``Σ xᵀx`` in float64 over real tokens of a site's input (or output), per layer (per
    (layer, expert) at an MoE ``mlp_hidden``); SliceGPT's PCA basis is its eigh. Holds one
    ``[D, D]`` float64 per key, on the run device (CPU for MPS)."""

    site: str = "layer"
    part: str = "input"
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        _part(self.part, "Gram")
        self._sums: dict[Key, torch.Tensor] = {}
        self._tokens: dict[Key, int] = {}

    def update(self, c: Capture) -> None:
        import torch

        r = c.rows(self.part)
        r = r.to(_acc_device(r), torch.float64)
        _add(self._sums, c.key, r.T @ r)
        self._tokens[c.key] = self._tokens.get(c.key, 0) + r.shape[0]

    def result(self) -> dict[Key, GramSum]:
        return {k: GramSum(v.clone(), self._tokens[k]) for k, v in sorted(self._sums.items())}


@dataclass
class RouterStats:
    """Per layer and expert (``[L, E]``; zero rows for layers not hooked): ``counts`` of
    top-k selections, ``mass`` the summed softmax probability, over ``tokens[l]`` real tokens."""

    counts: np.ndarray
    mass: np.ndarray
    tokens: np.ndarray
    top_k: int

    def frequency(self) -> np.ndarray:
        """``[L, E]``: the share of tokens that select each expert (rows sum to top_k)."""
        return self.counts / np.maximum(self.tokens, 1)[:, None]

    def mean_probability(self) -> np.ndarray:
        """``[L, E]``: the mean router probability of each expert (rows sum to 1)."""
        return self.mass / np.maximum(self.tokens, 1)[:, None]


@dataclass
class RouterCounts(Collector):
    """Top-k selections and probability mass per expert from Mixtral-style router logits:
    softmax over the experts in float32, top-k of it (as transformers routes) -> :class:`RouterStats`.
    ``top_k`` defaults to the model's ``num_experts_per_tok``."""

    site: str = field(default="router", init=False)
    top_k: int | None = None
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        k = self.top_k or getattr(model.config, "num_experts_per_tok", None)
        if not isinstance(k, int) or k < 1:
            raise SpliceError(
                "RouterCounts: give top_k (the model config has no num_experts_per_tok)"
            )
        self._k, self._layers = k, num_layers
        self._counts: np.ndarray | None = None
        self._mass = np.zeros(0)
        self._tokens = np.zeros(num_layers, dtype=np.int64)

    def update(self, c: Capture) -> None:
        import torch

        logits = c.rows("output").float()  # [n, E]
        n, experts = logits.shape
        if self._k > experts:
            raise SpliceError(f"RouterCounts: top_k {self._k} > {experts} experts")
        if self._counts is None:
            self._counts = np.zeros((self._layers, experts), dtype=np.int64)
            self._mass = np.zeros((self._layers, experts))
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, self._k, dim=-1).indices
        self._counts[c.layer] += torch.bincount(top.reshape(-1), minlength=experts).cpu().numpy()
        self._mass[c.layer] += probs.double().sum(0).cpu().numpy()
        self._tokens[c.layer] += n

    def result(self) -> RouterStats:
        counts = self._counts if self._counts is not None else np.zeros((self._layers, 0), int)
        mass = self._mass if self._counts is not None else np.zeros((self._layers, 0))
        return RouterStats(counts, mass, self._tokens, self._k)


@dataclass
class NeuronMoments:
    """Per neuron ``[I]`` float64: ``mean_abs`` = mean |h|, ``mean_sq`` = mean h², over
    ``count`` real tokens (for an expert: the tokens routed to it)."""

    mean_abs: torch.Tensor
    mean_sq: torch.Tensor
    count: int


@dataclass
class NeuronStats(Collector):
    """Per-neuron mean |h|, mean h² and token count of a site's input (default the MLP
    intermediate, per expert in MoE layers) -> ``{key: NeuronMoments}``. Holds 2 ``[I]``
    float64 per key."""

    site: str = "mlp_hidden"
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        self._abs: dict[Key, torch.Tensor] = {}
        self._sq: dict[Key, torch.Tensor] = {}
        self._count: dict[Key, int] = {}

    def update(self, c: Capture) -> None:
        import torch

        h = c.rows("input")
        h = h.to(_acc_device(h), torch.float64)
        _add(self._abs, c.key, h.abs().sum(0))
        _add(self._sq, c.key, (h * h).sum(0))
        self._count[c.key] = self._count.get(c.key, 0) + h.shape[0]

    def result(self) -> dict[Key, NeuronMoments]:
        return {
            k: NeuronMoments(self._abs[k] / n, self._sq[k] / n, n)
            for k, n in sorted(self._count.items())
            if n
        }


@dataclass
class Sample:
    """``x`` ``[k, Din]`` and ``y`` ``[k, Dout]``: a uniform sample of k of the ``seen`` rows."""

    x: torch.Tensor
    y: torch.Tensor
    seen: int


@dataclass
class Reservoir(Collector):
    """A seeded uniform sample (Algorithm R) of at most ``size`` (input, output) token rows of a
    site, per key -> ``{key: Sample}``, for least-squares refits. Holds ``size × (Din + Dout)``
    values per key in ``dtype``, on the run device. The draws of each key come from their own
    generator seeded by (``seed``, key), so the sample does not depend on the other hooks."""

    site: str = "mlp"
    size: int = 1024
    seed: int = 0
    layers: Sequence[int] | None = None
    dtype: str = "float32"

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        if self.size < 1:
            raise SpliceError(f"Reservoir: size must be 1 or more, got {self.size}")
        self._x: dict[Key, torch.Tensor] = {}
        self._y: dict[Key, torch.Tensor] = {}
        self._seen: dict[Key, int] = {}
        self._rng: dict[Key, np.random.Generator] = {}

    def update(self, c: Capture) -> None:
        import torch

        from splice.dtypes import to_torch

        x, y = c.rows("input"), c.rows("output")
        m, key = x.shape[0], c.key
        if m == 0:
            return
        if key not in self._x:
            dt = to_torch(self.dtype)
            self._x[key] = torch.zeros((self.size, x.shape[-1]), dtype=dt, device=x.device)
            self._y[key] = torch.zeros((self.size, y.shape[-1]), dtype=dt, device=y.device)
            layer, expert = (key, -1) if isinstance(key, int) else key
            self._rng[key] = np.random.default_rng([self.seed, layer, expert + 1])
        seen = self._seen.get(key, 0)
        pos = seen + np.arange(m)  # 0-based stream index of each row
        slot = pos.copy()
        late = pos >= self.size
        if late.any():  # row p replaces slot j ~ U{0..p} if j < size (later rows win a slot)
            j = self._rng[key].integers(0, pos[late] + 1)
            slot[late] = np.where(j < self.size, j, -1)
        keep = np.flatnonzero(slot >= 0)
        if keep.size:
            rev = keep[::-1]
            _, first = np.unique(slot[rev], return_index=True)
            rows = np.sort(rev[first])  # the last row to claim each slot
            src = torch.as_tensor(rows, device=x.device)
            dst = torch.as_tensor(slot[rows], device=x.device)
            self._x[key][dst] = x[src].to(self._x[key].dtype)
            self._y[key][dst] = y[src].to(self._y[key].dtype)
        self._seen[key] = seen + m

    def result(self) -> dict[Key, Sample]:
        out = {}
        for k in sorted(self._x):
            n = min(self.size, self._seen[k])
            out[k] = Sample(self._x[k][:n].clone(), self._y[k][:n].clone(), self._seen[k])
        return out


@dataclass
class PooledMean(Collector):
    """Mean over windows of one vector per window of a ``[B, T, D]`` site: its last real token
    (``pool="last"``) or the mean over its real tokens (``"mean"``) -> ``{layer: [D] float64}``.
    Each window's vector is formed in the model dtype, the sum over windows in float64."""

    site: str = "layer"
    part: str = "input"
    pool: str = "last"
    layers: Sequence[int] | None = None

    def start(self, model: PreTrainedModel, num_layers: int) -> None:
        _part(self.part, "PooledMean")
        if self.pool not in ("last", "mean"):
            raise SpliceError(f"PooledMean: pool must be 'last' or 'mean', got {self.pool!r}")
        self._sums: dict[Key, torch.Tensor] = {}
        self._count: dict[Key, int] = {}

    def update(self, c: Capture) -> None:
        import torch

        t = c.x if self.part == "input" else c.y
        if t.dim() != 3 or c.mask.dim() != 2:
            raise SpliceError(
                f"PooledMean: site {self.site!r} gives {list(t.shape)}, not [B, T, D] windows"
            )
        m = c.mask
        if self.pool == "last":
            last = m.shape[1] - 1 - m.flip(1).int().argmax(1)  # each window's last real token
            v = t[torch.arange(t.shape[0], device=t.device), last]
        else:
            w = m[..., None].to(t.dtype)
            v = (t * w).sum(1) / w.sum(1)
        _add(self._sums, c.key, v.to(_acc_device(v), torch.float64).sum(0))
        self._count[c.key] = self._count.get(c.key, 0) + t.shape[0]

    def result(self) -> dict[Key, torch.Tensor]:
        return {k: s / self._count[k] for k, s in sorted(self._sums.items())}


# ---- the runner -----------------------------------------------------------------------------------
def decoder_layers(model: PreTrainedModel, layer_prefix: str) -> Any:
    """The ``ModuleList`` of decoder layers, found from the spec's ``model.layers.{i}.``."""
    path = layer_prefix.split("{i}")[0].rstrip(".")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SpliceError(f"model has no module {path!r} holding its layers") from None


class _Stop(Exception):
    """Raised inside a forward pass to end it (after the last hooked layer)."""


def _child(module: Any, names: Sequence[str]) -> Any:
    for n in names:
        sub = getattr(module, n, None)
        if sub is not None and hasattr(sub, "register_forward_hook"):
            return sub
    return None


def _site_module(layer: Any, site: str, index: int) -> tuple[Any, str]:
    """``(module, kind)`` to hook for ``site`` in decoder layer ``index``; kind ``experts``
    means a packed MoE experts module whose intermediates are computed from its input."""
    import torch

    if site == "layer":
        return layer, "plain"
    if site == "attn":
        attn = _child(layer, ("self_attn", "attn", "self_attention"))
        if attn is None:
            raise SpliceError(f"layer {index} has no attention module (self_attn)")
        return attn, "plain"
    mlp = _child(layer, ("mlp", "block_sparse_moe", "feed_forward"))
    if site == "mlp":
        if mlp is None:
            raise SpliceError(f"layer {index} has no MLP module (mlp)")
        return mlp, "plain"
    if site == "router":
        gate = _child(mlp, ("gate", "router")) if mlp is not None else None
        if gate is None:
            raise SpliceError(f"layer {index} has no MoE router (mlp.gate): not an MoE layer")
        return gate, "plain"
    if site == "mlp_hidden":
        down = _child(mlp, ("down_proj", "w2")) if mlp is not None else None
        if down is not None:
            return down, "plain"
        experts = getattr(mlp, "experts", None) if mlp is not None else None
        packed = all(
            isinstance(getattr(experts, n, None), torch.Tensor) and getattr(experts, n).dim() == 3
            for n in ("gate_up_proj", "down_proj")
        )
        if not packed:
            raise SpliceError(f"layer {index}: no MLP down_proj or packed experts to read")
        plain = (
            getattr(experts, "has_gate", True)
            and getattr(experts, "is_concatenated", True)
            and not getattr(experts, "is_transposed", False)
            and not getattr(experts, "has_bias", False)
            and not getattr(experts, "has_post_expert_norm", False)
        )
        if not plain:
            raise SpliceError(
                f"layer {index}: experts layout not supported for mlp_hidden (only "
                "concatenated [E, 2I, H] gate_up_proj without bias or transposition)"
            )
        return experts, "experts"
    try:
        return layer.get_submodule(site), "plain"
    except AttributeError:
        known = ", ".join(SITES)
        raise SpliceError(
            f"layer {index} has no module {site!r} (sites: {known}, or a module path)"
        ) from None


@dataclass
class _State:
    """The batch being run, shared by the hooks."""

    batch: int = 0
    mask: Any = None  # [B, T] bool on the device
    active: bool = True

    def mask_for(self, x: torch.Tensor, where: str) -> torch.Tensor:
        m = self.mask
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return m
        if x.dim() >= 1 and x.shape[0] == m.numel():
            return m.reshape(-1)
        raise SpliceError(
            f"{where}: input {list(x.shape)} does not line up with the batch's tokens "
            f"{list(m.shape)}"
        )


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    import torch

    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _expert_captures(
    experts: Any, args: tuple, kwargs: dict, layer: int, state: _State
) -> list[Capture]:
    """Per expert hit: the intermediate ``[n, I]`` and down projection ``[n, H]`` of the real
    tokens routed to it, computed from the experts module's own weights."""
    import torch

    names = ("hidden_states", "top_k_index", "top_k_weights")
    x, index, weights = (*args, *(kwargs[n] for n in names[len(args) :]))[:3]
    real = state.mask_for(x, f"layer {layer} experts")
    out = []
    for e in range(experts.gate_up_proj.shape[0]):
        rows, pos = ((index == e) & real[:, None]).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        up = torch.nn.functional.linear(x[rows], experts.gate_up_proj[e])
        if hasattr(experts, "_apply_gate"):
            h = experts._apply_gate(up)
        else:
            gate, up = up.chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
        y = torch.nn.functional.linear(h, experts.down_proj[e])
        ones = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        out.append(Capture(layer, state.batch, h, y, ones, e, weights[rows, pos]))
    return out


def _attach(layers: Any, collectors: Sequence[Collector], state: _State) -> list[Any]:
    """One forward hook per hooked (layer, module), feeding its collectors."""
    groups: dict[tuple[int, str], list[Collector]] = {}
    for c in collectors:
        for i in _layers_of(c, len(layers)):
            groups.setdefault((i, c.site), []).append(c)
    handles = []
    for (i, site), cs in groups.items():
        module, kind = _site_module(layers[i], site, i)

        def hook(
            module: Any, args: tuple, kwargs: dict, output: Any, i=i, site=site, cs=cs, kind=kind
        ) -> None:
            if not state.active:
                return
            if kind == "experts":
                caps = _expert_captures(module, args, kwargs, i, state)
            else:
                x = _first_tensor(args, kwargs)
                y = output[0] if isinstance(output, (tuple, list)) else output
                caps = [Capture(i, state.batch, x, y, state.mask_for(x, f"layer {i} {site}"))]
            for cap in caps:
                for c in cs:
                    c.update(cap)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles


def _layers_of(c: Collector, n_layers: int) -> list[int]:
    if c.layers is None:
        return list(range(n_layers))
    out = [int(i) for i in c.layers]
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise SpliceError(
            f"{type(c).__name__}: layer {bad[0]} is out of range (the model has {n_layers} layers)"
        )
    return out


def _check_windows(windows: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    import torch

    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        raise SpliceError("windows must be an [N, T] tensor of token ids")
    if windows.shape[0] < 1 or windows.shape[1] < 1:
        raise SpliceError(f"windows {list(windows.shape)} hold no tokens")
    if mask is None:
        return windows, None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(windows.shape):
        raise SpliceError(
            f"attention_mask must be a tensor of the windows' shape {list(windows.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise SpliceError("attention_mask must hold 0 and 1 only")
    if not bool(mask.bool().any(1).all()):
        raise SpliceError("attention_mask: a window has no real token")
    return windows, mask


@dataclass
class _Batch:
    """Token ids ``[B, T]`` of one batch and its attention mask (None: no padding)."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    device: str

    def real(self) -> torch.Tensor:
        """``[B, T]`` bool on the device: True at real tokens."""
        import torch

        if self.mask is None:
            return torch.ones(self.ids.shape, dtype=torch.bool, device=self.device)
        return self.mask.to(self.device).bool()

    def forward(self, model: Any) -> Any:
        import torch

        mask = None if self.mask is None else self.mask.to(self.device, torch.long)
        return model(input_ids=self.ids.to(self.device), attention_mask=mask, use_cache=False)


def _check_device(model: Any, device: str) -> None:
    """``SpliceError`` unless the model's weights are on ``device``."""
    import torch

    try:
        want = torch.device(device)
    except (RuntimeError, ValueError):
        raise SpliceError(f"device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    param = next(iter(model.parameters()), None)
    have = param.device if param is not None else want
    if have.type != want.type or (want.index is not None and have.index != want.index):
        raise SpliceError(f"the model is on {have}, not on the run's device {device}; move it")


def _editing() -> Any:
    """For callbacks: no autograd, but not inference mode (so edited weights stay ordinary)."""
    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def run(
    model: PreTrainedModel,
    windows: torch.Tensor,
    collectors: Sequence[Collector],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    sequential: bool = False,
    before_layer: Callable[[int], None] | None = None,
    after_layer: Callable[[int, Sequence[Collector]], None] | None = None,
    layer_prefix: str = "model.layers.{i}.",
    show_progress: bool = False,
) -> list[Any]:
    """Run ``model`` (already on ``device``) on ``windows`` ``[N, T]`` in batches, feeding every
    collector; returns ``[c.result() for c in collectors]``.

    ``attention_mask`` ``[N, T]`` (1 = real token) is passed to the model when given, and
    collectors see only real tokens. A forward pass ends after the last hooked layer.

    ``sequential=True`` runs layer by layer: the inputs of layer 0 for all windows are kept on
    the device in the model dtype (``N × T × hidden`` values, plus per batch what the model
    hands its layers: rotary tables ``[B, T, head_dim]`` and, with padding, a ``[B, 1, T, T]``
    mask); for each layer i, ``before_layer(i)``, then layer i runs on every batch with its
    hooks on (its collectors see the inputs made by the layers before it as they are now),
    then ``after_layer(i, collectors)`` may modify layer i, and the stored inputs are replaced
    by layer i's outputs recomputed with the modified layer (without a callback: the outputs
    of the pass that fed the collectors). Callbacks run under ``no_grad``, outside inference
    mode. Models whose layers get different attention masks (``layer_types`` mixing sliding and
    full attention) are refused in sequential mode.
    """
    import torch

    windows, attention_mask = _check_windows(windows, attention_mask)
    if batch_size < 1:
        raise SpliceError(f"batch_size must be 1 or more, got {batch_size}")
    if not collectors:
        raise SpliceError("run needs at least one collector")
    if (before_layer or after_layer) and not sequential:
        raise SpliceError("before_layer / after_layer need sequential=True")
    _check_device(model, device)
    layers = decoder_layers(model, layer_prefix)
    n_layers = len(layers)
    needed = sorted({i for c in collectors for i in _layers_of(c, n_layers)})
    for c in collectors:
        c.start(model, n_layers)
    masks = torch.split(attention_mask, batch_size) if attention_mask is not None else None
    batches = [
        _Batch(ids, masks[b] if masks is not None else None, device)
        for b, ids in enumerate(torch.split(windows, batch_size))
    ]
    state = _State()
    handles = _attach(layers, collectors, state)
    try:
        with torch.inference_mode():
            if sequential:
                last = n_layers - 1 if (before_layer or after_layer) else needed[-1]
                _run_sequential(
                    model,
                    layers,
                    batches,
                    collectors,
                    state,
                    last=last,
                    before_layer=before_layer,
                    after_layer=after_layer,
                    show_progress=show_progress,
                )
            else:
                _run_batches(model, layers[needed[-1]], batches, collectors, state, show_progress)
    finally:
        for h in handles:
            h.remove()
    return [c.result() for c in collectors]


def _run_batches(
    model: Any,
    last_layer: Any,
    batches: list[_Batch],
    collectors: Sequence[Collector],
    state: _State,
    show_progress: bool,
) -> None:
    def stop(*_: Any) -> None:
        raise _Stop

    handle = last_layer.register_forward_hook(stop)  # after the collectors' hooks on it
    try:
        for b, batch in enumerate(progress(batches, "calibration", enabled=show_progress)):
            state.batch, state.mask = b, batch.real()
            with contextlib.suppress(_Stop):
                batch.forward(model)
            for c in collectors:
                c.finish_batch(b)
    finally:
        handle.remove()


def _run_sequential(
    model: Any,
    layers: Any,
    batches: list[_Batch],
    collectors: Sequence[Collector],
    state: _State,
    *,
    last: int,
    before_layer: Callable[[int], None] | None,
    after_layer: Callable[[int, Sequence[Collector]], None] | None,
    show_progress: bool,
) -> None:
    kinds = getattr(model.config, "layer_types", None)
    if kinds and len(set(kinds)) > 1:
        raise SpliceError(
            f"sequential mode: this model's layers get different attention masks "
            f"(layer_types {sorted(set(kinds))}); not supported"
        )

    def catch(module: Any, args: tuple, kwargs: dict) -> None:
        raise _Stop(args, kwargs)

    inputs: list[torch.Tensor] = []  # [B, T, H] per batch, model dtype, on the device
    calls: list[tuple[tuple, dict]] = []  # the rest of what the model hands its layers
    state.active = False
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                batch.forward(model)
            except _Stop as s:
                args, kwargs = s.args
                kwargs = dict(kwargs)
                h = args[0] if args else kwargs.pop("hidden_states")
                inputs.append(h)
                calls.append((tuple(args[1:]), kwargs))
            else:
                raise RuntimeError("layer 0 was never called")
    finally:
        handle.remove()

    def forward(i: int, b: int) -> torch.Tensor:
        args, kwargs = calls[b]
        out = layers[i](inputs[b], *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    for i in progress(range(last + 1), "layers", enabled=show_progress):
        if before_layer is not None:
            with _editing():
                before_layer(i)
        state.active = True
        for b in range(len(batches)):
            state.batch, state.mask = b, batches[b].real()
            out = forward(i, b)
            if after_layer is None:
                inputs[b] = out
        state.active = False
        if after_layer is not None:
            with _editing():
                after_layer(i, collectors)
            for b in range(len(batches)):
                inputs[b] = forward(i, b)
    for b in range(len(batches)):
        for c in collectors:
            c.finish_batch(b)


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
    (:func:`run` with :class:`LayerIO`); the last position is each window's last token.
    ``final_norm`` (a module path, e.g. ``model.norm``): take the last layer's output through
    it, as HF's ``hidden_states[-1]`` (None: before it)."""
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
