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
import re
import threading
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.arch import ArchSpec
from splice.errors import SpliceError
from splice.st_format import TensorInfo, pread_into, read_header

if TYPE_CHECKING:
    import torch

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
        self.path = Path(path)
        if not self.path.exists():
            raise SpliceError(f"{self.path}: no such folder")
        if not self.path.is_dir():
            raise SpliceError(f"{self.path}: not a folder (give the model's folder)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise SpliceError(f"{self.path}: not a model folder (no config.json)")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise SpliceError(f"{config_path}: not valid JSON ({e})") from None
        self.allow_pickle = allow_pickle
        self.metadata: dict[str, str] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        stored = self._scan()
        model_type = self.config.get("model_type")
        known = model_type in ArchSpec.known()
        #: name -> metadata; packed expert tensors appear as per-expert views (ArchSpec.unpack)
        self.tensors: dict[str, TensorInfo] = (
            ArchSpec.load(model_type).unpack(stored) if known else stored
        )
        #: stored tensors that are listed through views instead (empty for most checkpoints)
        self.packed: list[str] = [n for n in stored if n not in self.tensors]

    # ---- listing ----------------------------------------------------------------------------
    def _scan(self) -> dict[str, TensorInfo]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise SpliceError(f"{index}: corrupt index (no weight_map)") from None
            shards = list(dict.fromkeys(weight_map.values()))
            tensors: dict[str, TensorInfo] = {}
            for shard in shards:
                file = self.path / shard
                if not file.is_file():
                    raise SpliceError(f"{index}: names shard {shard!r}, which is missing")
                infos, meta = read_header(file)
                self.metadata.update(meta)
                tensors.update(infos)
            missing = [n for n in weight_map if n not in tensors]
            if missing:
                raise SpliceError(
                    f"{index}: {len(missing)} tensors are not in their shards, e.g. {missing[0]!r}"
                )
            return tensors
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            tensors = {}
            for file in files:
                infos, meta = read_header(file)
                self.metadata.update(meta)
                dup = next((n for n in infos if n in tensors), None)
                if dup:
                    raise SpliceError(f"{self.path}: tensor {dup!r} is stored in two files")
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
        import torch

        from splice.dtypes import dtype_name, nbytes

        tensors = {}
        for file in bins:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise SpliceError(f"{file}: cannot load with weights_only=True ({e})") from None
            self._pickled[file] = sd
            for name, t in sd.items():
                dt = dtype_name(t.dtype)
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

    @property
    def num_layers(self) -> int:
        """Layers present in the weights (not just claimed by the config)."""
        return len(self.layer_index)

    @property
    def tied(self) -> bool:
        """True when the head reuses the embedding matrix (no ``lm_head`` stored)."""
        return self.arch.is_tied(self.config, self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

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
        import torch

        from splice.dtypes import to_torch

        info = self[name]
        if info.offset < 0:  # pickled weights, already memory-mapped by torch.load
            t = self._pickled[info.file][name].clone()
        else:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            if info.nbytes:
                pread_into(self._fd(info.file), memoryview(buf.numpy()), info.offset)
            t = buf.view(to_torch(info.dtype)).reshape(info.shape)
        if dtype is not None or device is not None:
            t = t.to(device=device, dtype=to_torch(dtype) if dtype is not None else None)
        return t

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
            if reference is None:
                reference = shapes
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

    Only safetensors, JSON and tokenizer files are fetched (plus ``.bin`` if pickle is allowed).
    """
    path = Path(ref)
    if path.exists() or not _HUB_ID.match(str(ref)):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
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
    except HfHubHTTPError as e:
        raise SpliceError(f"{ref}: hub download failed ({e})") from None
    except OSError as e:
        raise SpliceError(f"{ref}: cannot fetch from the hub ({e})") from None


def open_checkpoint(ref: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
    """Open a model folder or hub id as a lazy :class:`Checkpoint`."""
    return Checkpoint(resolve(ref, allow_pickle=allow_pickle), allow_pickle=allow_pickle)
