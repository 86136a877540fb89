"""Where the randomness of every DP release comes from: noise, Poisson sampling, one-shot statistics releases.

The guarantee assumes that nobody can predict these draws, so by default every generator is seeded from the
operating system's entropy (`secrets`), never from the (published) config. A seed exists only inside the process and
in the stage's crash checkpoint (owner-only file, deleted when the stage finishes). `seeded` is a test mode: draws
reproducible from the config, and therefore NO differential-privacy guarantee. Not here: the mechanisms themselves.
"""
from __future__ import annotations

import secrets

import torch

# secret: OS-seeded generators; secure: OS-seeded and Opacus' secure Gaussian sampling (a sum of four draws, against
# the floating-point attack on the Gaussian mechanism, Mironov 2012); seeded: reproducible test mode, no guarantee.
NOISE_SOURCES = ("secret", "secure", "seeded")


def secret_seed() -> int:
    """A 63-bit seed from the operating system's entropy pool."""
    return secrets.randbits(63)


def make_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or from the OS when `seed` is None (the default for every DP release)."""
    return torch.Generator().manual_seed(secret_seed() if seed is None else int(seed))


def noise_source(*, secure_mode: bool, seeded: bool) -> str:
    """The ledger's name for where a release's noise came from (one of NOISE_SOURCES)."""
    if seeded and secure_mode:
        raise ValueError("seeded (reproducible) noise and secure_mode exclude each other")
    return "seeded" if seeded else "secure" if secure_mode else "secret"


def has_guarantee(source: str) -> bool:
    """Whether a release with this noise source carries its DP guarantee (seeded noise does not)."""
    if source not in NOISE_SOURCES:
        raise ValueError(f"noise source must be one of {NOISE_SOURCES}, got {source!r}")
    return source != "seeded"


def gaussian(shape: tuple[int, ...], *, std: float, generator: torch.Generator, secure_mode: bool = False,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """N(0, std^2) noise of `shape`. secure_mode: as Opacus, the sum of four draws halved (same distribution; it
    defeats the floating-point attack that reads the noise's low-order bits, Mironov 2012)."""
    if not secure_mode:
        return torch.normal(0.0, std, shape, generator=generator, dtype=dtype)
    total = torch.zeros(shape, dtype=dtype)
    for _ in range(4):
        total += torch.normal(0.0, std, shape, generator=generator, dtype=dtype)
    return total / 2
