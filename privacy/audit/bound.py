"""Epsilon lower bounds from one training run (Steinke, Nasr and Jagielski 2023, arXiv 2305.08846): the p-value of
guessing canaries' membership, its inversion into a bound, and scores -> bound. Pure arithmetic: no training here.

Assumptions (the paper's Theorem 5.2 and Appendix D): each of the m canaries is included independently with
probability 1/2; the guesses are any function of the trained model (never of the inclusion bits); the null
hypothesis is that the training run is (epsilon, delta)-DP with respect to each canary's inclusion (add-or-remove one).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom

EPSILON_TOLERANCE = 1e-6  # bisection width of epsilon_lower_bound
EPSILON_MAX = 100.0       # no bound above this is searched (a p-value there is 1 for any practical m)
GUESS_FRACTIONS = (0.002, 0.01, 0.05, 0.2, 1.0)  # fractions of a group's canaries guessed by audit_from_scores
GUESS_SIDES = ("both", "in")  # guess both tails, or only "in" on the highest scores (abstain on the low tail)


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError("need 0 <= num_correct <= num_guesses <= num_canaries, got "
                         f"{num_correct}, {num_guesses}, {num_canaries}")


def p_value(*, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """P[at least `num_correct` of `num_guesses` guesses are right] if the run is (epsilon, delta)-DP (Appendix D).

    With p = e^eps / (1 + e^eps), beta = P[Binomial(r, p) >= v]; for delta > 0 the p-value adds
    alpha * delta * 2m, alpha = max over i in 1..v of P[v - i <= Binomial(r, p) < v] / i. Capped at 1.
    Args: m = `num_canaries` (each included with probability 1/2), r = `num_guesses` (abstentions excluded),
    v = `num_correct`, `epsilon` >= 0 and `delta` in [0, 1] the null hypothesis' guarantee.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    if num_correct == 0:
        return 1.0
    accuracy = float(expit(epsilon))  # the accuracy of epsilon-DP randomised response
    beta = float(binom.sf(num_correct - 1, num_guesses, accuracy))
    alpha = 0.0
    if delta > 0:
        below = binom.pmf(np.arange(num_correct - 1, -1, -1), num_guesses, accuracy)  # P[B = v-1], ..., P[B = 0]
        alpha = float(np.max(np.cumsum(below) / np.arange(1, num_correct + 1)))
    return min(1.0, beta + alpha * delta * 2 * num_canaries)


def epsilon_lower_bound(*, num_canaries: int, num_guesses: int, num_correct: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The largest epsilon (to EPSILON_TOLERANCE) whose null hypothesis `p_value` still rejects at 1 - `confidence`.

    0 when even epsilon = 0 is not rejected; at most EPSILON_MAX. Bisection assumes the p-value grows with epsilon
    (no decrease was found on a grid of m, r, v and delta; the tests check a few). Arguments as `p_value`.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    threshold = 1 - confidence

    def rejected(epsilon: float) -> bool:
        return p_value(num_canaries=num_canaries, num_guesses=num_guesses, num_correct=num_correct,
                       epsilon=epsilon, delta=delta) < threshold

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        if hi >= EPSILON_MAX:
            return EPSILON_MAX
        lo, hi = hi, min(2 * hi, EPSILON_MAX)
    while hi - lo > EPSILON_TOLERANCE:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


@dataclass(frozen=True, kw_only=True)
class AuditResult:
    """The best bound over the guesses tried, and the counts behind it (in the group it came from)."""

    epsilon_lower_bound: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    group: str | None     # the canaries' group the bound came from; None: all canaries
    num_tries: int        # guess sets tried: each was tested at 1 - (1 - confidence) / num_tries (Bonferroni)
    confidence: float


def _guesses(scores: np.ndarray, included: np.ndarray, *, fraction: float, side: str) -> tuple[int, int]:
    """(guesses, correct) for "in" on the k highest scores and, if side == "both", "out" on the k lowest."""
    num = len(scores)
    k = max(1, round(fraction * num / 2)) if side == "both" else max(1, round(fraction * num))
    k = min(k, num // 2) if side == "both" else min(k, num)
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[num - k:]].sum())
    if side == "both":
        correct += int((~included[order[:k]]).sum())
    return (2 * k if side == "both" else k), correct


def audit_from_scores(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                      guess_fractions: Sequence[float] = GUESS_FRACTIONS, sides: Sequence[str] = GUESS_SIDES,
                      groups: Sequence[str] | None = None) -> AuditResult:
    """Epsilon lower bound from membership scores (higher = more likely included), with `confidence` overall.

    For every group (all canaries; with `groups`, also each group alone, its other canaries' inclusion being part
    of the mechanism's randomness), every fraction f of the group's m canaries and every side, guesses "in" for
    the highest scores (and "out" for as many lowest with side "both"), abstaining on the rest, f * m guesses
    in all. Each try is tested at 1 - (1 - confidence) / tries (Bonferroni), so the best bound holds at
    `confidence`. `delta` is the null hypothesis' delta (the accountant's); scores must not depend on `included`.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"need 1-D scores and included of one shape, got {scores.shape}, {included.shape}")
    if not sides or set(sides) - set(GUESS_SIDES):
        raise ValueError(f"sides must be a non-empty subset of {GUESS_SIDES}, got {tuple(sides)}")
    if not guess_fractions or not all(0 < f <= 1 for f in guess_fractions):
        raise ValueError(f"guess_fractions must be non-empty, each in (0, 1], got {tuple(guess_fractions)}")
    subsets: list[tuple[str | None, np.ndarray]] = [(None, np.ones(len(scores), dtype=bool))]
    if groups is not None:
        labels = np.asarray(groups)
        subsets += [(str(g), labels == g) for g in dict.fromkeys(labels.tolist())]
    tries = [(g, s, f, side) for g, s in subsets for f in guess_fractions for side in sides]
    level = 1 - (1 - confidence) / len(tries)
    best = None
    for group, subset, fraction, side in tries:
        guesses, correct = _guesses(scores[subset], included[subset], fraction=fraction, side=side)
        result = AuditResult(epsilon_lower_bound=epsilon_lower_bound(
            num_canaries=int(subset.sum()), num_guesses=guesses, num_correct=correct, delta=delta, confidence=level),
            num_canaries=int(subset.sum()), num_guesses=guesses, num_correct=correct, group=group,
            num_tries=len(tries), confidence=confidence)
        if best is None or result.epsilon_lower_bound > best.epsilon_lower_bound:
            best = result
    return best
