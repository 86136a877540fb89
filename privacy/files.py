"""Atomic file writes: a temp file in the same folder, fsync, rename (and fsync of the folder). A reader never sees
half a file and a crash leaves the old one or the new one. Every file the pipeline writes goes through here."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, mode: int | None = None) -> Path:
    """Call `write(file)` on a temp file beside `path`, then make it `path` in one rename. `mode`: the file's
    permissions (default: the temp file's 0600 widened to the umask's usual 0644 unless given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644 if mode is None else mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_directory(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")), mode=mode)


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    return atomic_write(path, lambda file: file.write(data), mode=mode)


def torch_save(obj, path: str | os.PathLike, *, mode: int | None = None) -> Path:
    """`torch.save(obj, path)`, atomically."""
    return atomic_write(path, lambda file: torch.save(obj, file), mode=mode)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_of(path: str | os.PathLike, key: bytes | None = None) -> str:
    """Content hash of a file, or of a folder (relative names and bytes of every file, in sorted order). With `key`:
    keyed (HMAC-SHA256, privacy.fingerprint), for files derived from private data whose plain hash would let anyone
    who can rebuild the file from a guess test that guess."""
    path = Path(path)
    if key is None:
        digest = hashlib.sha256()
    else:
        from privacy.fingerprint import KeyedDigest

        digest = KeyedDigest(key, "dpcompress.file/1")
    found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in found:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
