"""Empirical privacy of privatized token representations: inversion attacks that guess each sent token from its
representation, and the score of a guess set (top-1 recovery, empirical privacy EP = 1 - recovery, chance levels).

Attacker model: it knows the public bottom model and the mechanism (eta, the CTI ratio), not the private text, the
noise draws or the customer's contributing set. Two attacks, both pure torch on given tensors (which representations,
from which model, is the caller's business, compression.split.audit):
- nearest neighbour: at a split at the embeddings, each representation is decoded to the vocabulary entry whose
  embedding output (at the same position, any token type) is closest; without noise it is exact, and under d_chi
  noise with one eta it is the maximum-likelihood guess (the density decreases with distance);
- learned, from PUBLIC text pushed through the bottom model and the mechanism: `LinearInversion`, a least-squares map
  from representation to the one-hot token (with a bias, so the public token frequencies act as a prior), and
  `PublicNeighbourInversion`, the token of the nearest public representation (1-nearest neighbour, no fitting: it
  reads the clusters a token's representations form in every context, which a linear map cannot separate).
Chance levels: `chance_majority`, always guessing the public text's most frequent token (what the linear attack
falls to when the representations carry nothing; a neighbour attack falls below it), and `chance_uniform` =
1 / vocabulary size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

Table = Callable[[int], torch.Tensor]  # position -> [M, H] candidate outputs; row r is vocabulary token r % V


@dataclass(frozen=True, kw_only=True)
class InversionResult:
    """attack: which attack. recovery: share of the private real tokens (special tokens excluded) guessed right, top-1.
    empirical_privacy: 1 - recovery. num_tokens: how many were guessed. chance_majority, chance_uniform: see above.
    candidates: where several attacks ran on the same guesses' truth, each one's recovery (this result is the best)."""

    attack: str
    recovery: float
    empirical_privacy: float
    num_tokens: int
    chance_majority: float
    chance_uniform: float
    candidates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def score(predicted: torch.Tensor, truth: torch.Tensor, *, attack: str, majority_token: int,
          vocab_size: int) -> InversionResult:
    """Top-1 recovery of `predicted` against `truth` (both [N] token ids of real, non-special tokens)."""
    if predicted.shape != truth.shape or truth.dim() != 1 or not len(truth):
        raise ValueError(f"need non-empty 1-D predicted and truth of one shape, got {predicted.shape}, {truth.shape}")
    recovery = float((predicted == truth).double().mean())
    return InversionResult(attack=attack, recovery=recovery, empirical_privacy=1 - recovery, num_tokens=len(truth),
                           chance_majority=float((truth == majority_token).double().mean()),
                           chance_uniform=1 / vocab_size)


def nearest_rows(observed: torch.Tensor, candidates: torch.Tensor, *, chunk_size: int = 512) -> torch.Tensor:
    """Row index `[N]` of the candidate `[M, H]` nearest (Euclidean) to each observed representation `[N, H]`."""
    candidates = candidates.to(observed.dtype)
    squared_norms = candidates.pow(2).sum(1)
    out = [(squared_norms - 2 * chunk @ candidates.T).argmin(1) for chunk in observed.split(chunk_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)  # ||y||^2 is the same for every candidate


def nearest_neighbour_attack(observed: torch.Tensor, positions: torch.Tensor, *, table: Table,
                             vocab_size: int) -> torch.Tensor:
    """Token ids `[N]`: for each observed representation `[N, H]` at its position `[N]`, the vocabulary token whose
    candidate row in `table(position)` is nearest in Euclidean distance (row index modulo `vocab_size`)."""
    predicted = torch.empty(len(observed), dtype=torch.long)
    for position in positions.unique().tolist():
        rows = (positions == position).nonzero().squeeze(1)
        predicted[rows] = nearest_rows(observed[rows], table(int(position))) % vocab_size
    return predicted


class LinearInversion:
    """A least-squares linear classifier from representation `[H]` to token id over the vocabulary, with a bias.

    Fit in closed form: W = (Xc^T Xc + ridge * n * I)^-1 Xc^T Y for centred features Xc and one-hot targets Y, and
    bias b_t = freq(t) - mean(X) W_t, so with uninformative features it guesses the most frequent training token.
    """

    def __init__(self, *, vocab_size: int, ridge: float = 1e-3):
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge!r}")
        self.vocab_size, self.ridge = vocab_size, ridge
        self.weight = self.bias = None

    def fit(self, features: torch.Tensor, tokens: torch.Tensor) -> LinearInversion:
        """features `[N, H]` (representations of public text after the mechanism), tokens `[N]` their token ids."""
        x = features.double()
        mean = x.mean(0)
        centred = x - mean
        gram = centred.T @ centred
        gram += self.ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        sums = torch.zeros(self.vocab_size, x.shape[1], dtype=torch.float64).index_add_(0, tokens, centred)
        self.weight = torch.linalg.solve(gram, sums.T)  # [H, V]
        frequency = torch.bincount(tokens, minlength=self.vocab_size).double() / len(tokens)
        self.bias = frequency - mean @ self.weight
        return self

    def predict(self, features: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
        """Token ids `[N]`, the highest score `x W + b` per representation."""
        if self.weight is None:
            raise RuntimeError("LinearInversion.predict before fit")
        out = [(chunk.double() @ self.weight + self.bias).argmax(1) for chunk in features.split(chunk_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class PublicNeighbourInversion:
    """Guesses the token of the public representation nearest (Euclidean) to each observed one: a 1-nearest-neighbour
    classifier over representations of PUBLIC text after the bottom model and the mechanism (the attacker's own noise).
    Deeper in the model a token's representation depends on its context but stays near its other occurrences, so this
    recovers far more than a linear map where the public text holds the token; it cannot guess a token it never saw.
    """

    def __init__(self):
        self.features = self.tokens = None

    def fit(self, features: torch.Tensor, tokens: torch.Tensor) -> PublicNeighbourInversion:
        """features `[N, H]` (representations of public text after the mechanism), tokens `[N]` their token ids."""
        if features.dim() != 2 or tokens.shape != (len(features),) or not len(tokens):
            raise ValueError(f"need non-empty features [N, H] and tokens [N], got {features.shape}, {tokens.shape}")
        self.features, self.tokens = features.float(), tokens
        return self

    def predict(self, features: torch.Tensor, *, chunk_size: int = 512) -> torch.Tensor:
        """Token ids `[N]`, that of the nearest public representation."""
        if self.features is None:
            raise RuntimeError("PublicNeighbourInversion.predict before fit")
        return self.tokens[nearest_rows(features.float(), self.features, chunk_size=chunk_size)]
