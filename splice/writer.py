"""Streaming, atomic checkpoint writer.

The output's tensor list is known before any data is computed (a merge, a conversion or a
surgery plans its output first), so :class:`CheckpointWriter` lays out size-capped safetensors
shards up front, writes their headers, and then places each tensor at its planned offset with
``pwrite`` as soon as it is ready, in any order and from any thread. Memory holds one tensor at a
time, never a shard.

Everything goes into a hidden temporary folder beside the target
(``.NAME.splice-tmp-PID-XXXX``); ``config.json`` and the index are written last and the folder
is swapped into place only when every planned tensor has been written. The target is locked,
checked and replaced as :mod:`splice.target` says (the writer claims the target itself, or is
handed the verb's :class:`splice.target.Claim` and then neither locks nor checks again): a
crash, an exception, Ctrl-C or SIGTERM leaves no folder at the target path, and a full disk is
one line, with nothing written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from splice.checkpoint import INDEX, SINGLE, TOKENIZER_FILES, Checkpoint
from splice.dtypes import dtype_name, nbytes, parse_size, to_torch
from splice.errors import SpliceError
from splice.st_format import copy_range, encode_header, preallocate, pwrite_all
from splice.target import Claim, claim_output, commit, os_error, staging_dir

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
DEFAULT_SHARD_SIZE = "2GB"
#: errno values that mean "the output cannot be written here", not a bug
_OUTPUT_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


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
    """Split ``specs`` in order into as few shards as the cap allows, of about equal size.

    The count is the greedy split's (a shard closes when the next tensor would pass the cap: the
    fewest in-order shards; a tensor larger than the cap gets a shard of its own). Then each
    tensor goes to the shard its middle byte falls in, so a 2.4 GB model under a 2 GB cap is
    two 1.2 GB files, not 2 GB + 0.4 GB: workers writing different files at once overlap (see
    :meth:`CheckpointWriter.interleaved`). Where that would put a shard over the cap, the greedy
    split stays. Within a shard, tensors are ordered by element size (largest first, stable) so
    every tensor stays aligned to its element size.
    """
    greedy: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if greedy[-1] and size + spec.nbytes > max_shard_size:
            greedy.append([])
            size = 0
        greedy[-1].append(spec)
        size += spec.nbytes
    count, total = len(greedy), sum(s.nbytes for s in specs)
    balanced: list[list[TensorSpec]] = [[] for _ in range(count)]
    pos = 0
    for spec in specs:
        k = min(count - 1, (2 * pos + spec.nbytes) * count // (2 * total)) if total else 0
        balanced[k].append(spec)
        pos += spec.nbytes
    balanced = [s for s in balanced if s]
    if any(len(s) > 1 and sum(t.nbytes for t in s) > max_shard_size for s in balanced):
        balanced = greedy
    return [sorted(s, key=lambda t: -nbytes((), t.dtype)) for s in balanced] or [[]]


def shard_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-0000k-of-0000n.safetensors``."""
    if count == 1:
        return [SINGLE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


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

    ``out`` is a path, which the writer claims for itself (:func:`splice.target.claim_output`:
    lock, clean-up, check against ``inputs``), or the verb's :class:`splice.target.Claim`,
    taken before its work began: then only ``inputs`` the claim has not checked yet are
    checked, and ``overwrite`` is the claim's.
    """

    def __init__(
        self,
        out: str | os.PathLike[str] | Claim,
        specs: Iterable[TensorSpec],
        *,
        max_shard_size: str | int = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
        inputs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        specs = [TensorSpec(s.name, tuple(s.shape), dtype_name(s.dtype)) for s in specs]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor {dup!r} planned twice")
        self._closed = True  # until the folder exists: abort() has nothing to undo
        self._fds: list[int] = []
        self._stack = contextlib.ExitStack()
        try:
            claim = self._stack.enter_context(claim_output(out, overwrite, inputs=inputs))
            self.out = claim.path
            self.overwrite = claim.overwrite
            self.tmp = staging_dir(self.out, "splice")
        except BaseException:
            self._stack.close()
            raise
        self._closed = False
        self._lock = threading.Lock()
        self._written: set[str] = set()
        self._config_written = False
        self.slots: dict[str, _Slot] = {}
        try:
            shards = plan_shards(specs, parse_size(max_shard_size))
            self.shard_files = shard_names(len(shards))
            meta = {"format": "pt", **(metadata or {})}
            with self._io():
                for k, shard in enumerate(shards):
                    entries = [(s.name, s.shape, s.dtype) for s in shard]
                    header, offsets = encode_header(entries, meta)
                    fd = os.open(self.tmp / self.shard_files[k], os.O_RDWR | os.O_CREAT, 0o644)
                    self._fds.append(fd)
                    pwrite_all(fd, memoryview(header), 0)
                    end = offsets[-1] + shard[-1].nbytes if shard else len(header)
                    preallocate(fd, end)
                    for spec, off in zip(shard, offsets, strict=True):
                        self.slots[spec.name] = _Slot(k, off, spec)
        except BaseException:
            self.abort()
            raise

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """Turn a failed write into the output (full disk, read-only, no permission) into one
        ``SpliceError`` line; the caller's abort then removes everything written."""
        try:
            yield
        except OSError as e:
            if e.errno in _OUTPUT_FAULTS:
                raise os_error(self.out, e, "write") from None
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
            with self._io():
                pwrite_all(self._fds[slot.shard], memoryview(raw), slot.offset)

    def copy(self, name: str, source: Checkpoint, source_name: str | None = None) -> None:
        """Write ``name`` from a checkpoint's tensor ``source_name`` (default: same name).

        Same dtype: the bytes are copied file to file in the kernel, without entering Python.
        Otherwise the tensor is loaded and cast.
        """
        source_name = source_name or name
        info = source.stored_info(source_name)
        spec = self.slots[name].spec if name in self.slots else None
        if spec is None:
            raise ValueError(f"tensor {name!r} was not planned for this checkpoint")
        if info.dtype != spec.dtype or not info.readable or info.shape != spec.shape:
            self.write(name, source.load(source_name))
            return
        slot = self._claim(name)
        src_fd = source._fd(info.file)
        with self._io():
            copy_range(src_fd, info.offset, self._fds[slot.shard], slot.offset, info.nbytes)

    def interleaved(self, items: Sequence[T]) -> list[T]:
        """``items`` (anything with a planned ``.name``) taken from each shard in turn.

        A file system serialises buffered writes to one file (ext4 holds the inode lock), so
        workers that write different shards at once overlap where workers on one shard queue.
        """
        by_shard: dict[int, list[T]] = {}
        for item in items:
            by_shard.setdefault(self.slots[item.name].shard, []).append(item)
        queues = [by_shard[k] for k in sorted(by_shard)]
        return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]

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
        self.write_text(filename, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_text(self, filename: str, text: str) -> None:
        with self._io():
            (self.tmp / filename).write_text(text)

    def copy_tokenizer(
        self, source: str | os.PathLike[str] | Checkpoint, *, processor: bool = False
    ) -> list[str]:
        """Copy tokenizer and generation files from a model folder (with ``processor``, a
        multimodal model's image and video processor files too); returns the names copied."""
        from splice.multimodal import PROCESSOR_FILES

        folder = source.path if isinstance(source, Checkpoint) else Path(source)
        copied = []
        for fname in TOKENIZER_FILES + (PROCESSOR_FILES if processor else ()):
            if (folder / fname).is_file():
                with self._io():
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
        fds, self._fds = self._fds, []
        with self._io():  # some file systems (NFS) report a full disk only at close
            for fd in fds:
                os.close(fd)
        if len(self.shard_files) > 1:
            weight_map = {n: self.shard_files[s.shard] for n, s in sorted(self.slots.items())}
            total = sum(s.spec.nbytes for s in self.slots.values())
            self.write_json(INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if self.out.exists() and not self.overwrite:
            raise SpliceError(f"{self.out}: appeared while writing; nothing was replaced")
        with self._io():
            commit(self.tmp, self.out, tag="splice")
        self._closed = True
        self._stack.close()
        return self.out

    def abort(self) -> None:
        """Delete the temporary folder (the target is untouched) and release the target."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        if not self._closed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True
        self._stack.close()

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
