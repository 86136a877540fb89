"""The Gaussian sum mechanism for one release of per-example statistics (e.g. input feature norms for pruning).
Not here: which statistics (compression/activations.py) or the accounting (accounting.py, as one step at q = 1).

Assumptions: add-or-remove-one-example neighbours; every example of the data set is summed once (sample rate 1,
one step). Each example contributes a list of chunks (one per tensor); `normalise` scales chunk i of every example
to L2 norm 1/sqrt(M) for M chunks (a zero chunk stays zero), so one example's whole contribution has norm at most 1,
which is the sensitivity; the release adds N(0, noise_multiplier^2) to every coordinate of the sum.
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch


def normalise(chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-example normalisation: `chunks[i]` is [B, d_i]; returns each row scaled to norm 1/sqrt(len(chunks)).

    Afterwards every example's concatenated contribution has L2 norm exactly 1 (or 0 where all its chunks are zero).
    The per-chunk split keeps each tensor's statistic at the same signal-to-noise ratio whatever its width or scale.
    """
    if not chunks:
        raise ValueError("normalise needs at least one chunk")
    target = 1.0 / math.sqrt(len(chunks))
    out = []
    for chunk in chunks:
        chunk = chunk.double()
        norms = chunk.norm(dim=1, keepdim=True)
        out.append(torch.where(norms > 0, chunk * (target / norms.clamp_min(1e-300)), torch.zeros_like(chunk)))
    return out


class GaussianSum:
    """Accumulates normalised per-example chunks over the whole data set, then releases the sum once with noise.

    keys: a name per chunk, in the order `add` receives them. The noiseless sum is private: only `release`'s
    output may leave. `release` may be called once (a second call would be a second, unaccounted release).
    """

    def __init__(self, keys: Sequence[str]):
        self.keys, self.count = list(keys), 0
        self._sums: list[torch.Tensor] | None = None
        self._released = False

    def add(self, chunks: Sequence[torch.Tensor]) -> None:
        """Add a batch: chunks[i] is [B, d_i], one row per example, in `keys` order (normalised here)."""
        if len(chunks) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} chunks ({self.keys}), got {len(chunks)}")
        unit = normalise(chunks)
        batch = [u.sum(0) for u in unit]
        self._sums = batch if self._sums is None else [s + b for s, b in zip(self._sums, batch)]
        self.count += unit[0].shape[0]

    def release(self, *, noise_multiplier: float, secure_mode: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The sum plus N(0, noise_multiplier^2) per coordinate (sensitivity 1), as {key: float32 tensor}.

        secure_mode: noise from a generator seeded by the OS (`generator` is then refused).
        """
        if self._released:
            raise RuntimeError("GaussianSum.release was already called: a second release is not accounted")
        if self._sums is None:
            raise ValueError("nothing to release: add at least one batch")
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
        if secure_mode:
            if generator is not None:
                raise ValueError("secure_mode draws its own noise seed; do not pass a generator")
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        self._released = True
        out = {}
        for key, total in zip(self.keys, self._sums):
            noise = torch.normal(0.0, noise_multiplier, total.shape, generator=generator, dtype=torch.float64)
            out[key] = (total + noise).float()
        self._sums = None  # the noiseless sums are gone once released
        return out
