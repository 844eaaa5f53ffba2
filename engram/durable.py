"""Crash-safe small files: written whole or not at all, and still there after a power loss once this returns."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_syncfs = getattr(_libc, "syncfs", None)  # Linux (glibc, musl)


def sync_filesystem(path: Path) -> None:
    """Write out every file changed on the filesystem that holds `path` (Linux syncfs(2)): that filesystem only,
    where os.sync() would wait on every disk of the machine. Used at a commit, for the Zarr chunk files written
    since the last one (Zarr does not fsync what it writes). Without syncfs: os.sync()."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str, fsync: bool = True) -> None:
    """Temp file, fsync, rename over `path`, fsync the directory: readers see the old or the new text, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
