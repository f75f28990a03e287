"""The safetensors file format, read and written by hand.

A file is ``u64 little-endian header length N | N bytes of JSON header | data``. The header maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the start of
the data, plus an optional ``"__metadata__"`` string map. splice parses headers itself so that it
can list a checkpoint without importing torch, validate a header with a precise message, and
read or write one tensor at a time with plain ``pread``/``pwrite`` (no mmap, so resident memory
never grows with the model's size).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from splice.dtypes import NAME_TO_CODE, SAFETENSORS_DTYPES
from splice.errors import SpliceError

MAX_HEADER = 100 * 2**20  # the reference implementation's limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, byte count, shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch name, e.g. "bfloat16"
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ``({name: TensorInfo}, metadata)``.

    Reads only the header bytes. Any inconsistency (truncated file, bad JSON, unknown dtype,
    offsets outside the file, overlapping or gapped data) is a :class:`SpliceError`.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SpliceError(f"{path}: corrupt safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise SpliceError(
                    f"{path}: corrupt safetensors header (claims {n} header bytes in a "
                    f"{size}-byte file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise SpliceError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SpliceError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SpliceError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if code not in SAFETENSORS_DTYPES:
            raise SpliceError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        dtype, itemsize = SAFETENSORS_DTYPES[code]
        expected = itemsize
        for d in shape:
            if d < 0:
                raise SpliceError(f"{path}: tensor {name!r} has negative dimension in {shape}")
            expected *= d
        if not (0 <= begin <= end <= data_len) or end - begin != expected:
            raise SpliceError(
                f"{path}: corrupt safetensors header: tensor {name!r} {list(shape)} {dtype} "
                f"spans bytes {begin}..{end} of {data_len} (needs {expected})"
            )
        infos[name] = TensorInfo(name, shape, dtype, path, start + begin, end - begin)
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise SpliceError(f"{path}: corrupt safetensors header: tensor {name!r} {what}")
        pos = end
    if pos != data_len:
        raise SpliceError(
            f"{path}: corrupt safetensors file: data is {data_len} bytes, header covers {pos} "
            "(truncated or padded)"
        )
    # keep the file's own order (by offset): it is the order a writer chose
    ordered = {name: infos[name] for _, _, name in spans}
    return ordered, {str(k): str(v) for k, v in metadata.items()}


def encode_header(
    entries: list[tuple[str, tuple[int, ...], str]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """Header bytes for tensors laid out back to back in the given order.

    ``entries`` are ``(name, shape, dtype name)``. Returns the full prefix (length + JSON, padded
    with spaces to a multiple of 8 so data stays aligned) and each tensor's byte offset from the
    start of the file.
    """
    from splice.dtypes import nbytes

    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    rel = []
    pos = 0
    for name, shape, dtype in entries:
        size = nbytes(shape, dtype)
        header[name] = {
            "dtype": NAME_TO_CODE[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + size],
        }
        rel.append(pos)
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, [len(prefix) + r for r in rel]


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (thread-safe; loops over short reads)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise SpliceError(f"unexpected end of file reading {len(buf)} bytes at {offset}")
        done += n


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` to ``fd`` at ``offset`` (thread-safe; loops over short writes)."""
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    """Copy bytes between files in the kernel where possible (``copy_file_range``)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < count:
                n = os.copy_file_range(
                    src_fd, dst_fd, count - done, src_offset + done, dst_offset + done
                )
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # e.g. across filesystems on old kernels: fall back below
    chunk = 16 * 2**20
    while done < count:
        n = min(chunk, count - done)
        data = os.pread(src_fd, n, src_offset + done)
        if not data:
            raise SpliceError("unexpected end of file while copying tensor data")
        pwrite_all(dst_fd, memoryview(data), dst_offset + done)
        done += len(data)
