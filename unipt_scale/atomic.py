"""Atomic, durable file writes: a reader sees the old file or the new one, never a torn one.

Files and staging directories get the mode the process umask gives (as `open()` and `os.makedirs` would), not
the 0600 / 0700 of `tempfile`: one output directory holds no files of mixed modes.
"""
from __future__ import annotations

import json
import os
import tempfile


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (changing it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str, prefix: str) -> str:
    """`tempfile.mkdtemp` (a unique name, no race) with the mode a plain `os.makedirs` would give."""
    path = tempfile.mkdtemp(dir=parent, prefix=prefix)
    os.chmod(path, 0o777 & ~current_umask())
    return path


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(str(path), text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_tensors_file(tensors, path: str, metadata=None) -> None:
    """safetensors' save_file, with the mode the umask gives (it writes 0600 through a temporary file)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())
