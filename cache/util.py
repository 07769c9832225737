"""Small helpers every stage shares: the user-facing error type, atomic writes and content hashes.

Import these; do not write a second ``atomic_write`` anywhere else in the project.
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
    so ``dst`` never holds a mix of old and new files.
    """
    src, dst = Path(src), Path(dst)
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


def bytes_hash(data: bytes) -> str:
    return "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def json_hash(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return bytes_hash(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
