"""The d_chi-privacy mechanism (Feyisetan et al. 2020) on token representations: x + z, z with density proportional to
exp(-eta ||z||_2), one draw per token representation. Not here: which representations are sent (compression.split),
nor any central epsilon: a d_chi guarantee is reported beside a study's (epsilon, delta), never composed into it.

Guarantee, per token representation, Euclidean metric on R^d: for representations x, x' and any set S,
P[M(x) in S] <= exp(eta ||x - x'||) P[M(x') in S]. It protects a representation, not an example: a sequence of n
representations is sum_i eta ||x_i - x'_i|| indistinguishable, and at a split after k > 0 blocks a representation
depends on the whole sequence. Assumptions the code relies on:
- eta does not depend on x. A per-token eta chosen from the token itself (contributing-token identification) keeps
  the guarantee only between tokens given the same eta; between two etas the density ratio is unbounded;
- one draw per representation. Sending it again with fresh noise composes (k sends: k eta, and averaging strips the
  noise), so a party that resends an example reuses its draw: `NoiseStream` makes the draw a secret function of the
  example's index;
- the draws are unpredictable: generators are seeded from the OS (privacy.noise) unless a test passes a seed.

Sampling: a uniform direction times a radius ~ Gamma(shape d, scale 1/eta). Gamma(d, 1) is half a chi-square with
2d degrees of freedom, drawn as (||g1||^2 + ||g2||^2) / 2 for standard normal g1, g2 in R^d; the direction is
g1 / ||g1||, independent of ||g1|| and so of the radius. Every draw comes from one explicit torch generator.
"""
from __future__ import annotations

import hashlib
import math

import torch

from privacy.accounting import DPEvent
from privacy.mechanisms import Mechanism, register_mechanism
from privacy.noise import make_generator, secret_seed


def _etas(eta: float | torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """eta as a float64 tensor of `batch_shape` (one per representation); ValueError unless every eta > 0."""
    etas = torch.as_tensor(eta, dtype=torch.float64).expand(batch_shape)
    if not bool((etas > 0).all()):  # also refuses NaN
        raise ValueError(f"eta must be > 0 (math.inf: no noise), got {eta!r}")
    return etas


def sample_noise(shape: tuple[int, ...], *, eta: float | torch.Tensor, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise of `shape` (..., d): one draw per representation (row), density proportional to exp(-eta ||z||).

    eta: the privacy parameter per unit of Euclidean distance, a float or a tensor of shape[:-1] (one per row); rows
    with eta = inf get zero noise. generator: the source of every draw (secret unless a test seeded it).
    """
    *batch, dim = shape
    etas = _etas(eta, torch.Size(batch))
    g1 = torch.randn(*batch, dim, generator=generator, dtype=torch.float64)
    g2 = torch.randn(*batch, dim, generator=generator, dtype=torch.float64)
    norm1_squared = g1.pow(2).sum(-1)
    gamma = (norm1_squared + g2.pow(2).sum(-1)) / 2  # Gamma(d, 1)
    radius = torch.where(torch.isinf(etas), torch.zeros_like(gamma), gamma / etas)
    direction = g1 / norm1_squared.sqrt().clamp_min(1e-300).unsqueeze(-1)
    return (direction * radius.unsqueeze(-1)).to(dtype)


def privatize(x: torch.Tensor, *, eta: float | torch.Tensor, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """x (..., d) plus d_chi noise per row: eta per unit of distance (a float or one per row; inf: unchanged).

    generator: None (the default) draws from a generator seeded by the OS; pass one only in tests (no guarantee).
    """
    generator = make_generator() if generator is None else generator
    return x + sample_noise(tuple(x.shape), eta=eta, generator=generator, dtype=x.dtype)


def mean_radius(*, eta: float, dim: int) -> float:
    """E||z|| = d / eta: the expected distance a representation of dimension `dim` is moved."""
    return dim / eta if math.isfinite(eta) else 0.0


class NoiseStream:
    """A secret seed from which each (namespace, index) gets its own generator: the draw for one example is the same
    every time it is sent (a resend is the same release, never a second one), and unpredictable without the seed.

    seed: None (the default) takes one from the OS, held in memory only; an integer is the TEST MODE (no guarantee).
    """

    def __init__(self, *, seed: int | None = None):
        self.seeded = seed is not None
        self._seed = secret_seed() if seed is None else int(seed)

    def generator(self, namespace: str, index: int) -> torch.Generator:
        """The generator of example `index` in `namespace` (e.g. "train", "dev")."""
        digest = hashlib.blake2b(f"{namespace}\x00{int(index)}".encode(), digest_size=8,
                                 key=self._seed.to_bytes(8, "big")).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)

    def __repr__(self) -> str:  # never show the seed
        return f"NoiseStream(seeded={self.seeded})"


def _never_composed(event: DPEvent) -> None:
    raise ValueError("a dx release is eta * d(x, x')-indistinguishability per token representation (a local metric "
                     "guarantee): it is reported beside a central epsilon and never composed into one")


register_mechanism(Mechanism(
    name="dx", check=_never_composed, composes=False,
    summary="d_chi-privacy (Feyisetan et al. 2020): eta * d(x, x')-indistinguishability per token representation; "
            "reported next to, never composed into, a central DP epsilon"))
