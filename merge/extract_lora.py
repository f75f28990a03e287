"""LoRA extraction: what a fine-tune changed, as a PEFT LoRA adapter over its base.

``extract_lora(finetune, base, out, rank=R)`` streams the two checkpoints one weight at a time
(:meth:`splice.checkpoint.Checkpoint.load`) and writes a folder that
``peft.PeftModel.from_pretrained(base_model, out)`` loads: ``adapter_config.json``,
``adapter_model.safetensors`` and a card. The modules are those of the model transformers builds
from the fine-tune's config (on the meta device: names and types, no weights). Per module:

- a ``Linear``: ``Δ = W_finetune − W_base``, truncated SVD ``Δ ≈ U_k·S_k·V_kᵀ``, written as
  ``lora_B = U_k·√S_k`` ``[out, k]`` and ``lora_A = √S_k·V_kᵀ`` ``[k, in]`` (without
  ``distribute_scale``: ``lora_B = U_k``, ``lora_A = S_k·V_kᵀ``, as mergekit). ``k`` is ``rank``,
  or fewer where only that many singular values exceed ``sv_epsilon`` (an absolute threshold,
  as mergekit's ``--sv-epsilon``); ranks other than the largest go to PEFT's ``rank_pattern``
  and ``alpha_pattern`` with ``lora_alpha = r``, so every module's scale is 1. A module whose
  delta is zero gets no adapter. Changed biases of these modules set PEFT's ``lora_bias`` and
  are written as ``lora_B.bias``.
- the input embedding and the output head: if changed, saved whole (``modules_to_save``), or,
  with ``embed_lora``, low-rank too (``lora_embedding_A`` ``[k, vocab]`` /
  ``lora_embedding_B`` ``[hidden, k]`` for the embedding). With tied embeddings the head gets the
  embedding's change as well (the adapter unties them).
- anything else that changed (norms, convolutions, packed experts): saved whole, or left out
  with ``skip_undecomposable``. ``save_modules`` (full names, or a last name part such as
  ``lm_head``) are always saved whole; ``include`` / ``exclude`` regexes (``re.search`` on the
  module name) choose the modules considered at all.

The SVD runs in float64 for matrices of at most :data:`FLOAT64_MAX_NUMEL` elements, else in
float32; above :data:`RANDOMIZED_MIN_SIDE` rows and columns, where ``k`` is small beside them,
it is randomized (``torch.svd_lowrank``, :data:`POWER_ITERATIONS` power iterations). Either way
the written factors are an orthogonal projection of ``Δ``, so the report's retained energy
``Σσ_i² / ‖Δ‖_F²`` (i < k) is exact for them and ``‖Δ − B·A‖_F / ‖Δ‖_F = √(1 − energy)``
is the approximation error: for a randomized SVD it includes what the sketch missed.

Differences from mergekit-extract-lora: unchanged modules are left out (mergekit writes zero
adapters for them and saves every norm and both embeddings whole), a module whose rank falls
to 0 under ``sv_epsilon`` is left out (mergekit writes ``rank_pattern`` 0, which PEFT refuses),
changed biases are loaded by PEFT (mergekit writes ``lora_B.bias`` without ``lora_bias``, which
PEFT drops), and ``target_modules`` / ``modules_to_save`` name exactly the modules written.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint, open_checkpoint
from splice.errors import SpliceError
from splice.limits import check_number
from splice.progress import progress
from splice.st_format import encode_header, pwrite_all, show
from splice.target import claim_output, commit, os_error, staging_dir
from splice.text import plural

if TYPE_CHECKING:
    import torch

__all__ = [
    "ExtractReport",
    "LowRank",
    "ModuleResult",
    "extract_lora",
    "lora_factors",
    "low_rank",
]

#: matrices of at most this many elements are decomposed in float64
FLOAT64_MAX_NUMEL = 1 << 20
#: matrices with both sides at least this long, and a rank (plus oversampling) at most a
#: quarter of the shorter side, are decomposed by randomized SVD under ``svd="auto"``
RANDOMIZED_MIN_SIDE = 1024
#: power iterations of the randomized SVD (Halko et al. advise 1-2 for slowly decaying spectra;
#: fine-tune deltas decay slowly, and the iterations cost little beside reading the weights)
POWER_ITERATIONS = 4
SVD_METHODS = ("auto", "exact", "randomized")
#: the files an adapter folder holds (what ``overwrite`` may replace)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: errno values of a failed write that mean "the output cannot be written here", not a bug
_OUTPUT_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


# ---- the decomposition: pure tensor functions -------------------------------------------------
@dataclass
class LowRank:
    """A truncated SVD ``Δ ≈ u·diag(s)·vᵀ`` of one delta ``[m, n]``: ``u`` ``[m, k]``, ``s``
    ``[k]``, ``v`` ``[n, k]`` (float32 or float64), with ``energy`` the share of ``‖Δ‖_F²``
    kept (1.0 for a zero delta, k = 0), ``norm`` = ``‖Δ‖_F`` and ``method`` the SVD used."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    energy: float
    norm: float
    method: str

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def error(self) -> float:
        """``‖Δ − u·diag(s)·vᵀ‖_F / ‖Δ‖_F``."""
        return math.sqrt(max(0.0, 1.0 - self.energy))


def low_rank(
    delta: torch.Tensor, rank: int, *, sv_epsilon: float = 0.0, method: str = "auto"
) -> LowRank:
    """The best rank-``rank`` approximation of ``delta`` ``[m, n]`` (fewer where only that many
    singular values exceed ``sv_epsilon``; 0 for a zero delta). ``method``: ``exact``
    (``torch.linalg.svd``), ``randomized`` (``torch.svd_lowrank``) or ``auto`` (see the module
    docstring). The SVD runs on ``delta``'s device."""
    import torch

    m, n = delta.shape
    side = min(m, n)
    k = min(rank, side)
    oversample = max(16, k // 2)
    if method == "auto":
        big = side >= RANDOMIZED_MIN_SIDE and 4 * (k + oversample) <= side
        method = "randomized" if big else "exact"
    work = delta.to(torch.float64 if delta.numel() <= FLOAT64_MAX_NUMEL else torch.float32)
    total = float(torch.linalg.vector_norm(work)) ** 2
    if total == 0.0:
        empty = work.new_zeros(0)
        return LowRank(work.new_zeros(m, 0), empty, work.new_zeros(n, 0), 1.0, 0.0, method)
    if method == "randomized":
        u, s, v = torch.svd_lowrank(work, q=min(side, k + oversample), niter=POWER_ITERATIONS)
    else:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        v = vh.mH
    keep = int((s[:k] > sv_epsilon).sum())  # s is sorted, largest first
    u, s, v = u[:, :keep], s[:keep], v[:, :keep]
    kept = float(s.double().square().sum())
    label = f"{method} {str(work.dtype).removeprefix('torch.')}"
    return LowRank(u, s, v, min(1.0, kept / total), math.sqrt(total), label)


def lora_factors(
    lr: LowRank, *, distribute_scale: bool = True, embedding: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of a :class:`LowRank` with ``lora_B @ lora_A`` = the approximation:
    ``A`` ``[k, n]``, ``B`` ``[m, k]``; for an embedding (``embedding``: PEFT's
    ``lora_embedding_A`` ``[k, vocab]`` and ``lora_embedding_B`` ``[hidden, k]``, whose product
    is the transposed delta) the roles of ``u`` and ``v`` swap. ``distribute_scale``: ``√S`` on
    both sides, else ``S`` on ``A`` (mergekit's two choices)."""
    u, v = (lr.v, lr.u) if embedding else (lr.u, lr.v)
    if distribute_scale:
        root = lr.s.sqrt()
        return (v * root).mT, u * root
    return (v * lr.s).mT, u


# ---- the report -------------------------------------------------------------------------------
@dataclass
class ModuleResult:
    """One module of the fine-tune: ``action`` is ``lora``, ``lora-embedding``, ``saved``
    (``modules_to_save``), ``unchanged``, ``excluded`` (by ``include`` / ``exclude``) or
    ``skipped`` (changed, not decomposable, ``skip_undecomposable``). ``rank``, ``energy``
    (share of ``‖Δ‖_F²`` kept) and ``svd`` are those of a LoRA; ``norm`` is ``‖Δ‖_F`` of its
    weight (None where not read)."""

    module: str
    action: str
    shape: list[int]
    rank: int | None = None
    energy: float | None = None
    norm: float | None = None
    svd: str | None = None

    @property
    def error(self) -> float | None:
        """``‖Δ − B·A‖_F / ‖Δ‖_F`` of a LoRA."""
        return None if self.energy is None else math.sqrt(max(0.0, 1.0 - self.energy))


@dataclass
class ExtractReport:
    """What :func:`extract_lora` wrote: one :class:`ModuleResult` per module and the adapter's
    ``config`` (``adapter_config.json``)."""

    finetune: str
    base: str
    out: str
    rank: int
    sv_epsilon: float
    modules: list[ModuleResult] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def by_action(self, *actions: str) -> list[ModuleResult]:
        return [m for m in self.modules if m.action in actions]

    @property
    def energy(self) -> float | None:
        """Retained energy over every LoRA module together (``Σ kept / Σ ‖Δ‖²``)."""
        lora = [m for m in self.by_action("lora", "lora-embedding") if m.norm]
        total = sum(m.norm**2 for m in lora)  # type: ignore[operator]
        if not total:
            return None
        return sum(m.energy * m.norm**2 for m in lora) / total  # type: ignore[operator]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for m, d in zip(self.modules, out["modules"], strict=True):
            d["error"] = m.error
        out["energy"] = self.energy
        return out

    def summary(self) -> str:
        """A table of the modules written (and of changed ones left out), then totals."""
        lines = [f"{'module':<48} {'action':<15} {'shape':<14} {'rank':>5} {'energy':>8}  svd"]
        for m in self.modules:
            if m.action in ("unchanged", "excluded"):
                continue
            rank = "" if m.rank is None else str(m.rank)
            energy = "" if m.energy is None else f"{100 * m.energy:.2f}%"
            lines.append(
                f"{m.module:<48} {m.action:<15} {m.shape!s:<14} {rank:>5} {energy:>8}  "
                f"{m.svd or ''}"
            )
        lora = self.by_action("lora", "lora-embedding")
        saved = self.by_action("saved")
        counts = [
            plural(len(lora), "LoRA module"),
            f"{len(saved)} saved whole",
            f"{len(self.by_action('unchanged'))} unchanged",
        ]
        for action in ("excluded", "skipped"):
            if self.by_action(action):
                counts.append(f"{len(self.by_action(action))} {action}")
        lines.append(", ".join(counts) + f"; r = {self.config.get('r')}")
        if self.energy is not None:
            lines.append(f"retained energy of the LoRA modules: {100 * self.energy:.2f}%")
        return "\n".join(lines)


# ---- planning: what each module of the fine-tune becomes --------------------------------------
@dataclass
class _Item:
    module: str
    #: "lora" (a Linear), "embedding", "save" (whole: --save-module), "whole" (embedding or
    #: head, whole if changed), "other" (whole if changed, unless skip_undecomposable),
    #: "foreign" (no such module in transformers' model: refused if changed), "excluded"
    action: str
    tensors: list[str]  # checkpoint names, the weight first
    shapes: list[tuple[int, ...]]  # theirs, in the fine-tune
    head: str | None = None  # tied embeddings: the head module, given this module's change
    head_lora: bool = False  # with embed_lora: the tied head is a Linear, low-rank too

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[0]


def _named(module: str, names: Sequence[str]) -> bool:
    """Whether ``names`` (``--save-module``) name ``module``: in full or by its last part."""
    return module in names or module.rpartition(".")[2] in names


def _selected(module: str, include: Sequence[re.Pattern], exclude: Sequence[re.Pattern]) -> bool:
    if include and not any(p.search(module) for p in include):
        return False
    return not any(p.search(module) for p in exclude)


def _regexes(patterns: Iterable[str], option: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise SpliceError(f"{option} {p!r}: not a regular expression ({e})") from None
    return out


def _stored(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, as the files hold them (packed experts unsplit), no MTP layers."""
    return {n: i.shape for n, i in ckpt.stored_tensors.items() if n not in ckpt.mtp}


def _check_pair(ft: Checkpoint, base: Checkpoint) -> set[str]:
    """``SpliceError`` unless the two checkpoints have one architecture and the same tensors
    of the same shapes; returns the tensors whose shapes differ (the vocabulary: embedding and
    head only)."""
    a, b = ft.config.get("model_type"), base.config.get("model_type")
    if a != b:
        raise SpliceError(
            f"the fine-tune {ft.path} is {a!r} and the base {base.path} is {b!r}: a LoRA needs "
            "one architecture"
        )
    fs, bs = _stored(ft), _stored(base)
    for mine, other, who, where in ((fs, bs, "fine-tune", "base"), (bs, fs, "base", "fine-tune")):
        extra = [n for n in mine if n not in other]
        if extra:
            raise SpliceError(
                f"the {who} has {plural(len(extra), 'tensor')} that the {where} lacks, e.g. "
                f"{show(extra[0])}: not a fine-tune of this base"
            )
    vocab = {ft.arch.embed, ft.arch.lm_head}
    differ = {n for n in fs if fs[n] != bs[n]}
    odd = sorted(differ - vocab)
    if odd:
        raise SpliceError(
            f"{odd[0]} is {list(fs[odd[0]])} in the fine-tune and {list(bs[odd[0]])} in the "
            "base: not a fine-tune of this base"
        )
    return differ


def _transformers_model(ckpt: Checkpoint) -> Any:
    """transformers' model of ``ckpt``'s config on the meta device (module names and types)."""
    from transformers import CONFIG_MAPPING

    from splice.loadcheck import _config, _meta_model, _model_class, _quiet

    config = ckpt.config
    model_type = config.get("model_type")
    if config.get("auto_map") or model_type not in CONFIG_MAPPING:
        raise SpliceError(
            f"{ckpt.path}: transformers does not know model type {model_type!r}, and a PEFT "
            "adapter names the modules of transformers' model"
        )
    with _quiet():
        cfg = _config(config)
        return _meta_model(
            _model_class(config, cfg), json.dumps(config, sort_keys=True, default=str)
        )


def _plan(
    ft: Checkpoint,
    model: Any,
    *,
    embed_lora: bool,
    vocab_changed: bool,
    save_modules: Sequence[str],
    include: Sequence[re.Pattern],
    exclude: Sequence[re.Pattern],
) -> list[_Item]:
    """One :class:`_Item` per module holding tensors of ``ft``, in storage order."""
    from torch import nn

    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    emb_in = names.get(id(model.get_input_embeddings()))
    head_module = model.get_output_embeddings()
    emb_out = names.get(id(head_module)) if head_module is not None else None
    stored = _stored(ft)
    grouped: dict[str, list[str]] = {}
    for name in stored:
        grouped.setdefault(name.rpartition(".")[0], []).append(name)
    tied_head = emb_out if emb_out and f"{emb_out}.weight" not in stored and ft.tied else None
    items = []
    for module, tensors in grouped.items():
        tensors.sort(key=lambda n: not n.endswith(".weight"))
        mod = modules.get(module)
        owned = dict(mod.named_parameters(recurse=False)) if mod is not None else {}
        owned.update(dict(mod.named_buffers(recurse=False)) if mod is not None else {})
        shape = stored[tensors[0]]
        shapes = [stored[n] for n in tensors]
        if mod is None or any(n.rpartition(".")[2] not in owned for n in tensors):
            action = "foreign"
        elif _named(module, save_modules):
            action = "save"
        elif not _selected(module, include, exclude):
            action = "excluded"
        elif module in (emb_in, emb_out):
            lora = embed_lora and not vocab_changed and tensors == [f"{module}.weight"]
            if lora and module == emb_in and isinstance(mod, nn.Embedding):
                action = "embedding"
            elif lora and isinstance(mod, nn.Linear):
                action = "lora"
            else:
                action = "whole"
        elif isinstance(mod, nn.Linear) and len(shape) == 2 and tensors[0].endswith(".weight"):
            action = "lora"
        else:
            action = "other"
        item = _Item(module, action, tensors, shapes)
        if module == emb_in and tied_head and _named(tied_head, save_modules):
            item.action = action = "save"  # the head is the embedding: both are saved
        if module == emb_in and tied_head and action in ("embedding", "save", "whole"):
            item.head = tied_head
            item.head_lora = action == "embedding" and isinstance(modules[tied_head], nn.Linear)
            if action == "embedding" and not item.head_lora:
                item.action = "whole"
        items.append(item)
    return items


def _bound(items: list[_Item], rank: int, lora_bias: bool, dtype: str) -> int:
    """An upper bound on the header of the adapter file (every candidate tensor written at full
    rank): its data starts there, and the header written last is padded to it."""
    entries: list[tuple[str, tuple[int, ...], str]] = []
    for it in items:
        p = PREFIX + it.module
        if it.action == "lora":
            m, n = it.shape
            k = min(rank, m, n)
            entries += [
                (f"{p}.lora_A.weight", (k, n), dtype),
                (f"{p}.lora_B.weight", (m, k), dtype),
            ]
            if lora_bias:
                entries.append((f"{p}.lora_B.bias", (m,), dtype))
        elif it.action == "embedding":
            v, h = it.shape
            k = min(rank, v, h)
            entries += [
                (f"{p}.lora_embedding_A", (k, v), dtype),
                (f"{p}.lora_embedding_B", (h, k), dtype),
            ]
        elif it.action in ("save", "whole", "other", "foreign"):
            entries += [(PREFIX + n, s, dtype) for n, s in zip(it.tensors, it.shapes, strict=True)]
        if it.head:
            q = PREFIX + it.head
            v, h = it.shape
            k = min(rank, v, h)
            entries += [
                (f"{q}.lora_A.weight", (k, h), dtype),
                (f"{q}.lora_B.weight", (v, k), dtype),
                (f"{q}.weight", (v, h), dtype),
            ]
    header, _ = encode_header(entries, {"format": "pt"})
    return len(header)


def _adapter_reason(folder: Path) -> str | None:
    """Why ``overwrite`` may not replace ``folder``: None for an empty or an adapter folder."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        return f"cannot list it ({e.strerror})"
    if names and "adapter_config.json" not in names:
        return "it is not an adapter folder (no adapter_config.json)"
    other = [n for n in names if n not in ADAPTER_FILES]
    if other:
        return f"it holds {other[0]!r}, which is not part of an adapter"
    return None


def _compact_targets(targets: list[str], model: Any) -> list[str]:
    """PEFT ``target_modules``: a last name part (``q_proj``) where every module of the model
    with that name is targeted, else the full names."""
    by_leaf: dict[str, list[str]] = {}
    for name, _ in model.named_modules():
        by_leaf.setdefault(name.rpartition(".")[2], []).append(name)
    chosen = set(targets)
    out = []
    for leaf in dict.fromkeys(t.rpartition(".")[2] for t in targets):
        if all(n in chosen for n in by_leaf.get(leaf, [])):
            out.append(leaf)
        else:
            out += [t for t in targets if t.rpartition(".")[2] == leaf]
    return out


class _AdapterFile:
    """``adapter_model.safetensors`` written as tensors come: data from ``start`` on, in order,
    and the header (padded to ``start``) at :meth:`close`."""

    def __init__(self, path: Path, start: int, dtype: str) -> None:
        self.path, self.start, self.dtype = path, start, dtype
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.entries: list[tuple[str, tuple[int, ...], str]] = []
        self.pos = start

    def put(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        from splice.dtypes import to_torch

        t = tensor.detach().to(device="cpu", dtype=to_torch(self.dtype)).contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        pwrite_all(self.fd, memoryview(raw), self.pos)
        self.entries.append((name, tuple(t.shape), self.dtype))
        self.pos += raw.nbytes

    def close(self) -> None:
        header, _ = encode_header(self.entries, {"format": "pt"})
        body = header[8:].rstrip(b" ")
        room = self.start - 8
        if len(body) > room:  # cannot happen: start is an upper bound (_bound)
            raise RuntimeError(f"adapter header of {len(body)} bytes exceeds {room}")
        pwrite_all(
            self.fd, memoryview(struct.pack("<Q", room) + body + b" " * (room - len(body))), 0
        )
        os.ftruncate(self.fd, self.pos)
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- the verb ---------------------------------------------------------------------------------
def extract_lora(
    finetune: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int,
    sv_epsilon: float = 0.0,
    embed_lora: bool = False,
    save_modules: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    distribute_scale: bool = True,
    skip_undecomposable: bool = False,
    svd: str = "auto",
    dtype: str | None = None,
    device: str | None = "cpu",
    threads: int | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    allow_pickle: bool = False,
) -> ExtractReport:
    """Write ``finetune − base`` as a rank-``rank`` PEFT LoRA adapter into the folder ``out``
    (atomically) and return the :class:`ExtractReport`; see the module docstring.

    ``dtype``: the adapter's dtype (default: the fine-tune's first decomposed weight's);
    ``device``: where the SVDs run (``auto``: cuda when there is one). Options, the two
    checkpoints (same architecture, tensors and shapes; the vocabulary may grow) and ``out``
    are checked before any tensor is read.
    """
    import torch

    from splice.devices import resolve_device
    from splice.dtypes import OUTPUT_DTYPES, dtype_name

    check_number("--rank", rank, least=1, whole=True)
    check_number("--sv-epsilon", sv_epsilon, least=0)
    if svd not in SVD_METHODS:
        raise SpliceError(f"--svd {svd!r}: choose from {', '.join(SVD_METHODS)}")
    inc, exc = _regexes(include, "--include"), _regexes(exclude, "--exclude")
    bad = next((m for m in save_modules if not isinstance(m, str) or not m.strip()), None)
    if bad is not None:
        raise SpliceError(f"--save-module {bad!r}: give a module name")
    out_dtype = dtype_name(dtype) if dtype is not None else None
    if out_dtype is not None and out_dtype not in OUTPUT_DTYPES:
        raise SpliceError(f"--adapter-dtype {dtype}: choose from {', '.join(OUTPUT_DTYPES)}")
    dev = resolve_device(device)
    ft = open_checkpoint(finetune, allow_pickle=allow_pickle)
    bs = open_checkpoint(base, allow_pickle=allow_pickle)
    for ckpt in (ft, bs):
        ckpt.validate()
    vocab = _check_pair(ft, bs)
    model = _transformers_model(ft)
    items = _plan(
        ft,
        model,
        embed_lora=embed_lora,
        vocab_changed=bool(vocab),
        save_modules=list(save_modules),
        include=inc,
        exclude=exc,
    )
    known = {n for it in items for n in (it.module, it.module.rpartition(".")[2], it.head) if n}
    missing = [m for m in save_modules if m not in known]
    if missing:
        raise SpliceError(f"--save-module {missing[0]!r}: the model has no module of that name")
    if vocab:
        import warnings

        from splice.errors import SpliceWarning

        v = _stored(ft)[sorted(vocab)[0]][0]
        warnings.warn(
            f"the fine-tune's vocabulary ({v}) differs from the base's: its embedding and head "
            f"are saved whole, and the base needs resize_token_embeddings({v}) before the "
            "adapter loads",
            SpliceWarning,
            stacklevel=2,
        )
    lora_items = [it for it in items if it.action in ("lora", "embedding")]
    if out_dtype is None:
        first = lora_items[0].tensors[0] if lora_items else items[0].tensors[0]
        out_dtype = ft.stored_info(first).dtype
        if out_dtype not in OUTPUT_DTYPES:
            out_dtype = "float32"
    report = ExtractReport(str(finetune), str(base), str(out), rank, float(sv_epsilon))
    old_threads = torch.get_num_threads()
    with claim_output(
        out, overwrite, inputs=[ft.path, bs.path], replaceable=_adapter_reason
    ) as claim:
        if threads:
            torch.set_num_threads(threads)
        tmp = staging_dir(claim.path, "splice")
        try:
            biases = _bias_deltas(ft, bs, lora_items, dev)
            lora_bias = any(bool(b.any()) for b in biases.values())
            if lora_bias and any(it.action == "embedding" for it in items):
                raise SpliceError(
                    "--embed-lora: the fine-tune changes Linear biases, which needs PEFT's "
                    "lora_bias, and PEFT has no lora_bias for embeddings; leave out --embed-lora "
                    "(the embedding is then saved whole)"
                )
            start = _bound(items, rank, lora_bias, out_dtype)
            f = _AdapterFile(tmp / WEIGHTS, start, out_dtype)
            try:
                ranks, saved = _stream(
                    f, ft, bs, items, report, biases, rank=rank, sv_epsilon=sv_epsilon,
                    distribute_scale=distribute_scale, skip_undecomposable=skip_undecomposable,
                    svd=svd, device=dev, show_progress=show_progress, lora_bias=lora_bias,
                )  # fmt: skip
                f.close()
            finally:
                f.abort()
            if not ranks:
                scope = " among the modules --include / --exclude select" if inc or exc else ""
                raise SpliceError(
                    f"nothing to extract: no Linear weight of the fine-tune differs from the "
                    f"base{scope}"
                )
            report.config = _adapter_config(
                str(base), ranks, saved, lora_bias, _compact_targets(list(ranks), model)
            )
            (tmp / "adapter_config.json").write_text(json.dumps(report.config, indent=2) + "\n")
            (tmp / "README.md").write_text(_card(report))
            if claim.path.exists() and not overwrite:
                raise SpliceError(f"{claim.path}: appeared while writing; nothing was replaced")
            commit(tmp, claim.path, tag="splice")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in _OUTPUT_FAULTS:
                raise os_error(claim.path, e, "write") from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(old_threads)
            ft.close()
            bs.close()
    return report


def _bias_deltas(
    ft: Checkpoint, bs: Checkpoint, items: list[_Item], device: str
) -> dict[str, torch.Tensor]:
    """Module -> bias delta ``[out]`` (float32) of every Linear LoRA candidate with a bias."""
    out = {}
    for it in items:
        for name in it.tensors[1:]:
            if name.endswith(".bias") and it.action == "lora":
                out[it.module] = ft.load(name, "float32", device) - bs.load(name, "float32", device)
    return out


def _stream(
    f: _AdapterFile,
    ft: Checkpoint,
    bs: Checkpoint,
    items: list[_Item],
    report: ExtractReport,
    biases: dict[str, torch.Tensor],
    *,
    rank: int,
    sv_epsilon: float,
    distribute_scale: bool,
    skip_undecomposable: bool,
    svd: str,
    device: str,
    show_progress: bool,
    lora_bias: bool,
) -> tuple[dict[str, int], list[str]]:
    """Read, compare, decompose and write each item; returns ({LoRA module: rank}, modules
    saved whole), and fills ``report.modules``."""
    import torch

    ranks: dict[str, int] = {}
    saved: list[str] = []
    record = report.modules.append
    for it in progress(items, "extract-lora", enabled=show_progress, unit="module"):
        shape = list(it.shape)
        p = PREFIX + it.module
        if it.action == "excluded":
            record(ModuleResult(it.module, "excluded", shape))
            continue
        if it.action in ("lora", "embedding"):
            name = it.tensors[0]
            delta = ft.load(name, "float32", device)
            delta.sub_(bs.load(name, device=device))
            bias = biases.get(it.module)
            lr = low_rank(delta, rank, sv_epsilon=sv_epsilon, method=svd)
            del delta
            if lr.rank == 0 and bias is not None and bool(bias.any()):  # only the bias changed
                z = lr.s.new_zeros
                lr = LowRank(z(it.shape[0], 1), z(1), z(it.shape[1], 1), 1.0, 0.0, lr.method)
            if lr.rank == 0:
                record(ModuleResult(it.module, "unchanged", shape, norm=lr.norm))
                continue
            embedding = it.action == "embedding"
            a, b = lora_factors(lr, distribute_scale=distribute_scale, embedding=embedding)
            if embedding:
                f.put(f"{p}.lora_embedding_A", a)
                f.put(f"{p}.lora_embedding_B", b)
            else:
                f.put(f"{p}.lora_A.weight", a)
                f.put(f"{p}.lora_B.weight", b)
                if lora_bias:
                    f.put(f"{p}.lora_B.bias", bias if bias is not None else a.new_zeros(b.shape[0]))
            ranks[it.module] = lr.rank
            action = "lora-embedding" if embedding else "lora"
            record(ModuleResult(it.module, action, shape, lr.rank, lr.energy, lr.norm, lr.method))
            if it.head and it.head_lora:
                a, b = lora_factors(lr, distribute_scale=distribute_scale)
                f.put(f"{PREFIX}{it.head}.lora_A.weight", a)
                f.put(f"{PREFIX}{it.head}.lora_B.weight", b)
                ranks[it.head] = lr.rank
                record(ModuleResult(it.head, "lora", shape, lr.rank, lr.energy, lr.norm, lr.method))
            continue
        # save / whole / other / foreign: whole tensors, written if changed (save: always)
        tensors = {n: ft.load(n) for n in it.tensors}
        changed = False
        norm = None
        for n, t in tensors.items():
            other = bs.load(n)
            if t.shape != other.shape or not torch.equal(t, other.to(t.dtype)):
                changed = True
                if n == it.tensors[0] and t.shape == other.shape:
                    norm = _diff_norm(t, other)
            elif n == it.tensors[0]:
                norm = 0.0
            del other
        if not changed and it.action != "save":
            record(ModuleResult(it.module, "unchanged", shape, norm=0.0))
            continue
        if it.action == "foreign":
            raise SpliceError(
                f"{it.module} changed, but transformers' model has no such module (its weights "
                "are renamed or packed when loaded), so an adapter cannot name it; leave it out "
                "with --exclude"
            )
        if it.action == "other" and skip_undecomposable:
            record(ModuleResult(it.module, "skipped", shape, norm=norm))
            continue
        for n, t in tensors.items():
            f.put(PREFIX + n, t)
        saved.append(it.module)
        record(ModuleResult(it.module, "saved", shape, norm=norm, energy=1.0))
        if it.head:
            f.put(f"{PREFIX}{it.head}.weight", tensors[it.tensors[0]])
            saved.append(it.head)
            record(ModuleResult(it.head, "saved", shape, norm=norm, energy=1.0))
        del tensors
    return ranks, saved


def _diff_norm(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> float:
    """``‖a − b‖_F`` in float32, a few rows at a time (no full-size float copies)."""
    import torch

    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    rows = max(1, chunk // max(1, a2.shape[1]))
    total = 0.0
    for i in range(0, a2.shape[0], rows):
        total += (
            float(torch.linalg.vector_norm(a2[i : i + rows].float() - b2[i : i + rows].float()))
            ** 2
        )
    return math.sqrt(total)


def _adapter_config(
    base: str, ranks: dict[str, int], saved: list[str], lora_bias: bool, targets: list[str]
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json``: ``r`` the largest rank, ``lora_alpha = r``, other ranks
    in ``rank_pattern`` with the same ``alpha_pattern`` (every module's scale alpha / r is 1)."""
    r = max(ranks.values())
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": targets,
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _card(report: ExtractReport) -> str:
    import splice

    lines = [
        "---",
        "library_name: peft",
        "tags:",
        "- splice",
        "- lora",
        "- extracted-lora",
        f"base_model: {json.dumps(report.base)}",
        "---",
        "",
        f"# LoRA extracted from {report.finetune}",
        "",
        f"Made with [splice](https://github.com/splice-llm/splice) {splice.__version__}: "
        f"`splice extract-lora` at rank {report.rank}"
        + (f", singular values above {report.sv_epsilon:g}" if report.sv_epsilon else "")
        + f". The adapter applied to `{report.base}` approximates `{report.finetune}`.",
        "",
        "```",
        report.summary(),
        "```",
        "",
    ]
    return "\n".join(lines)
