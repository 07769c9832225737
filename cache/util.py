"""Small helpers every stage shares: the user-facing error type, atomic writes and content hashes.

Import these; do not write a second ``atomic_write`` anywhere else in the project.

Permissions: everything these helpers publish gets the mode a plain ``open``/``mkdir`` would give under
the process umask (0644 files and 0755 folders under umask 022), although ``mkstemp``/``mkdtemp`` create
0600/0700 temporaries. A cache or a student written by one user stays readable by the others on shared
storage unless the umask says otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
