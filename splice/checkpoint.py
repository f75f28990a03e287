"""Lazy, read-only view of a Hugging Face model folder.

``Checkpoint`` lists every tensor (shape, dtype, file, byte range) from the safetensors headers
without reading data, and ``load(name)`` reads exactly one tensor with ``pread`` into a fresh
buffer. No mmap: resident memory stays at one tensor, whatever the model's size. Torch is only
imported by ``load``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import threading
import warnings
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.arch import ArchSpec
from splice.errors import SpliceError
from splice.paths import lora_parts
from splice.st_format import TensorInfo, json_kind, pread_into, read_header, show, valid_name

if TYPE_CHECKING:
    import torch

    from splice.quant import Scheme

__all__ = ["TOKENIZER_FILES", "Checkpoint", "TensorInfo", "open_checkpoint"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class Checkpoint(Mapping[str, TensorInfo]):
    """A model folder: ``config``, ``arch``, tensor metadata (a mapping), and ``load(name)``.

    Iterating gives tensor names in file order; ``ckpt[name]`` is a :class:`TensorInfo`.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        if not str(path).strip():
            raise SpliceError("empty model reference: give a model folder or hub id")
        self.path = Path(path)
        if not self.path.exists():
            raise SpliceError(f"{self.path}: no such folder")
        if not self.path.is_dir():
            raise SpliceError(f"{self.path}: not a folder (give the model's folder)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise SpliceError(f"{self.path}: not a model folder (no config.json)")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise SpliceError(f"{config_path}: not a JSON object ({json_kind(config)})")
        self.allow_pickle = allow_pickle
        self.metadata: dict[str, str] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._index(config, self._scan(), config_path)

    def _index(self, config: dict[str, Any], stored: dict[str, TensorInfo], where: Path) -> None:
        """Read ``config`` (checked, from the file ``where``) and the ``stored`` tensors as the
        model's family lists them: packed experts as per-expert views, multi-token-prediction
        layers apart."""
        from splice.quant import logical_tensors, part_key

        self.config: dict[str, Any] = config
        model_type = config.get("model_type")
        known = isinstance(model_type, str) and model_type in ArchSpec.known()
        _check_config(where, config, ArchSpec.load(model_type) if known else None)
        stored = logical_tensors(stored, config, str(self.path))  # a weight and its scales: one
        #: the stored parts of quantized tensors under :func:`splice.quant.part_key` (a
        #: weight's values share its logical name): what byte copies of them read
        self.quant_parts: dict[str, TensorInfo] = {
            part_key(p.name): p
            for i in stored.values()
            if i.quant is not None
            for p in i.quant.parts
        }
        #: name -> metadata; packed expert tensors appear as per-expert views (ArchSpec.unpack)
        self.tensors: dict[str, TensorInfo] = (
            self._unpack(ArchSpec.load(model_type), stored) if known else stored
        )
        #: stored tensors that are listed through views instead (empty for most checkpoints)
        self.packed: list[str] = [n for n in stored if n not in self.tensors]
        #: the multi-token-prediction layers stored after the decoder layers (DeepSeek-V3,
        #: GLM-4.5): not part of ``tensors`` (no verb plans them), carried to every output
        #: renumbered after its last layer (:mod:`splice.mtp`)
        self.mtp: dict[str, TensorInfo] = {}
        if known:
            spec = ArchSpec.load(model_type)
            mtp = spec.mtp_layers(config)
            self.mtp = {n: i for n, i in self.tensors.items() if spec.layer_of(n) in mtp}
            self.tensors = {n: i for n, i in self.tensors.items() if n not in self.mtp}
        self._stored = {n: stored[n] for n in self.packed} | self.mtp | self.quant_parts
        #: name -> metadata of every tensor as the files hold it (packed experts unsplit)
        self.stored_tensors: dict[str, TensorInfo] = stored

    def _unpack(self, spec: ArchSpec, stored: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The stored tensors as ``spec``'s family lists them (packed experts as views)."""
        return spec.unpack(stored)

    # ---- listing ----------------------------------------------------------------------------
    def _scan(self) -> dict[str, TensorInfo]:
        index = self.path / INDEX
        if index.is_file():
            weight_map = _weight_map(index)
            tensors: dict[str, TensorInfo] = {}
            for shard in dict.fromkeys(weight_map.values()):
                file = self.path / shard
                if not file.is_file():
                    raise SpliceError(f"{index}: names shard {show(shard)}, which is missing")
                infos, meta = read_header(file)
                self.metadata.update(meta)
                dup = next((n for n in infos if n in tensors), None)
                if dup is not None:
                    raise SpliceError(f"{self.path}: tensor {show(dup)} is stored in two shards")
                tensors.update(infos)
            missing = [n for n in weight_map if n not in tensors]
            if missing:
                raise SpliceError(
                    f"{index}: {len(missing)} tensors are not in their shards, e.g. "
                    f"{show(missing[0])}"
                )
            wrong = next((n for n, f in weight_map.items() if tensors[n].file.name != f), None)
            if wrong is not None:
                raise SpliceError(
                    f"{index}: puts {show(wrong)} in {show(weight_map[wrong])}, but it is stored "
                    f"in {show(tensors[wrong].file.name)}"
                )
            return tensors
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            tensors = {}
            for file in files:
                infos, meta = read_header(file)
                self.metadata.update(meta)
                dup = next((n for n in infos if n in tensors), None)
                if dup is not None:
                    raise SpliceError(f"{self.path}: tensor {show(dup)} is stored in two files")
                tensors.update(infos)
            return tensors
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if bins:
            if not self.allow_pickle:
                raise SpliceError(
                    f"{self.path}: weights are pickled .bin files, which can run code when "
                    "loaded; convert them to safetensors or pass --allow-pickle "
                    "(loads with torch.load(weights_only=True))"
                )
            return self._scan_pickle(bins)
        raise SpliceError(f"{self.path}: not a model folder (no *.safetensors weights)")

    def _scan_pickle(self, bins: list[Path]) -> dict[str, TensorInfo]:
        from splice.dtypes import ITEMSIZE, nbytes

        tensors: dict[str, TensorInfo] = {}
        for file in bins:
            sd = _load_pickle(file)
            self._pickled[file] = sd
            for name, t in sd.items():
                dt = str(t.dtype).removeprefix("torch.")
                if dt not in ITEMSIZE:
                    raise SpliceError(f"{file}: tensor {show(name)} has unsupported dtype {dt}")
                if name in tensors:
                    raise SpliceError(f"{self.path}: tensor {show(name)} is stored in two files")
                shape = tuple(t.shape)
                tensors[name] = TensorInfo(name, shape, dt, file, -1, nbytes(shape, dt))
        return tensors

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def stored_info(self, name: str) -> TensorInfo:
        """A tensor as stored, listed or not: one of :attr:`packed` or :attr:`mtp`, or any listed
        tensor."""
        return self._stored[name] if name in self._stored else self[name]

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"

    # ---- meaning ----------------------------------------------------------------------------
    @cached_property
    def arch(self) -> ArchSpec:
        """Architecture spec for this model (inferred, with a warning, if the type is unknown)."""
        return ArchSpec.for_model(self.config, self.tensors)

    @cached_property
    def layer_index(self) -> dict[int, list[str]]:
        """``{layer: [tensor names]}`` for every per-layer tensor, layers in order."""
        index: dict[int, list[str]] = {}
        for name in self.tensors:
            layer = self.arch.layer_of(name)
            if layer is not None:
                index.setdefault(layer, []).append(name)
        return dict(sorted(index.items()))

    def global_names(self, *groups: str) -> list[str]:
        """Tensors outside the layers whose group (``embed``, ``final_norm``, ``head``,
        ``other``) is one of ``groups``, in storage order."""
        spec = self.arch
        return [
            n for n in self.tensors if spec.layer_of(n) is None and spec.parse(n).group in groups
        ]

    @property
    def num_layers(self) -> int:
        """Layers present in the weights (not just claimed by the config)."""
        return len(self.layer_index)

    @property
    def tied(self) -> bool:
        """True when the head reuses the embedding matrix (no ``lm_head`` stored)."""
        return self.arch.is_tied(self.config, self.tensors)

    @property
    def quant_scheme(self) -> Scheme | None:
        """How the weights are quantized (:mod:`splice.quant`), None if they are not."""
        from splice.quant import scheme_of

        return scheme_of(self.config, str(self.path / "config.json"))

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def folders(self) -> list[Path]:
        """Every folder the checkpoint reads (a LoRA reference: the base's and the adapter's)."""
        return [self.path]

    @property
    def files(self) -> list[Path]:
        """Weight files, in order."""
        return list(dict.fromkeys(t.file for t in self.tensors.values()))

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer and generation files present in the folder."""
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]

    # ---- data -------------------------------------------------------------------------------
    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def load(
        self,
        name: str,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Read one tensor ``[*shape]`` from disk (thread-safe), optionally cast and moved.

        The returned tensor owns fresh memory; the checkpoint keeps no reference to it.
        """
        from splice.dtypes import to_torch

        t = self._read(self.stored_info(name))
        if dtype is not None or device is not None:
            t = t.to(device=device, dtype=to_torch(dtype) if dtype is not None else None)
        return t

    def _read(self, info: TensorInfo) -> torch.Tensor:
        """The stored tensor ``info`` describes (any file, this folder's or not), in fresh
        memory, as stored."""
        import torch

        from splice.dtypes import to_torch

        v = info.view
        if info.quant is not None:  # dequantized from its parts (one expert's, for a view)
            from splice.quant import dequantize, expert_part

            parts = info.quant.parts
            if v is not None:
                parts = tuple(expert_part(p, v.expert) for p in parts)
            t = dequantize(info.quant, [self._read(p) for p in parts], info.dtype)
            return v.layout.take(t, v.part) if v is not None else t
        if info.offset < 0:  # pickled weights, already memory-mapped by torch.load
            return self._pickled[info.file][info.name].clone()
        if v is not None and not v.layout.contiguous:  # a part of an expert's block
            buf = torch.empty(v.block_nbytes, dtype=torch.uint8)
            pread_into(self._fd(info.file), memoryview(buf.numpy()), v.block_offset)
            block = buf.view(to_torch(info.dtype)).reshape(v.block_shape)
            return v.layout.take(block, v.part)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            pread_into(self._fd(info.file), memoryview(buf.numpy()), info.offset)
        return buf.view(to_torch(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ---- consistency ------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the weights against the config and the spec; ``SpliceError`` on a mismatch.

        Checks: the layer count matches the config, every layer has the spec's tensors, each
        layer's tensors have layer 0's shapes, and the embedding is ``[vocab_size, hidden_size]``.
        """
        spec, cfg = self.arch, self.config
        n_cfg = spec.num_layers(cfg)
        if n_cfg is not None and n_cfg != self.num_layers:
            raise SpliceError(
                f"{self.path}: config says {n_cfg} layers but the weights hold {self.num_layers}"
            )
        emb = self.tensors.get(spec.embed)
        if spec.embed and emb is None and not spec.inferred:
            raise SpliceError(f"{self.path}: embedding {spec.embed!r} is missing")
        vocab, hidden = cfg.get("vocab_size"), cfg.get("hidden_size")
        if emb is not None and vocab and hidden and emb.shape != (vocab, hidden):
            raise SpliceError(
                f"{self.path}: {spec.embed} has shape {list(emb.shape)} but the config says "
                f"vocab_size={vocab}, hidden_size={hidden}"
            )
        head = self.tensors.get(spec.lm_head)
        if head is not None and emb is not None and head.shape != emb.shape:
            raise SpliceError(
                f"{self.path}: {spec.lm_head} has shape {list(head.shape)}, embedding "
                f"{list(emb.shape)}"
            )
        reference: dict[str, tuple[int, ...]] | None = None
        for layer, shapes in sorted(self.layer_shapes().items()):
            missing = [k for k in spec.required_layer_kinds() if k not in shapes]
            if missing and not spec.inferred:
                raise SpliceError(
                    f"{self.path}: layer {layer} lacks {spec.layer_name(layer, missing[0])}"
                )
            if reference is None or not spec.uniform_layers:
                reference = reference or shapes
                continue
            for kind, shape in shapes.items():
                if kind in reference and reference[kind] != shape:
                    raise SpliceError(
                        f"{self.path}: {spec.layer_name(layer, kind)} has shape {list(shape)}, "
                        f"but layer 0 has {list(reference[kind])}"
                    )

    def layer_shapes(self) -> dict[int, dict[str, tuple[int, ...]]]:
        """``{layer: {kind: shape}}``; expert tensors appear as ``experts.{e}.<kind>``."""
        out: dict[int, dict[str, tuple[int, ...]]] = {}
        for name, info in self.tensors.items():
            t = self.arch.parse(name)
            if t.layer is None:
                continue
            kind = t.kind if t.expert is None else f"experts.{t.expert}.{t.kind}"
            out.setdefault(t.layer, {})[kind] = info.shape
        return out


def resolve(ref: str | os.PathLike[str], *, allow_pickle: bool = False) -> Path:
    """A local folder for ``ref``: the path itself, or a hub id downloaded (or found in cache).

    Only safetensors, JSON and tokenizer files are fetched (plus ``.bin`` if pickle is allowed):
    a model's, or a PEFT adapter's (:func:`open_checkpoint` resolves each side of a LoRA
    reference ``BASE+ADAPTER`` here).
    """
    if not str(ref).strip():
        raise SpliceError("empty model reference: give a model folder or hub id")
    path = Path(ref)
    if path.exists() or not _HUB_ID.match(str(ref)):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise SpliceError(f"{ref}: no such folder") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(str(ref), allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise SpliceError(
            f"{ref}: not a local folder, and the hub cannot be reached (offline or "
            "HF_HUB_OFFLINE=1) with no cached copy; download it first or give a path"
        ) from None
    except HFValidationError:
        raise SpliceError(f"{ref}: no such folder, and not a valid hub id") from None
    except HfHubHTTPError as e:
        raise SpliceError(f"{ref}: hub download failed ({_first_line(e)})") from None
    except OSError as e:
        raise SpliceError(f"{ref}: cannot fetch from the hub ({_first_line(e)})") from None


def open_checkpoint(
    ref: str | os.PathLike[str], *, allow_pickle: bool = False, language_model: bool = True
) -> Checkpoint:
    """Open a model folder or hub id as a lazy :class:`Checkpoint`; a LoRA reference
    ``BASE+ADAPTER`` (mergekit's syntax: a PEFT adapter folder or hub id after the ``+``, see
    :func:`splice.paths.lora_parts`) as a :class:`splice.lora.LoraCheckpoint`, the base with
    the adapter applied tensor by tensor as they are read. A multimodal model of a family
    splice knows opens as its language model (:class:`splice.multimodal.LanguageModel`, the
    other modules carried), unless ``language_model=False`` (every tensor as stored)."""
    parts = lora_parts(str(ref))
    if parts is not None:
        from splice.lora import LoraCheckpoint

        base, adapter = (resolve(p, allow_pickle=allow_pickle) for p in parts)
        if _model_type(base) in _multimodal_types():
            raise SpliceError(
                f"{ref}: a LoRA adapter on a multimodal model ({_model_type(base)}) is not read "
                "yet; merge the adapter into it first (e.g. with peft's merge_and_unload)"
            )
        return LoraCheckpoint(base, adapter, allow_pickle=allow_pickle)
    path = resolve(ref, allow_pickle=allow_pickle)
    if language_model and _model_type(path) in _multimodal_types():
        from splice.multimodal import LanguageModel

        return LanguageModel(path, allow_pickle=allow_pickle)
    return Checkpoint(path, allow_pickle=allow_pickle)


def _multimodal_types() -> frozenset[str]:
    from splice.multimodal import LAYOUTS

    return frozenset(LAYOUTS)


def _model_type(path: Path) -> str | None:
    """The ``model_type`` of the folder's config, None where there is none to read (opening
    the folder says why)."""
    try:
        config = _read_json(path / "config.json")
    except SpliceError:
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None  # else opening it says why


# ---- readers of the folder's JSON and pickle files ---------------------------------------------
def _first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's message as one short printable line (hub and torch errors span several,
    and some carry terminal escapes)."""
    line = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_json(path: Path) -> Any:
    """A JSON file's value; unreadable, non-UTF-8 or invalid JSON is a one-line SpliceError."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise SpliceError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SpliceError(f"{path}: not valid JSON (not UTF-8: {e.reason})") from None
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise SpliceError(f"{path}: not valid JSON ({_first_line(e)})") from None
    except RecursionError:
        raise SpliceError(f"{path}: not valid JSON (nested too deeply)") from None


#: config keys splice itself reads as counts; transformers checks the rest when it loads a model
_COUNT_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size", "max_position_embeddings")


def _check_config(path: Path, config: dict[str, Any], spec: ArchSpec | None) -> None:
    """Types of the config fields that splice reads: ``model_type``, ``architectures``,
    ``tie_word_embeddings`` and the layer, expert and size counts (null counts are allowed)."""
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise SpliceError(f"{path}: model_type is {json_kind(model_type)}, not a string")
    archs = config.get("architectures")
    if archs is not None and not (
        isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    ):
        raise SpliceError(f"{path}: architectures is {show(archs)}, not a list of class names")
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise SpliceError(f"{path}: tie_word_embeddings is {show(tie)}, not true or false")
    keys = list(_COUNT_KEYS)
    if spec is not None:
        keys += [spec.num_layers_key]
        for role in ("num_experts", "experts_per_token"):
            named = spec.config_keys.get(role) or []
            keys += [named] if isinstance(named, str) else list(named)
    for key in dict.fromkeys(keys):
        value = config.get(key)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            raise SpliceError(f"{path}: {key} is {show(value)}, not a non-negative integer")


def _weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``: tensor name -> shard, a plain file name in the same folder."""
    data = _read_json(index)
    if not isinstance(data, dict):
        raise SpliceError(f"{index}: corrupt index ({json_kind(data)}, not a JSON object)")
    if "weight_map" not in data:
        raise SpliceError(f"{index}: corrupt index (no weight_map)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise SpliceError(
            f"{index}: corrupt index (weight_map is {json_kind(weight_map)}, not an object)"
        )
    for name, shard in weight_map.items():
        if not valid_name(name):
            raise SpliceError(f"{index}: corrupt index (invalid tensor name {show(name)})")
        if not isinstance(shard, str):
            raise SpliceError(
                f"{index}: corrupt index (weight_map[{show(name)}] is {json_kind(shard)}, "
                "not a file name)"
            )
        if not _plain_file_name(shard):
            raise SpliceError(
                f"{index}: refusing shard {show(shard)}: a shard must be a plain file name in "
                "the model folder"
            )
    return weight_map


def _plain_file_name(name: str) -> bool:
    """True for a file name without folders: no separators, not ``.``/``..``, no NUL."""
    return (
        valid_name(name)
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
        and os.path.basename(name) == name
    )


#: what torch.load raises on a corrupt or foreign file (found by fuzzing mutated .bin files):
#: the unpickler's errors, zip-reader RuntimeErrors, and the lookups/unpacking of a broken pickle
_TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,  # zip reader ("PytorchStreamReader failed ..."), "Invalid magic number"
    EOFError,
    struct.error,  # "unpack requires a buffer of 8 bytes"
    ValueError,  # includes UnicodeDecodeError
    LookupError,  # KeyError, IndexError ("pop from empty list")
    TypeError,
    AssertionError,  # "storage key ... not found in deserialized_objects"
    AttributeError,
    ArithmeticError,
    OSError,
    MemoryError,
)
_ZIP_MAGIC = b"PK\x03\x04"


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model*.bin`` as ``{name: tensor}`` via ``torch.load(weights_only=True)``.

    Zip files (torch >= 1.6) are memory-mapped; legacy ones are read whole (torch cannot mmap
    them). A ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped. Anything
    that is not a dict of tensors, or that weights_only refuses, is a one-line SpliceError.
    """
    import torch

    try:
        with open(file, "rb") as f:
            zipped = f.read(4) == _ZIP_MAGIC
    except OSError as e:
        raise SpliceError(f"{file}: cannot read: {e.strerror or e}") from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": torch's own notes
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        raise SpliceError(_refusal(file, e)) from None
    except _TORCH_LOAD_ERRORS as e:
        what = _first_line(e).split(". ")[0]
        raise SpliceError(f"{file}: not a readable PyTorch weights file ({what})") from None
    return _state_dict(file, obj)


def _refusal(file: Path, e: pickle.UnpicklingError) -> str:
    """One line for a weights_only refusal, without torch's advice to turn weights_only off."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+?)\.?(?:\s|$)", text)
    if m:
        return (
            f"{file}: refused: the pickle asks to run code (GLOBAL {m.group(1)}), which "
            "weights_only=True does not allow; convert it to safetensors from a trusted "
            "environment"
        )
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return (
            f"{file}: refused: not a PyTorch weights file that weights_only=True can read "
            f"(unsupported pickle opcode {m.group(1)})"
        )
    return f"{file}: refused by torch.load(weights_only=True) ({_first_line(e)})"


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "a list", "an int"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _state_dict(file: Path, obj: object) -> dict[str, torch.Tensor]:
    """``obj`` checked to be ``{name: tensor}``, after unwrapping a ``state_dict``/``model`` key."""
    import torch

    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapped = [k for k in ("state_dict", "model") if isinstance(obj.get(k), dict)]
        if len(wrapped) == 1:
            obj = obj[wrapped[0]]
    if not isinstance(obj, dict):
        raise SpliceError(f"{file}: holds {_a(type(obj).__name__)}, not a dict of tensors")
    for name, value in obj.items():
        if not valid_name(name):
            raise SpliceError(f"{file}: has key {show(name)}, not a tensor name")
        if not isinstance(value, torch.Tensor):
            raise SpliceError(
                f"{file}: {show(name)} is {_a(type(value).__name__)}, not a tensor "
                "(expected a dict of tensors, or one under 'state_dict' or 'model')"
            )
        if value.layout != torch.strided or value.is_quantized:
            raise SpliceError(f"{file}: tensor {show(name)} is not a dense tensor ({value.layout})")
    return obj  # type: ignore[return-value]
