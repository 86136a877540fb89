"""Keyed fingerprints of private data: HMAC-SHA256 under a secret key that stays with the data owner.

A plain hash of a dataset lets anyone who knows all records but one test guesses for the missing one; an HMAC under
a key they do not hold does not. The key is created once per user in the owner's state folder ($DPCOMPRESS_HOME,
default ~/.dpcompress), owner-only, and never logged. Same data and key: same fingerprint, so caches still work.
Not here: what is fingerprinted (compression.data) or where fingerprints are published (tasks/).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

HOME_ENV = "DPCOMPRESS_HOME"
KEY_FILE = "fingerprint.key"
KEY_BYTES = 32


def owner_home() -> Path:
    """The data owner's state folder: $DPCOMPRESS_HOME, else ~/.dpcompress."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".dpcompress")


def owner_key(home: str | os.PathLike | None = None) -> bytes:
    """The fingerprint key in `home` (default `owner_home()`), created on first use: 32 random bytes from the OS,
    written owner-only (0600, folder 0700) with O_EXCL, so two processes starting at once agree on one key."""
    folder = Path(home) if home is not None else owner_home()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(KEY_BYTES))
        handle.flush()
        os.fsync(handle.fileno())
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    for _ in range(100):  # another process may be between creating and writing the file
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
        os.sched_yield()
    raise ValueError(f"{path}: not a {KEY_BYTES}-byte fingerprint key; remove it to create a new one "
                     "(every cached stage and dataset ledger entry keyed by the old one is then orphaned)")


class KeyedDigest:
    """An HMAC-SHA256 that reads like hashlib's objects: `update(bytes)`, then `hexdigest()`."""

    def __init__(self, key: bytes, domain: str):
        if len(key) < 16:
            raise ValueError("a fingerprint key needs at least 16 bytes")
        self._mac = hmac.new(key, domain.encode() + b"\0", hashlib.sha256)

    def update(self, data: bytes) -> None:
        self._mac.update(data)

    def hexdigest(self) -> str:
        return self._mac.hexdigest()


def keyed_hash(key: bytes, text: str, *, domain: str = "dpcompress.row/1") -> str:
    """The keyed hash of one string (e.g. a normalised text, to compare rows across datasets without revealing
    them)."""
    digest = KeyedDigest(key, domain)
    digest.update(text.encode("utf-8"))
    return digest.hexdigest()
