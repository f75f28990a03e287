"""Streaming, atomic checkpoint writer.

The output's tensor list is known before any data is computed (a merge, a conversion or a
surgery plans its output first), so :class:`CheckpointWriter` lays out size-capped safetensors
shards up front, writes their headers, and then places each tensor at its planned offset with
``pwrite`` as soon as it is ready, in any order and from any thread. Memory holds one tensor at a
time, never a shard.

Everything goes into a hidden temporary folder beside the target
(``.NAME.splice-tmp-XXXX``); ``config.json`` and the index are written last and the folder is
renamed into place only when every planned tensor has been written. A crash, an exception or
Ctrl-C leaves no folder at the target path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.checkpoint import INDEX, SINGLE, TOKENIZER_FILES, Checkpoint
from splice.dtypes import dtype_name, nbytes, parse_size, to_torch
from splice.errors import SpliceError
from splice.st_format import copy_range, encode_header, pwrite_all

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_SIZE = "2GB"


@dataclass(frozen=True)
class TensorSpec:
    """One planned output tensor: name, shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int
    spec: TensorSpec


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy split in order: a shard closes when the next tensor would pass the cap.

    A tensor larger than the cap gets a shard of its own. Within a shard, tensors are ordered by
    element size (largest first, stable) so every tensor stays aligned to its element size.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [sorted(s, key=lambda t: -nbytes((), t.dtype)) for s in shards]


def shard_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-0000k-of-0000n.safetensors``."""
    if count == 1:
        return [SINGLE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def check_target(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Validate an output path before any work: ``SpliceError`` if it exists and may not go."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SpliceError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise SpliceError(f"{out}: exists and is not a folder")
    return out


def _umask() -> int:
    try:  # read, not set: setting it would race with threads creating files
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(target: Path, tag: str) -> Path:
    """A hidden empty folder beside ``target`` to build it in, then rename onto it.

    Made by ``mkdtemp`` (a unique name), then given the permissions ``mkdir`` would give
    (``0o777 & ~umask``) rather than mkdtemp's private 0o700, so the renamed output is as
    readable as any other folder the user makes.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


class CheckpointWriter:
    """Write a model folder atomically (see the module docstring).

    Usage::

        with CheckpointWriter(out, specs, max_shard_size="2GB") as w:
            for spec in specs:
                w.write(spec.name, compute(spec.name))
            w.write_config(config)
            w.copy_tokenizer(source_folder)
            w.write_card(text)
        # the folder appears at `out` here, complete
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        *,
        max_shard_size: str | int = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out = check_target(out, overwrite)
        self.overwrite = overwrite
        specs = [TensorSpec(s.name, tuple(s.shape), dtype_name(s.dtype)) for s in specs]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor {dup!r} planned twice")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = staging_dir(self.out, "splice-tmp")
        self._lock = threading.Lock()
        self._written: set[str] = set()
        self._config_written = False
        self._closed = False
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        try:
            shards = plan_shards(specs, parse_size(max_shard_size))
            self.shard_files = shard_names(len(shards))
            meta = {"format": "pt", **(metadata or {})}
            for k, shard in enumerate(shards):
                header, offsets = encode_header([(s.name, s.shape, s.dtype) for s in shard], meta)
                fd = os.open(self.tmp / self.shard_files[k], os.O_RDWR | os.O_CREAT, 0o644)
                self._fds.append(fd)
                pwrite_all(fd, memoryview(header), 0)
                end = offsets[-1] + shard[-1].nbytes if shard else len(header)
                os.ftruncate(fd, end)
                for spec, off in zip(shard, offsets, strict=True):
                    self.slots[spec.name] = _Slot(k, off, spec)
        except BaseException:
            self.abort()
            raise

    # ---- tensors ----------------------------------------------------------------------------
    def _claim(self, name: str) -> _Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} was not planned for this checkpoint")
        with self._lock:
            if name in self._written:
                raise ValueError(f"tensor {name!r} written twice")
            self._written.add(name)
        return slot

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor ``[*shape]``, cast to its planned dtype (thread-safe, any order)."""
        slot = self._claim(name)
        spec = slot.spec
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: shape {list(tensor.shape)}, planned {list(spec.shape)}")
        t = tensor.detach().to(device="cpu", dtype=to_torch(spec.dtype)).contiguous()
        if spec.nbytes:
            import torch

            raw = t.reshape(-1).view(torch.uint8).numpy()
            pwrite_all(self._fds[slot.shard], memoryview(raw), slot.offset)

    def copy(self, name: str, source: Checkpoint, source_name: str | None = None) -> None:
        """Write ``name`` from a checkpoint's tensor ``source_name`` (default: same name).

        Same dtype: the bytes are copied file to file in the kernel, without entering Python.
        Otherwise the tensor is loaded and cast.
        """
        source_name = source_name or name
        info = source[source_name]
        spec = self.slots[name].spec if name in self.slots else None
        if spec is None:
            raise ValueError(f"tensor {name!r} was not planned for this checkpoint")
        if info.dtype != spec.dtype or info.offset < 0 or info.shape != spec.shape:
            self.write(name, source.load(source_name))
            return
        slot = self._claim(name)
        copy_range(
            source._fd(info.file), info.offset, self._fds[slot.shard], slot.offset, info.nbytes
        )

    @property
    def missing(self) -> list[str]:
        """Planned tensors not yet written."""
        return [n for n in self.slots if n not in self._written]

    # ---- files ------------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        """Write ``config.json`` (its ``dtype`` keys are set by the caller)."""
        self.write_json("config.json", config)
        self._config_written = True

    def write_json(self, filename: str, data: Any) -> None:
        (self.tmp / filename).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_text(self, filename: str, text: str) -> None:
        (self.tmp / filename).write_text(text)

    def copy_tokenizer(self, source: str | os.PathLike[str] | Checkpoint) -> list[str]:
        """Copy tokenizer and generation files from a model folder; returns the names copied."""
        folder = source.path if isinstance(source, Checkpoint) else Path(source)
        copied = []
        for fname in TOKENIZER_FILES:
            if (folder / fname).is_file():
                shutil.copy2(folder / fname, self.tmp / fname)
                copied.append(fname)
        return copied

    def write_card(self, text: str) -> None:
        """Write the model card ``README.md``."""
        self.write_text("README.md", text)

    # ---- finish -----------------------------------------------------------------------------
    def close(self) -> Path:
        """Check completeness, write the index, and rename the folder into place."""
        if self._closed:
            return self.out
        missing = self.missing
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written: {missing[:3]}")
        if not self._config_written:
            raise RuntimeError("config.json was never written")
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if len(self.shard_files) > 1:
            weight_map = {n: self.shard_files[s.shard] for n, s in sorted(self.slots.items())}
            total = sum(s.spec.nbytes for s in self.slots.values())
            self.write_json(INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise SpliceError(f"{self.out}: appeared while writing; output left in {self.tmp}")
            old = self.out.with_name(f".{self.out.name}.splice-old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._closed = True
        return self.out

    def abort(self) -> None:
        """Delete the temporary folder (the target is untouched)."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
