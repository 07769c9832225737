"""Small helpers every stage shares: the user-facing error type, atomic writes, content hashes, plain
copies and folder locks.

Import these; do not write a second ``atomic_write`` anywhere else in the project.

Permissions: everything these helpers publish gets the mode a plain ``open``/``mkdir`` would give under
the process umask (0644 files and 0755 folders under umask 022), although ``mkstemp``/``mkdtemp`` create
0600/0700 temporaries. A cache or a student written by one user stays readable by the others on shared
storage unless the umask says otherwise.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

import xxhash


class UserError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits with 2.

    The message should say what is wrong and what to do about it.
    """


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a mode is at stake)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file under the current umask, as ``open`` gives it (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask, as ``mkdir`` gives it (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def make_temp_dir(prefix: str, dir: str | os.PathLike) -> Path:
    """``mkdtemp`` beside its final place, with the mode ``mkdir`` would give (not 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(tmp, dir_mode())
    return tmp


def apply_umask_tree(path: str | os.PathLike) -> None:
    """Give ``path`` and everything under it the modes ``open``/``mkdir`` would give under the umask.

    Temporaries (``mkstemp`` 0600, ``mkdtemp``/``TemporaryDirectory`` 0700) and trees copied from them keep
    their private modes otherwise. Executable files keep their execute bits (as far as the umask allows).
    """
    fmode, dmode = file_mode(), dir_mode()
    path = Path(path)
    if path.is_file():
        os.chmod(path, dmode if path.stat().st_mode & 0o111 else fmode)
        return
    for folder, _dirs, names in os.walk(path):
        os.chmod(folder, dmode)
        for name in names:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                os.chmod(p, dmode if os.stat(p).st_mode & 0o111 else fmode)


def copy_tree_plain(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the files under ``src`` into ``dst`` (created if missing; existing files replaced) with the modes
    a plain ``open``/``mkdir`` gives under the umask, never the source's: a tokenizer attached to a read-only
    cache (``chmod -R a-w``) becomes writable files of the output folder, as ``shutil.copytree`` (which copies
    the source's modes, also onto ``dst`` itself) would not. Symlinks are followed; executable bits kept."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for folder, dirs, names in os.walk(src, followlinks=True):
        rel = Path(folder).relative_to(src)
        for d in dirs:
            (dst / rel / d).mkdir(exist_ok=True)
        for name in names:
            target = dst / rel / name
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                target.unlink()
            shutil.copyfile(os.path.join(folder, name), target)  # contents only: a new file, umask modes
            if os.stat(os.path.join(folder, name)).st_mode & 0o111:
                os.chmod(target, dir_mode())


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and folder under ``path`` (a folder about to be renamed into place)."""
    for folder, _dirs, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp gives 0600; publish with the mode open() would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a fully written directory ``src`` to ``dst`` (same filesystem), replacing any old ``dst``.

    Files inside ``src`` must already be fsynced. An old ``dst`` is renamed aside first and removed after,
    so ``dst`` never holds a mix of old and new files. The tree gets the umask's modes (``apply_umask_tree``)
    before it is published.
    """
    src, dst = Path(src), Path(dst)
    apply_umask_tree(src)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_hash(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """xxh3-128 of a file's bytes, as ``"xxh3_128:<hex>"``."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "xxh3_128:" + h.hexdigest()


def tree_files(root: Path, base: Path, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``[{path, bytes, hash}]`` of every file under ``root`` (a file or a folder), paths relative to
    ``base``, sorted; relative paths in ``skip`` are left out (e.g. the manifest that lists the others)."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    rels = [(p, p.relative_to(base).as_posix()) for p in paths]
    return [{"path": rel, "bytes": p.stat().st_size, "hash": file_hash(p)}
            for p, rel in rels if rel not in skip]


def bytes_hash(data: bytes) -> str:
    return "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def json_hash(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return bytes_hash(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


# ----------------------------------------------------------------------------------------------------------
# Folder locks


class Locked(UserError):
    """Another live process holds the lock (the message names it)."""


def _holder_text(path: Path) -> str:
    """Who holds the lock file at ``path``, from what its holder wrote into it."""
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}"
                + (f": {info['command']}" if info.get("command") else ""))
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet: it is starting"


_HELD: weakref.WeakSet[FolderLock] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, a multiprocessing fork): close the copies of the parent's
    lock files without unlocking them, so that a trainer killed with -9 frees its folder at once instead of
    when its last worker has exited."""
    for lock in list(_HELD):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None


os.register_at_fork(after_in_child=_drop_inherited_locks)


class FolderLock:
    """An exclusive ``flock`` on the file ``path``, held until ``release`` or the end of the process.

    The kernel drops the lock when its holder dies (also on ``kill -9``), so no stale lock ever survives a
    crash, unlike a pid file; forked children (DataLoader workers) close their inherited copy at once, so
    they never keep a dead holder's lock alive. The holder writes its host, pid, start time and ``command``
    into the file, so a refused process names it: ``Locked`` (a ``UserError``) with ``"{busy} ({holder});
    {advice}"``. One lock file serves every process that writes the folder it guards (stage one: one per
    rank; stage two, the demo and the study: ``RUN_LOCK`` in the run folder, taken by one process). A lock
    file on NFS needs a server with working ``flock`` (NFSv4; Linux clients emulate it with byte-range
    locks)."""

    def __init__(self, path: str | os.PathLike, *, busy: str, advice: str, command: str = ""):
        self.path = Path(path)
        self.fd: int | None = None
        self._writable = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides the mode
                writable = True
            except PermissionError:  # a lock file of another user: flock needs no write access
                fd = os.open(self.path, os.O_RDONLY)
                writable = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise Locked(f"{busy} ({_holder_text(self.path)}); {advice}") from None
                raise
            try:  # locked the file its last holder had just removed (release(remove=True)): open it anew
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        self._writable = writable
        _HELD.add(self)
        if writable:
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            info = {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                    "command": command or " ".join(os.path.basename(a) for a in sys.argv[:2])}
            data = (json.dumps(info) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self, remove: bool = False) -> None:
        """Give the lock up and clear the holder record; ``remove`` deletes the lock file instead (safe: a
        process that opened it before finds it gone once it holds the lock, and opens the path anew)."""
        if self.fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            elif self._writable:
                os.ftruncate(self.fd, 0)  # no stale holder for the next one's first microseconds
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # an abandoned lock object must not keep its folder locked
        try:
            self.release()
        except Exception:  # at interpreter exit modules may be gone; the kernel releases the lock anyway
            pass

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


RUN_LOCK = "run.lock"


def lock_run_folder(folder: str | os.PathLike, command: str) -> FolderLock:
    """Lock the run folder ``folder`` (created if missing) for ``command`` (``train-student``, ``demo``,
    ``study``) for the life of this process, or ``Locked`` naming the process that holds it. Two processes
    writing one run folder (a requeued job and its still-running predecessor, a ``--resume`` started by
    hand) would log every step twice and replace each other's checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FolderLock(folder / RUN_LOCK, busy=f"{folder} is in use by another {command} process",
                      advice="wait for it to finish or stop it, or choose another output folder",
                      command=command)
