"""LoRA references: a base model with a PEFT LoRA adapter applied, read as one checkpoint.

``BASE+ADAPTER`` (mergekit's syntax; recipes also take ``{model: BASE, lora: ADAPTER}``) names
a base model and a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``;
a pickled ``adapter_model.bin`` only with ``allow_pickle``, as for weights).
:func:`splice.checkpoint.open_checkpoint` opens it as a :class:`LoraCheckpoint`: the base's
tensors, each one the adapter changes made as it is read, with no merged copy on disk
(mergekit first saves one, ``--lora-merge-cache``). What PEFT's ``merge_and_unload`` does, per
tensor, in float32 and cast back to the base tensor's dtype:

- a LoRA linear ``W [out, in] + s·B·A`` (``A`` ``[r, in]``, ``B`` ``[out, r]``), ``s = α/r``, or
  ``α/√r`` with ``use_rslora``; ``r`` and ``α`` per module from ``rank_pattern`` /
  ``alpha_pattern`` (PEFT's rule: the first key matching the end of the module's name);
  ``fan_in_fan_out``: the base stores ``W`` as ``[in, out]``, and takes ``(B·A)ᵀ``;
- a LoRA embedding ``E [vocab, dim] + s·(B·A)ᵀ`` (``lora_embedding_A`` ``[r, vocab]``,
  ``lora_embedding_B`` ``[dim, r]``);
- ``lora_bias``: the layer's bias ``+ s·b`` (``b`` of ``lora_B``);
- any other adapter tensor (``modules_to_save``, a saved ``base_layer``, ``bias: all``)
  replaces the base tensor of its name (before a delta, as PEFT loads it before merging).

Refused, one line each, when the reference is opened (before any output): no
``adapter_config.json``, a PEFT type other than LoRA, DoRA and the other LoRA variants whose
merge is not ``W + s·B·A``, a tensor the adapter changes that the base lacks or holds in
another shape, a rank that disagrees with the config, an adapter tensor splice cannot read.

The tokenizer (and :attr:`LoraCheckpoint.path`) is the adapter folder's when it ships one
(PEFT trainers often save it beside the adapter), else the base's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.checkpoint import Checkpoint, _load_pickle, _read_json
from splice.errors import SpliceError
from splice.paths import lora_parts
from splice.st_format import TensorInfo, json_kind, read_header, show

if TYPE_CHECKING:
    import torch

__all__ = ["AdaptedInfo", "Adapter", "Delta", "LoraCheckpoint", "read_adapter", "tokenizer_ref"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
#: what PEFT puts before a module's name in the adapter file
PREFIX = "base_model.model."
#: files that mean a folder ships a tokenizer
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: adapter_config.json keys that, set, make an adapter whose merge is not ``W + s·B·A`` (or that
#: changes the model's layout), as PEFT 0.21 names them
_VARIANTS = (
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
)
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.(weight|bias)|(.+)\.(lora_embedding_[AB])")


class AdaptedInfo(TensorInfo):
    """A base tensor the adapter changes: ``file`` and ``offset`` locate the base's bytes,
    which are not this tensor's, so it is never ``readable`` (a kernel copy of them would copy
    the base)."""

    @property
    def readable(self) -> bool:
        return False


def adapted(info: TensorInfo) -> AdaptedInfo:
    """``info`` as an :class:`AdaptedInfo` (same fields)."""
    return AdaptedInfo(**{f.name: getattr(info, f.name) for f in fields(TensorInfo)})


@dataclass(frozen=True)
class Delta:
    """``scale · B·A`` added to one base tensor (``transpose``: ``(B·A)ᵀ``, as the base stores
    it); ``a`` and ``b`` name the adapter file's tensors. ``a`` ``None``: ``b`` is a bias
    vector, added as ``scale · b``."""

    a: str | None
    b: str
    scale: float
    transpose: bool = False


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter checked against one base: its ``config``, the ``weights`` file and
    its ``tensors`` (adapter names), the ``deltas`` and the ``replaced`` tensors by base name."""

    folder: Path
    config: dict[str, Any]
    weights: Path
    tensors: dict[str, TensorInfo]
    deltas: dict[str, Delta]
    replaced: dict[str, str]

    @property
    def changed(self) -> set[str]:
        """Base tensors the adapter changes."""
        return set(self.deltas) | set(self.replaced)

    @property
    def ships_tokenizer(self) -> bool:
        return any((self.folder / f).is_file() for f in _TOKENIZER)


# ---- reading and checking an adapter -----------------------------------------------------------
def _config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked to describe a plain LoRA adapter."""
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise SpliceError(f"{folder}: {what} (the LoRA adapter of a BASE+ADAPTER reference)")
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise SpliceError(f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise SpliceError(f"{path}: not a JSON object ({json_kind(config)})")
    kind = config.get("peft_type")
    if not isinstance(kind, str) or kind.upper() != "LORA":
        raise SpliceError(
            f"{path}: PEFT type {show(kind)} is not supported (LoRA adapters only, peft_type LORA)"
        )
    if config.get("use_dora"):
        raise SpliceError(
            f"{path}: a DoRA adapter (use_dora: true) is not supported: its merge rescales every "
            "column of W + s·B·A to a learned norm; merge it with PEFT (merge_and_unload) first"
        )
    variant = next((k for k in _VARIANTS if config.get(k)), None)
    if variant is not None:
        raise SpliceError(
            f"{path}: {variant} is set: this LoRA variant is not supported (plain LoRA only)"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _count(r):
        raise SpliceError(f"{path}: r is {show(r)}, not a rank of 1 or more")
    if not _number(alpha):
        raise SpliceError(f"{path}: lora_alpha is {show(alpha)}, not a number")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        ok = _count if key == "rank_pattern" else _number
        if not isinstance(pattern, dict) or not all(ok(v) for v in pattern.values()):
            raise SpliceError(f"{path}: {key} is {show(pattern)}, not {{module pattern: value}}")
        for p in pattern:
            try:
                re.compile(p)
            except re.error as e:
                raise SpliceError(f"{path}: {key} key {show(p)} is not a pattern ({e})") from None
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise SpliceError(f"{path}: {key} is {show(config[key])}, not true or false")
    return config


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the value of the first key that matches the end of
    ``module`` (at a ``.`` boundary), else ``default``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _weights(
    folder: Path, allow_pickle: bool
) -> tuple[Path, dict[str, TensorInfo], dict[str, torch.Tensor] | None]:
    """The adapter's weights file, its tensors, and (pickled) their values."""
    from splice.dtypes import ITEMSIZE, nbytes

    file = folder / ADAPTER_WEIGHTS
    if file.is_file():
        return file, read_header(file)[0], None
    file = folder / ADAPTER_PICKLE
    if not file.is_file():
        raise SpliceError(f"{folder}: no {ADAPTER_WEIGHTS} (the adapter's weights)")
    if not allow_pickle:
        raise SpliceError(
            f"{file}: the adapter's weights are pickled, which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle (loads with "
            "torch.load(weights_only=True))"
        )
    sd = _load_pickle(file)
    infos = {}
    for name, t in sd.items():
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in ITEMSIZE:
            raise SpliceError(f"{file}: tensor {show(name)} has unsupported dtype {dt}")
        infos[name] = TensorInfo(name, tuple(t.shape), dt, file, -1, nbytes(tuple(t.shape), dt))
    return file, infos, sd


def read_adapter(
    folder: str | Path, base: Checkpoint, *, allow_pickle: bool = False
) -> tuple[Adapter, dict[str, torch.Tensor] | None]:
    """The adapter in ``folder`` checked against ``base`` (shapes, names, ranks), and its
    tensors when they were pickled (``None`` for safetensors). ``SpliceError``, one line, for
    anything :mod:`splice.lora` cannot apply exactly (module docstring)."""
    folder = Path(folder)
    config = _config(folder)
    weights, tensors, pickled = _weights(folder, allow_pickle)
    where = f"{weights}:"
    modules: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key, info in tensors.items():
        if info.dtype not in _FLOATS:
            raise SpliceError(f"{where} tensor {show(key)} is {info.dtype}, not floating point")
        if not key.startswith(PREFIX):
            raise SpliceError(f"{where} {show(key)} is not a PEFT adapter tensor ({PREFIX}...)")
        rest = key[len(PREFIX) :]
        m = _LORA_KEY.fullmatch(rest)
        if m is not None and m.group(1) is not None:
            module, part = m.group(1), f"{m.group(2)}.{m.group(3)}"
            if part == "lora_A.bias":
                raise SpliceError(f"{where} {show(key)}: lora_A has no bias in PEFT's LoRA")
            modules.setdefault(module, {})[part] = key
        elif m is not None:
            modules.setdefault(m.group(4), {})[m.group(5)] = key
        elif any(p.startswith("lora_") or p == "token_adapter" for p in rest.split(".")):
            raise SpliceError(
                f"{where} {show(key)} belongs to a LoRA variant splice does not apply "
                "(plain LoRA only)"
            )
        else:  # modules_to_save, a saved base_layer, a trained bias: replaces the base's tensor
            replaced[rest.replace(".base_layer.", ".")] = key
    listed = {**base.mtp, **base.tensors}

    def target(name: str, why: str) -> TensorInfo:
        info = listed.get(name)
        if info is None or info.view is not None:
            raise SpliceError(f"{where} {why} {name}, which the base {base.path} does not have")
        return info

    for name, key in replaced.items():
        info, own = target(name, "replaces"), tensors[key]
        if own.shape != info.shape:
            raise SpliceError(
                f"{where} {show(key)} is {list(own.shape)}, but the base's {name} is "
                f"{list(info.shape)}: not an adapter of this base"
            )
    deltas = {}
    rank, alpha = config["r"], config["lora_alpha"]
    for module, parts in modules.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_part, b_part = (
            ("lora_embedding_A", "lora_embedding_B")
            if embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        if a_part not in parts or b_part not in parts or (embedding and len(parts) > 2):
            raise SpliceError(
                f"{where} module {module} holds {', '.join(sorted(parts))}: not one LoRA pair"
            )
        a, b = tensors[parts[a_part]], tensors[parts[b_part]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise SpliceError(
                f"{where} module {module}: A {list(a.shape)} and B {list(b.shape)} are not a "
                "rank-r pair [r, in] and [out, r]"
            )
        r = _pattern_value(config.get("rank_pattern") or {}, module, rank)
        if a.shape[0] != r:
            raise SpliceError(
                f"{where} module {module} has rank {a.shape[0]}, but {ADAPTER_CONFIG} says {r}"
            )
        lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scale = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        weight = f"{module}.weight"
        info = target(weight, "adapts")
        want = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if info.shape != want:
            raise SpliceError(
                f"{where} module {module} adapts a {list(want)} matrix, but the base's {weight} "
                f"is {list(info.shape)}: not an adapter of this base"
            )
        deltas[weight] = Delta(parts[a_part], parts[b_part], scale, transpose)
        if "lora_B.bias" in parts:  # lora_bias: the layer's bias moves by scale * b
            bias, own = f"{module}.bias", tensors[parts["lora_B.bias"]]
            info = target(bias, "adapts the bias")
            if info.shape != own.shape or own.shape != (b.shape[0],):
                raise SpliceError(
                    f"{where} {show(parts['lora_B.bias'])} is {list(own.shape)}, but the base's "
                    f"{bias} is {list(info.shape)}"
                )
            deltas[bias] = Delta(None, parts["lora_B.bias"], scale)
    adapter = Adapter(folder, config, weights, tensors, deltas, replaced)
    return adapter, pickled


# ---- the checkpoint ------------------------------------------------------------------------------
class LoraCheckpoint(Checkpoint):
    """The base model folder ``base`` with the LoRA adapter in ``adapter`` applied (module
    docstring): the base's config, names, shapes and dtypes; tensors the adapter changes are
    :class:`AdaptedInfo` (never byte-copied) and made by :meth:`load`.

    ``path`` is the folder whose tokenizer goes with the model: the adapter's when it ships one,
    else the base's (``base_path``, ``adapter_path``; ``folders`` lists both).
    """

    def __init__(self, base: str | Path, adapter: str | Path, *, allow_pickle: bool = False):
        super().__init__(base, allow_pickle=allow_pickle)
        self.base_path, self.adapter_path = self.path, Path(adapter)
        self.adapter, pickled = read_adapter(adapter, self, allow_pickle=allow_pickle)
        if pickled is not None:
            self._pickled[self.adapter.weights] = pickled
        for name in self.adapter.changed:
            for table in (self.tensors, self.mtp, self._stored, self.stored_tensors):
                if name in table:
                    table[name] = adapted(table[name])
        if self.adapter.ships_tokenizer:
            self.path = self.adapter_path

    @property
    def ref(self) -> str:
        """``BASE+ADAPTER``, the reference this checkpoint reads."""
        return f"{self.base_path}+{self.adapter_path}"

    @property
    def folders(self) -> list[Path]:
        return [self.base_path, self.adapter_path]

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.ref!r}, {len(self)} tensors)"

    def load(
        self,
        name: str,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` of the adapted model ``[*shape]``: the base's, or the adapter's
        replacement, plus the LoRA delta (computed in float32 on ``device``), in the base
        tensor's dtype; then cast and moved as asked."""
        if name not in self.adapter.deltas and name not in self.adapter.replaced:
            return super().load(name, dtype=dtype, device=device)
        import torch

        from splice.dtypes import to_torch

        info = self.stored_info(name)
        key = self.adapter.replaced.get(name)
        t = self._read(self.adapter.tensors[key] if key is not None else info)
        delta = self.adapter.deltas.get(name)
        if delta is not None:
            t = t.to(device=device, dtype=torch.float32) + self._delta(delta, device)
        t = t.to(device=device, dtype=to_torch(info.dtype))
        if dtype is not None:
            t = t.to(dtype=to_torch(dtype))
        return t

    def _delta(self, d: Delta, device: str | torch.device | None) -> torch.Tensor:
        import torch

        def adapter_tensor(key: str) -> torch.Tensor:
            return self._read(self.adapter.tensors[key]).to(device=device, dtype=torch.float32)

        b = adapter_tensor(d.b)
        if d.a is None:
            return b * d.scale
        ba = b @ adapter_tensor(d.a)
        return (ba.T if d.transpose else ba) * d.scale

    def apply_to(self, module: torch.nn.Module) -> None:
        """Copy every tensor the adapter changes into ``module`` (a causal LM built from the
        base, e.g. ``from_pretrained(ckpt.base_path)``), in its parameters' dtype and device."""
        import torch

        params = dict(module.named_parameters())
        with torch.no_grad():
            for name in sorted(self.adapter.changed):
                p = params.get(name)
                if p is None:
                    raise SpliceError(f"{self.ref}: the module has no parameter {name}")
                p.copy_(self.load(name, dtype=p.dtype, device=p.device))


def tokenizer_ref(ref: str) -> str:
    """The folder (or hub id) whose tokenizer goes with model reference ``ref``: for a LoRA
    reference ``BASE+ADAPTER``, the adapter's when it ships a tokenizer, else the base's;
    ``ref`` itself otherwise."""
    parts = lora_parts(ref)
    if parts is None:
        return ref
    from splice.checkpoint import resolve

    base, adapter = parts
    folder = resolve(adapter)
    return adapter if any((folder / f).is_file() for f in _TOKENIZER) else base
