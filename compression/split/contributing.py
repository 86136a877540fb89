"""Contributing-token identification (CTI), on the customer's side: score vocabulary tokens by how much they tell the
label apart in the customer's training text, and give the contributing ones less noise (a larger per-token eta)
while the average eta over the training tokens stays the configured one. Two scores: class-contrast TF-IDF, and the
smoothed log-odds ratio, which ranks a token by what one occurrence tells, not by how often it occurs. Not here: the
noise (privacy.mechanisms.dx).

What the scores reveal. They are computed from the private training texts and labels without noise: the ranking
lists the words that predict each label in the customer's data, and a rare token (a name, an identifier) that occurs
only in examples of one class ranks by its count there, which reveals that it occurs and with which label. The
scores and the contributing set stay with the customer. What leaves is the per-token eta, through the noise: the
radius of a dx draw concentrates around d / eta (relative spread 1 / sqrt(d)), so the vendor can tell which sent
tokens are contributing, i.e. learns one bit per token about membership in the customer's label-predictive set.
And the dx guarantee holds only between tokens given the same eta (privacy.mechanisms.dx): CTI trades that formal
guarantee for utility at the same average eta, as the paper does; its protection is measured empirically.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True, kw_only=True)
class CTIConfig:
    """enabled: the switch. num_tokens: how many vocabulary entries (highest scores) are contributing.
    eta_ratio: eta of a contributing token over eta of the others (> 1: contributing tokens get less noise).
    score: "tfidf" (`token_scores`) or "log_odds" (`log_odds_scores`)."""

    enabled: bool = False
    num_tokens: int = 500
    eta_ratio: float = 4.0
    score: Literal["tfidf", "log_odds"] = "tfidf"

    def __post_init__(self):
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be an integer >= 1, got {self.num_tokens!r}")
        if not self.eta_ratio >= 1:
            raise ValueError(f"eta_ratio must be >= 1, got {self.eta_ratio!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")


def _class_counts(input_ids: Sequence[Sequence[int]], labels: torch.Tensor, *,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts `[C, V]` of every token in the examples of each class, document frequency `[V]`), float64."""
    if labels.is_floating_point():
        raise ValueError("contributing tokens are defined for classification labels, not regression scores")
    counts = torch.zeros(int(labels.max()) + 1, vocab_size, dtype=torch.float64)
    document_frequency = torch.zeros(vocab_size, dtype=torch.float64)
    for ids, label in zip(input_ids, labels.tolist()):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        counts[label].index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        document_frequency[ids.unique()] += 1
    return counts, document_frequency


def token_scores(input_ids: Sequence[Sequence[int]], labels: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
    """Class-contrast TF-IDF of every vocabulary token, `[vocab_size]` float64, from the customer's training data.

    tf(t, c) is token t's share of the tokens of class c; idf(t) = log(N / (1 + df(t))) over the N examples;
    score(t) = idf(t) * max over classes c of |tf(t, c) - tf(t, not c)|. Ubiquitous tokens ([CLS], "the") score about
    0 through the idf, tokens spread evenly over the classes through the contrast. Classification labels only. The
    contrast is absolute: a frequent token ("a", ",") with a small relative skew outranks a rarer, telling one.
    """
    counts, document_frequency = _class_counts(input_ids, labels, vocab_size=vocab_size)
    idf = torch.log(len(input_ids) / (1 + document_frequency)).clamp_min(0)
    tf = counts / counts.sum(1, keepdim=True).clamp_min(1)
    rest = (counts.sum(0, keepdim=True) - counts) / (counts.sum() - counts.sum(1, keepdim=True)).clamp_min(1)
    return idf * (tf - rest).abs().max(0).values


def log_odds_scores(input_ids: Sequence[Sequence[int]], labels: torch.Tensor, *, vocab_size: int,
                    prior: float = 5.0) -> torch.Tensor:
    """|log-odds ratio| of every token between each class and the rest, smoothed by pseudo-counts, the largest over
    classes, `[vocab_size]` float64: how much ONE occurrence tells the label apart.

    For class c against the rest (token counts y, totals n, pseudo-counts a = 2 * prior * n / (n_c + n_r), in
    proportion to each side's size so that an unseen token scores exactly 0 whatever the class sizes):
    delta(t) = log((y_c + a_c) / n_c) - log((y_r + a_r) / n_r). Unlike TF-IDF's absolute contrast it does not grow
    with the token's frequency ("a" or "," with a slight skew score about 0), and the pseudo-counts shrink a rare
    token's ratio (one occurrence in one of two equal classes: log(6/5)). A class without tokens, or without any
    other class, is skipped. Tokens absent from the data score 0, and so do tokens in every example ([CLS], [SEP]).
    """
    counts, document_frequency = _class_counts(input_ids, labels, vocab_size=vocab_size)
    total = counts.sum(0)
    best = torch.zeros(vocab_size, dtype=torch.float64)
    for own in counts:
        rest = total - own
        n_own, n_rest = own.sum(), rest.sum()
        if n_own == 0 or n_rest == 0:
            continue
        a_own, a_rest = (2 * prior * n / (n_own + n_rest) for n in (n_own, n_rest))
        delta = torch.log((own + a_own) / n_own) - torch.log((rest + a_rest) / n_rest)
        best = torch.maximum(best, delta.abs())
    telling = (total > 0) & (document_frequency < len(input_ids))
    return torch.where(telling, best, torch.zeros_like(best))


SCORES = {"tfidf": token_scores, "log_odds": log_odds_scores}


@dataclass(frozen=True)
class TokenEtas:
    """Per-token eta: `contributing` ([V] bool) tokens get `eta_contributing`, the others `eta_other`; `fraction` of
    the training tokens are contributing (the mechanism's parameters, without the set, are what an attacker knows)."""

    contributing: torch.Tensor
    eta_contributing: float
    eta_other: float
    fraction: float

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """eta for every position of `input_ids` (any shape), float64."""
        high = self.contributing[input_ids]
        levels = torch.tensor([self.eta_other, self.eta_contributing], dtype=torch.float64)  # float64, not float32
        return levels[high.long()]


def eta_levels(*, eta: float, eta_ratio: float, fraction: float) -> tuple[float, float]:
    """(eta of contributing tokens, eta of the others) with ratio `eta_ratio` whose average, when a `fraction` of the
    tokens is contributing, is `eta`: fraction * high + (1 - fraction) * low = eta."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if math.isinf(eta):
        return math.inf, math.inf
    low = eta / (fraction * eta_ratio + 1 - fraction)
    return eta_ratio * low, low


def fit_token_etas(input_ids: Sequence[Sequence[int]], labels: torch.Tensor, *, eta: float, config: CTIConfig,
                   vocab_size: int) -> TokenEtas:
    """CTI from the customer's training data: the `config.num_tokens` highest-scoring tokens (`config.score`) are
    contributing, and the two eta levels average to `eta` over every token of `input_ids` (all positions, special
    tokens included)."""
    scores = SCORES[config.score](input_ids, labels, vocab_size=vocab_size)
    contributing = torch.zeros(vocab_size, dtype=torch.bool)
    contributing[scores.argsort(descending=True, stable=True)[:config.num_tokens]] = True
    contributing &= scores > 0
    flat = torch.as_tensor([t for ids in input_ids for t in ids], dtype=torch.long)
    fraction = float(contributing[flat].double().mean()) if len(flat) else 0.0
    high, low = eta_levels(eta=eta, eta_ratio=config.eta_ratio, fraction=fraction)
    return TokenEtas(contributing, high, low, fraction)
