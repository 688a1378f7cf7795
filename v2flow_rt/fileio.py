"""Writing files and folders so that no reader, crash or second writer ever sees half of one. Stdlib only.

- ``atomic_write`` (and ``atomic_write_text`` / ``atomic_write_bytes``): a temp file in the target's
  folder, fsynced, given the mode a plain ``open`` would (``0o666 & ~umask``, not mkstemp's 0600), then
  ``os.replace``: the target is the old file or the new one, never a mix.
- ``staged_folder(dest)``: a context manager that yields a fresh ``.NAME.partial-PID-XXXX`` folder beside
  ``dest`` and, once the block succeeds, swaps it into place (``swap_folder``); on an error it is deleted.
  It holds ``writer_lock(dest)`` meanwhile.
- ``writer_lock(dest)``: an advisory lock (``fcntl.flock`` on ``.NAME.lock`` beside ``dest``, holding the
  writer's pid) that refuses a second concurrent writer with ``BusyError``. The kernel releases a flock when
  its holder dies, so a ``kill -9`` never leaves a lock that blocks the next writer; that next writer
  also deletes the partial folders a dead writer left (``.NAME.partial-PID-*`` of a pid that is gone) and
  says so on stderr.
- ``file_sha256``: the one file hash of the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BusyError, V2FlowError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, writers are not serialised
    fcntl = None  # type: ignore[assignment]

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- files

def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (graphs can be several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: PathLike, write: Callable[[Path], object], *, mode: int | None = None) -> Path:
    """Fill ``path`` through ``write(tmp)``, which writes a temp file in the same folder; then fsync it,
    give it ``mode`` (default ``0o666 & ~umask``, what ``open`` would give) and rename it over ``path``.

    The parent folder must exist. A failure (or Ctrl-C) deletes the temp file and leaves ``path`` as it was.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str, *, mode: int | None = None) -> Path:
    """``atomic_write`` of UTF-8 text."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), mode=mode)


def atomic_write_bytes(path: PathLike, data: bytes | memoryview, *, mode: int | None = None) -> Path:
    """``atomic_write`` of bytes."""
    return atomic_write(path, lambda p: p.write_bytes(data), mode=mode)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse to open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- folders

def swap_folder(src: PathLike, dest: PathLike) -> None:
    """Put the finished folder ``src`` in place of ``dest``: an existing ``dest`` is renamed aside first,
    deleted last, and put back if the second rename fails. A reader sees the old folder or the new one."""
    src, dest = Path(src), Path(dest)
    if not dest.exists():
        os.replace(src, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_parent(dest: Path) -> None:
    """Create ``dest``'s parent, or raise an error that names the path in the way."""
    for p in [dest.parent, *dest.parent.parents]:
        if p.exists() and not p.is_dir():
            raise V2FlowError(f"cannot write {dest}: {p} is a file, not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)


_HELD: dict[Path, int] = {}   # lock path → depth, for the locks this process holds (writer_lock is reentrant)


@contextlib.contextmanager
def writer_lock(dest: PathLike) -> Iterator[None]:
    """Hold the writer's lock on ``dest`` (``.NAME.lock`` beside it) for the block; BusyError if another
    live process holds it. Reentrant within a process. On entry, partial folders of dead writers are removed."""
    dest = Path(dest)
    _check_parent(dest)
    lock = dest.parent / f".{dest.name}.lock"
    key = lock.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(lock, dest)
    _HELD[key] = 1
    try:
        clean_stale(dest)
        yield
    finally:
        del _HELD[key]
        lock.unlink(missing_ok=True)   # unlink before unlocking: a waiter re-checks the inode (see _acquire)
        os.close(fd)


def _acquire(lock: Path, dest: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        if fcntl is None:   # pragma: no cover
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise BusyError(f"{dest} is being written by another process (pid {holder}, lock {lock}); wait for it "
                            f"to finish or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:        # not a lock file its previous holder unlinked while we waited to open it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


_PARTIAL = re.compile(r"\.(partial|old)-(\d+)-")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def clean_stale(dest: PathLike) -> list[Path]:
    """Delete what dead writers of ``dest`` left beside it; call with ``writer_lock(dest)`` held.

    ``.NAME.partial-PID-*`` folders of a pid that no longer runs are deleted. A ``.NAME.old-PID-*`` folder
    (the previous version, moved aside by a swap that was killed half way) is put back as ``dest`` when
    ``dest`` is missing, and deleted otherwise. Each action is said in one line on stderr."""
    dest = Path(dest)
    done: list[Path] = []
    prefix = f".{dest.name}."
    try:
        entries = sorted(p for p in dest.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return done
    for p in entries:
        m = _PARTIAL.match(p.name[len(prefix) - 1:])
        if m is None or not p.is_dir() or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not dest.exists():
            os.replace(p, dest)
            print(f"v2flow-rt: restored {dest} from {p.name}, left by an interrupted writer (pid {m.group(2)})",
                  file=sys.stderr)
        else:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            print(f"v2flow-rt: removed {p} ({size / 1e6:.1f} MB), left by an interrupted writer (pid {m.group(2)})",
                  file=sys.stderr)
        done.append(p)
    return done


@contextlib.contextmanager
def staged_folder(dest: PathLike, *, keep: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty ``.NAME.partial-PID-XXXX`` folder beside ``dest`` (mode ``0o777 & ~umask``); when the
    block returns, swap it into place of ``dest`` (``swap_folder``); when it raises, delete it.

    ``keep(dest)`` runs just before the swap, with the lock held: it may raise to refuse replacing what
    ``dest`` holds (e.g. a folder that is not an earlier output). ``writer_lock(dest)`` is held throughout.
    """
    dest = Path(dest)
    with writer_lock(dest):
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-{os.getpid()}-"))
        try:
            os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp makes it owner-only; outputs are meant to be shared
            yield tmp
            if keep is not None:
                keep(dest)
            swap_folder(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
