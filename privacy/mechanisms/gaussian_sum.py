"""The Gaussian sum mechanism for one release of per-example statistics (e.g. input feature norms for pruning).
Not here: which statistics (compression/activations.py) or the accounting (accounting.py, as one step at q = 1).

Assumptions: add-or-remove-one-example neighbours; every example of the data set is summed once (sample rate 1,
one step). Each example contributes a list of chunks (one per tensor); `normalise` scales chunk i of every example
to L2 norm 1/sqrt(M) for M chunks (a zero chunk stays zero), so one example's whole contribution has norm at most 1,
which is the sensitivity; the release adds N(0, noise_multiplier^2) to every coordinate of the sum.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from privacy.accounting import DPEvent
from privacy.mechanisms import Mechanism, register_mechanism
from privacy.noise import gaussian, make_generator


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


class _SingleNoisyRelease:
    """What both accumulators share: the sums stay inside until one noisy release (or, for public data only,
    `noiseless`). Subclasses keep `self._sums` (empty until the first `add`) and call `_start_release`."""

    def __init__(self, keys: Sequence[str], *, public: bool = False):
        self.keys, self.count, self.public = list(keys), 0, public
        self._sums: dict[str, torch.Tensor] = {}
        self._released = False

    def noiseless(self) -> dict[str, torch.Tensor]:
        """The plain sum, for public data only (refused unless constructed with public=True)."""
        if not self.public:
            raise PermissionError("the noiseless sum of private data may not leave: use release()")
        return dict(self._sums)

    def _start_release(self, noise_multiplier: float, secure_mode: bool,
                       generator: torch.Generator | None) -> torch.Generator | None:
        """Checks (one release, something to release, sigma > 0) and the noise generator: `generator` if given (tests,
        the seeded test mode), else a fresh one seeded by the OS. Marks the release done."""
        if self._released:
            raise RuntimeError(f"{type(self).__name__}.release was already called: a second release is not accounted")
        if not self._sums:
            raise ValueError("nothing to release: add at least one batch")
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
        if secure_mode and generator is not None:
            raise ValueError("secure_mode draws its own noise seed; do not pass a generator")
        self._released = True
        return generator if generator is not None else make_generator()


class GaussianSum(_SingleNoisyRelease):
    """Accumulates normalised per-example chunks over the whole data set, then releases the sum once with noise.

    keys: a name per chunk, in the order `add` receives them. The noiseless sum is private: only `release`'s
    output may leave. `release` may be called once (a second call would be a second, unaccounted release).
    public=True: the data is public (no privacy), and `noiseless` returns the plain sum instead.
    """

    def add(self, chunks: Sequence[torch.Tensor]) -> None:
        """Add a batch: chunks[i] is [B, d_i], one row per example, in `keys` order (normalised here)."""
        if len(chunks) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} chunks ({self.keys}), got {len(chunks)}")
        unit = normalise(chunks)
        for key, u in zip(self.keys, unit):
            self._sums[key] = self._sums.get(key, 0) + u.sum(0)
        self.count += unit[0].shape[0]

    def release(self, *, noise_multiplier: float, secure_mode: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The sum plus N(0, noise_multiplier^2) per coordinate (sensitivity 1), as {key: float32 tensor}.

        generator: None (the default) draws the noise from a generator seeded by the OS; pass one only in tests or in
            the seeded test mode (no guarantee). secure_mode refuses a passed generator.
        """
        generator = self._start_release(noise_multiplier, secure_mode, generator)
        out = {}
        for key in self.keys:
            total = self._sums[key]
            noise = gaussian(tuple(total.shape), std=noise_multiplier, generator=generator, secure_mode=secure_mode)
            out[key] = (total + noise).float()
        self._sums = {}  # the noiseless sums are gone once released
        return out


class SecondMomentSum(_SingleNoisyRelease):
    """Per-example second moments of token features, summed over the data set and released once with noise.

    Each example contributes, for each key (a layer input, [L, d] tokens), the token mean of x x^T over its real
    tokens, a [d, d] matrix scaled to Frobenius norm 1/sqrt(M) for M keys, so its whole contribution has norm 1
    (the sensitivity). Per-example matrices are never formed: ||X^T X||_F = ||X X^T||_F, so each example's tokens
    are scaled by sqrt(1 / (||X X^T||_F sqrt(M))) and one matmul adds the batch. The release adds N(0, sigma^2) to
    every entry on and above the diagonal and mirrors it (an upper triangle has norm <= the Frobenius norm).
    The batch matmul runs in float32; contributions are scaled to (1 - SLACK) of their bound, so its rounding
    (relative ~1e-6) cannot take one example's contribution above norm 1.
    """

    SLACK = 1e-3

    def add(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        """inputs[key]: [B, L, d] features of B examples; mask: [B, L], 1 on real tokens (padding is ignored)."""
        if sorted(inputs) != sorted(self.keys):
            raise ValueError(f"expected inputs for {sorted(self.keys)}, got {sorted(inputs)}")
        real = mask.to(torch.float64).unsqueeze(-1)
        bound = (1 - self.SLACK) / math.sqrt(len(self.keys))
        for key in self.keys:
            x = inputs[key].to(torch.float64) * real
            gram_norm = torch.linalg.matrix_norm(x @ x.transpose(1, 2))  # = ||X^T X||_F, per example
            weight = torch.where(gram_norm > 0, bound / gram_norm.clamp_min(1e-300), torch.zeros_like(gram_norm))
            scaled = (x * weight.sqrt()[:, None, None]).flatten(0, 1).float()
            self._sums[key] = self._sums.get(key, 0) + (scaled.T @ scaled).double()
        self.count += mask.shape[0]

    def release(self, *, noise_multiplier: float, secure_mode: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{key: [d, d] symmetric float64}: the sum plus symmetric Gaussian noise of std sigma per entry."""
        generator = self._start_release(noise_multiplier, secure_mode, generator)
        out = {}
        for key in self.keys:
            total = self._sums[key]
            noise = gaussian(tuple(total.shape), std=noise_multiplier, generator=generator, secure_mode=secure_mode)
            upper = noise.triu()
            out[key] = total + upper + upper.triu(1).T
        self._sums = {}
        return out


def _one_full_release(event: DPEvent) -> None:
    if event.sample_rate != 1 or event.num_steps != 1:
        raise ValueError(f"a gaussian_sum release is one step at sample rate 1, got q={event.sample_rate}, "
                         f"steps={event.num_steps}")


register_mechanism(Mechanism(
    name="gaussian_sum", check=_one_full_release,
    summary="one noisy sum of per-example statistics, each normalised to norm 1, over the whole data set"))
