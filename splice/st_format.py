"""The safetensors file format, read and written by hand.

A file is ``u64 little-endian header length N | N bytes of JSON header | data``. The header maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the start of
the data, plus an optional ``"__metadata__"`` string map. splice parses headers itself so that it
can list a checkpoint without importing torch, validate a header with a precise message, and
read or write one tensor at a time with plain ``pread``/``pwrite`` (no mmap, so resident memory
never grows with the model's size).
"""

from __future__ import annotations

import errno
import json
import os
import reprlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splice.dtypes import NAME_TO_CODE, SAFETENSORS_DTYPES
from splice.errors import SpliceError

if TYPE_CHECKING:
    from splice.quant import Quantized
    from splice.stored import StoredView

MAX_HEADER = 100 * 2**20  # the reference implementation's limit
MAX_DIM = 2**63 - 1  # torch sizes are int64


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, byte count, shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch name, e.g. "bfloat16"
    file: Path
    offset: int
    nbytes: int
    #: a per-expert part of a tensor stored packed (splice.stored); the bytes at ``offset`` are
    #: the tensor's own only when its layout is contiguous
    view: StoredView | None = None
    #: a logical tensor stored quantized (splice.quant): its format and stored parts; ``shape``,
    #: ``dtype`` and ``nbytes`` are then the dequantized tensor's
    quant: Quantized | None = None

    @property
    def readable(self) -> bool:
        """The tensor is the ``nbytes`` bytes at ``offset`` of ``file`` (a kernel copy can take
        them): not pickled, not a strided part of a packed tensor, not quantized."""
        return (
            self.offset >= 0
            and (self.view is None or self.view.layout.contiguous)
            and self.quant is None
        )

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxlong = 2, 6, 4, 60, 40


def show(value: object, limit: int = 60) -> str:
    """``repr`` of a value read from a file, cut short so that a message stays one short line
    (``reprlib``: a deep or long value is never rendered in full)."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits() (possible in a pickle)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def valid_name(name: object) -> bool:
    """A usable tensor name: a non-empty string of printable characters (no control characters,
    line breaks or lone surrogates, which would break one-line output and UTF-8 files)."""
    return isinstance(name, str) and bool(name) and name.isprintable()


def _is_int(x: object) -> bool:
    """A JSON integer (``true``/``false`` and floats such as ``1.0`` or ``1e400`` are not)."""
    return isinstance(x, int) and not isinstance(x, bool)


_KINDS: dict[type, str] = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def json_kind(x: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return _KINDS.get(type(x), type(x).__name__)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` hook: an object with a repeated key is corrupt (which one would win?)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {show(key)} appears twice")
        out[key] = value
    return out


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ``({name: TensorInfo}, metadata)``.

    Reads only the header bytes. Any inconsistency (truncated file, a header that is not UTF-8
    JSON, a field of the wrong type, an unknown dtype, offsets outside the file, overlapping or
    gapped data) is a one-line :class:`SpliceError` naming the file and the field.
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
        raise SpliceError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise SpliceError(f"{path}: corrupt safetensors file (truncated while reading)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpliceError(f"{path}: corrupt safetensors header (not UTF-8: {e.reason})") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError as e:  # JSONDecodeError, a repeated key, an integer of > 4300 digits
        raise SpliceError(f"{path}: corrupt safetensors header ({e})") from None
    except RecursionError:
        raise SpliceError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise SpliceError(
            f"{path}: corrupt safetensors header ({json_kind(header)}, not an object)"
        )
    metadata = _metadata(path, header.pop("__metadata__", None))
    start = 8 + n
    data_len = size - start
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info = _entry(path, name, entry, start, data_len)
        infos[name] = info
        spans.append((info.offset - start, info.offset - start + info.nbytes, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise SpliceError(f"{path}: corrupt safetensors header: tensor {show(name)} {what}")
        pos = end
    if pos != data_len:
        raise SpliceError(
            f"{path}: corrupt safetensors file: data is {data_len} bytes, header covers {pos} "
            "(truncated or padded)"
        )
    # keep the file's own order (by offset): it is the order a writer chose
    ordered = {name: infos[name] for _, _, name in spans}
    return ordered, metadata


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    """The ``__metadata__`` field: absent, null or an object of strings."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise SpliceError(
            f"{path}: corrupt safetensors header: __metadata__ is {json_kind(metadata)}, "
            "not an object of strings"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise SpliceError(
                f"{path}: corrupt safetensors header: __metadata__[{show(key)}] is "
                f"{json_kind(value)}, not a string"
            )
    return dict(metadata)  # type: ignore[arg-type]


def _entry(path: Path, name: str, entry: object, start: int, data_len: int) -> TensorInfo:
    """One tensor's entry, checked field by field against a data section of ``data_len`` bytes."""
    where = f"{path}: corrupt safetensors header: tensor {show(name)}"
    if not valid_name(name):
        raise SpliceError(f"{path}: corrupt safetensors header: invalid tensor name {show(name)}")
    if not isinstance(entry, dict):
        raise SpliceError(f"{where} is {json_kind(entry)}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise SpliceError(f"{where} has no {key!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str):
        raise SpliceError(f"{where}: dtype is {json_kind(code)}, not a string")
    if code not in SAFETENSORS_DTYPES:
        raise SpliceError(f"{path}: tensor {show(name)} has unsupported dtype {show(code)}")
    if not isinstance(shape, list):
        raise SpliceError(f"{where}: shape is {json_kind(shape)}, not a list")
    for d in shape:
        if not _is_int(d):
            raise SpliceError(f"{where}: shape has {json_kind(d)} {show(d)}, not an integer")
        if not 0 <= d <= MAX_DIM:
            raise SpliceError(f"{where}: shape has dimension {show(d)} (0..2**63-1 allowed)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise SpliceError(f"{where}: data_offsets is {show(offsets)}, not [begin, end] integers")
    begin, end = offsets
    dtype, itemsize = SAFETENSORS_DTYPES[code]
    expected = 0 if 0 in shape else itemsize
    for d in shape:
        expected *= d
        if expected > data_len:  # stop early: a crafted shape could make a huge product
            break
    if not (0 <= begin <= end <= data_len) or end - begin != expected:
        needs = f"more than {data_len}" if expected > data_len else str(expected)
        raise SpliceError(
            f"{where} {show(shape)} {dtype} spans bytes {show(begin, 24)}..{show(end, 24)} of "
            f"{data_len} (needs {needs})"
        )
    return TensorInfo(name, tuple(shape), dtype, path, start + begin, end - begin)


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


_libc_fallocate = None  # libc's fallocate(2), looked up on first use; False where there is none
#: errno values of fallocate(2) that mean "not on this file system", not "no room": go sparse
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV}


def _fallocate(fd: int, size: int) -> int:
    """Linux ``fallocate(fd, 0, 0, size)``: 0, or the errno (``ENOSYS`` where libc has none)."""
    global _libc_fallocate
    import ctypes

    if _libc_fallocate is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "fallocate64", None) or libc.fallocate
        except (OSError, AttributeError, TypeError):  # not a Linux libc
            _libc_fallocate = False
        else:
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _libc_fallocate = fn
    if not _libc_fallocate:
        return errno.ENOSYS
    while _libc_fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return err
    return 0


def preallocate(fd: int, size: int) -> None:
    """Make the file ``fd`` ``size`` bytes long, reserving its blocks where the file system can.

    ``fallocate(2)``, never glibc's ``posix_fallocate`` (which emulates it by writing a byte per
    block): a full disk fails here, before any tensor is written, and on ext4 the copies that
    follow run ~20% faster than into a sparse file (no delayed-allocation reservation per page).
    Where the file system has no ``fallocate`` (or the OS), a sparse ``ftruncate``.
    """
    if size > os.fstat(fd).st_size:
        err = _fallocate(fd, size)
        if err == 0:
            return
        if err not in _NO_FALLOCATE:
            raise OSError(err, os.strerror(err))
    os.ftruncate(fd, size)


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
