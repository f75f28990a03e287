"""Output targets: what a verb may write to, and how it replaces what is there.

Every verb that writes a folder (``convert``, ``merge``, surgery, ``zoo build``, ``evolve``,
``analyze --out``) goes through these functions, which own four promises:

* **Nothing of the user's is destroyed.** ``--overwrite`` replaces only a folder that is
  recognisably a model (``config.json`` plus weights, tokenizer, card and similar files, and
  nothing else), or the verb's own kind of output (an analysis report), or an empty one.
  Never an input of the same run, an ancestor of an input, the current folder or an ancestor
  of it (:func:`check_target`).
* **One writer per target.** An exclusive ``flock`` on ``.NAME.splice-lock`` beside the target
  is taken before any work (:func:`lock_target`); a second run into the same target is refused
  at once.
* **Atomic replacement.** The output is built in ``.NAME.splice-tmp-PID-XXXX`` beside the target
  and swapped in with one ``renameat2(RENAME_EXCHANGE)`` where the file system allows it (else:
  old aside, new in, old deleted). The old folder is removed only after the new one is in place.
* **No litter.** Temporary folders carry their writer's pid in their name; the next run into the
  same target removes those whose process is gone (and puts back an old output whose swap was
  cut short), with a note on stderr.

A verb that writes a model claims its output once, at its start, before any work:
:func:`claim_output` locks, cleans up and checks, and yields a :class:`Claim` that the verb
hands down to the writer (:func:`splice.output.write_model`,
:class:`splice.writer.CheckpointWriter`), which then neither locks nor checks again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from splice.errors import SpliceError

#: file names a model folder may hold (anything else makes --overwrite refuse)
MODEL_FILE_PATTERNS = (
    r".*\.safetensors",
    r".*\.bin",
    r".*\.json",
    r".*\.jinja",
    r".*\.model",  # sentencepiece
    r".*\.tiktoken",
    r"merges\.txt",
    r"vocab\.txt",
    r"README\.md",
    r"LICENSE(\.txt|\.md)?",
    r"\.gitattributes",
    r"(configuration|modeling|tokenization)_\w+\.py",
    r"\.splice-stamp\.json",
)
_MODEL_FILE = re.compile("|".join(f"(?:{p})" for p in MODEL_FILE_PATTERNS))
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<tag>[a-z]+)-(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")


def _note(message: str) -> None:
    print(f"splice: note: {message}", file=sys.stderr, flush=True)


# ---- what may be replaced ---------------------------------------------------------------------
def _is_within(path: Path, folder: Path) -> bool:
    """True if ``path`` is ``folder`` or inside it (both resolved)."""
    return path == folder or folder in path.parents


def replaceable_reason(folder: Path, *, allow: Iterable[str] = ()) -> str | None:
    """Why ``folder`` may NOT be replaced, or ``None`` if it may (an empty or a model folder).

    ``allow`` names extra entries a verb's own output holds (the zoo's model sub-folders).
    """
    extra = set(allow)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        return f"cannot list it ({e.strerror})"
    if not entries:
        return None
    names = {e.name for e in entries}
    if "config.json" not in names and not extra & names:
        return "it is not a model folder (no config.json)"
    for e in entries:
        if e.name in extra:
            continue
        if e.is_dir(follow_symlinks=False):
            return f"it holds a folder {e.name!r} that is not part of a model"
        if not _MODEL_FILE.fullmatch(e.name):
            return f"it holds {e.name!r}, which is not a model file"
    return None


def check_target(
    out: str | os.PathLike[str],
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    allow: Iterable[str] = (),
    replaceable: Callable[[Path], str | None] | None = None,
) -> Path:
    """Validate an output folder before any work; ``SpliceError`` (one line) if it may not be used.

    Refused: an empty path; the current folder or one of its ancestors; an input of the run or
    an ancestor of one; a path whose parent is not a folder; an existing target without
    ``overwrite``; with ``overwrite``, a target that holds anything but a model (see
    :func:`replaceable_reason`), or, given ``replaceable`` (a verb whose output is not a model,
    e.g. an analysis report), anything for which ``replaceable(target)`` names a reason.
    """
    out = _nonempty(out)
    full = Path(os.path.abspath(out))
    real = full.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, real):
        what = "the current folder" if real == cwd else "an ancestor of the current folder"
        raise SpliceError(f"{out}: is {what}; give a new folder as the output")
    _check_inputs(out, real, inputs)
    _missing_parents(out)
    if out.is_symlink() and not out.exists():
        raise SpliceError(f"{out}: is a broken symbolic link")
    if out.exists():
        if not out.is_dir():
            raise SpliceError(f"{out}: exists and is not a folder")
        if not overwrite:
            raise SpliceError(f"{out}: already exists (pass --overwrite to replace it)")
        reason = replaceable(out) if replaceable else replaceable_reason(out, allow=allow)
        if reason is not None:
            raise SpliceError(f"{out}: --overwrite refused: {reason}; nothing was deleted")
    return out


def _check_inputs(out: Path, real: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """``SpliceError`` if ``out`` (resolved: ``real``) is one of ``inputs`` or an ancestor."""
    for ref in inputs:
        inp = Path(ref).resolve()
        if _is_within(inp, real):
            what = "an input of this run" if inp == real else f"an ancestor of the input {ref}"
            raise SpliceError(f"{out}: is {what}; write the output somewhere else")


def _nonempty(out: str | os.PathLike[str]) -> Path:
    if str(out).strip() == "":
        raise SpliceError("output folder is empty: give a folder name")
    return Path(out)


def _missing_parents(out: Path) -> list[Path]:
    """The parents of ``out`` that do not exist yet, nearest first; ``SpliceError`` if the
    nearest existing one is not a folder."""
    full = Path(os.path.abspath(out))
    missing = []
    for up in full.parents:
        if up.exists() or up.is_symlink():
            if not up.is_dir():
                raise SpliceError(f"{out}: cannot be created: {up} is not a folder")
            break
        missing.append(up)
    return missing


# ---- one writer per target --------------------------------------------------------------------
_held: dict[Path, list[int]] = {}  # lock path -> [fd, depth], for re-entrant use in one process
_held_lock = threading.Lock()


def _lock_path(target: Path) -> Path:
    full = Path(os.path.abspath(target))
    return full.with_name(f".{full.name}.splice-lock")


def os_error(target: Path, e: OSError, doing: str) -> SpliceError:
    """One line for an OSError met while writing ``target``."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = mount_point(target)
        return SpliceError(f"no space left on {where} (writing {target}), nothing written")
    return SpliceError(f"{target}: cannot {doing} it: {e.strerror or e}, nothing written")


@contextlib.contextmanager
def lock_target(target: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (re-entrant within one process).

    A second process asking for the same target gets ``SpliceError`` at once. The lock file
    ``.NAME.splice-lock`` is removed on release.
    """
    target = _nonempty(target)
    path = _lock_path(target)
    with _held_lock:
        if path in _held:
            _held[path][1] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield
        finally:
            with _held_lock:
                _held[path][1] -= 1
        return
    created = _missing_parents(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(target, e, "create") from None
    try:
        fd = _acquire(path, target)
    except BaseException:
        _remove_empty(created)
        raise
    with _held_lock:
        _held[path] = [fd, 1]
    try:
        yield
    finally:
        with _held_lock:
            del _held[path]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        _remove_empty(created)  # parents made for an output that was never written


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # nearest first
        try:
            folder.rmdir()
        except OSError:
            return


def _acquire(path: Path, target: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(target, e, "write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise SpliceError(
                f"{target}: another splice run is writing it{who}; wait for it or pick another "
                "output folder"
            ) from None
        # the file we locked must still be the one at `path` (a releasing run unlinks it)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


# ---- staging and stale folders ----------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this process counts; another user's too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove staging folders of ``target`` left by dead processes; returns what was removed.

    A ``-old-`` folder (an output set aside during a swap that was cut short) is put back at
    ``target`` when the target is missing, rather than deleted. Call with the target locked.
    """
    full = Path(os.path.abspath(_nonempty(target)))
    parent = full.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        m = _STAGING.match(entry.name)
        if not m or m["name"] != full.name or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m["pid"])
        if pid_alive(pid):
            continue
        if m["kind"] == "old" and not full.exists():
            os.replace(entry, full)
            _note(f"restored {full} from {entry.name} (a replacement by pid {pid} was cut short)")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            _note(f"removed {entry.name}, left in {parent} by splice process {pid}, which is gone")
    return removed


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


def staging_dir(target: Path, tag: str = "splice") -> Path:
    """A new empty folder ``.NAME.TAG-tmp-PID-XXXX`` beside ``target`` to build it in.

    It gets the permissions ``mkdir`` would give (``0o777 & ~umask``) rather than mkdtemp's
    private 0o700, so the renamed output is as readable as any other folder the user makes.
    """
    full = Path(os.path.abspath(target))
    try:
        full.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{full.name}.{tag}-tmp-{os.getpid()}-", dir=full.parent)
        )
        tmp.chmod(0o777 & ~_umask())
    except OSError as e:
        raise os_error(full, e, "write") from None
    return tmp


# ---- the claim: one run's hold on its output ---------------------------------------------------
class Claim:
    """An output folder claimed for one run by :func:`claim_output`: locked, what killed runs
    left beside it cleaned up, and checked (at once, or by :meth:`check` once the run knows its
    inputs).

    A verb takes its claim at its start, before any work, and hands it down to the writer
    (:func:`splice.output.write_model`, :class:`splice.writer.CheckpointWriter`), which then
    neither locks nor checks again. A claim is a path (``os.fspath(claim)`` is the target's),
    valid while the ``with`` block that took it runs.
    """

    def __init__(
        self,
        path: Path,
        overwrite: bool,
        allow: Iterable[str] = (),
        replaceable: Callable[[Path], str | None] | None = None,
    ) -> None:
        self.path = path
        self.overwrite = overwrite
        self._allow = tuple(allow)
        self._replaceable = replaceable
        self._checked = False
        self._inputs: set[Path] = set()
        self._held = True

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"Claim({str(self.path)!r}, overwrite={self.overwrite})"

    def _require_held(self) -> None:
        if not self._held:
            raise RuntimeError(f"{self.path}: the claim on this output was released")

    def check(self, inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
        """:func:`check_target` the first time; later, only the ``inputs`` not checked before
        (a later step of the run found more: a merge's planned models). Returns the path."""
        self._require_held()
        fresh = [r for r in inputs if Path(r).resolve() not in self._inputs]
        if not self._checked:
            check_target(
                self.path,
                self.overwrite,
                inputs=fresh,
                allow=self._allow,
                replaceable=self._replaceable,
            )
            self._checked = True
        elif fresh:
            _check_inputs(self.path, Path(os.path.abspath(self.path)).resolve(), fresh)
        self._inputs.update(Path(r).resolve() for r in fresh)
        return self.path


@contextlib.contextmanager
def claim_output(
    out: str | os.PathLike[str] | Claim,
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike[str]] | None = None,
    allow: Iterable[str] = (),
    replaceable: Callable[[Path], str | None] | None = None,
) -> Iterator[Claim]:
    """Claim the output folder ``out`` for this run, before any work: lock it
    (:func:`lock_target`: a second run is refused at once), clean up what killed runs left
    (:func:`clean_stale`, first: it may put back an output set aside), and, given ``inputs``,
    check it (:func:`check_target`; without, call :meth:`Claim.check` before writing).
    ``allow`` and ``replaceable`` are :func:`check_target`'s.

    Given a :class:`Claim` (a verb's, handed down), yields it as it is, only checking the
    ``inputs`` it has not seen: a writer takes its claim through here whether it was handed one
    or is called on a path.
    """
    if isinstance(out, Claim):
        if inputs is None:
            out._require_held()
        else:
            out.check(inputs)
        yield out
        return
    with lock_target(out):
        claim = Claim(Path(out), overwrite, allow, replaceable)
        try:
            clean_stale(claim.path)
            if inputs is not None:
                claim.check(inputs)
            yield claim
        finally:
            claim._held = False


# ---- the swap ---------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where it is not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit(tmp: Path, target: Path, *, tag: str = "splice") -> Path:
    """Put the finished folder ``tmp`` at ``target``, replacing what is there; returns target.

    The old folder is deleted only once the new one is in place.
    """
    full = Path(os.path.abspath(target))
    if not full.exists():
        os.replace(tmp, full)
        return Path(target)
    if _exchange(tmp, full):  # tmp now holds the old output
        shutil.rmtree(tmp, ignore_errors=True)
        return Path(target)
    old = Path(tempfile.mkdtemp(prefix=f".{full.name}.{tag}-old-{os.getpid()}-", dir=full.parent))
    os.replace(full, old)  # onto the empty folder mkdtemp made
    try:
        os.replace(tmp, full)
    except OSError:
        os.replace(old, full)  # put the old output back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return Path(target)


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    dev = p.stat().st_dev
    while p != p.parent and p.parent.stat().st_dev == dev:
        p = p.parent
    return p
