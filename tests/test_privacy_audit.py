"""Tests for privacy.audit: the one-run p-value against exact binomial sums, its inversion into a bound, the canary
harness's oracles (one coordinate per canary, contributions of exactly C), and the audit of the engine: honest in every
mode it stays under the accountant's epsilon; without noise on some tensors, or sampling 4x faster, it goes over."""
from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import privacy.engine
from privacy.accounting import DPEvent, compose_epsilon
from privacy.audit.bound import AuditResult, audit_from_scores, epsilon_lower_bound, p_value
from privacy.audit.canaries import TENSORS, canary_directions, run_canaries
from privacy.engine import PoissonSampler

TEACHER = {"sample_rate": 0.064, "num_steps": 47, "noise_multiplier": 0.613}  # the paper teacher: eps ~8 at 1/8000
PROJECT_DELTA = 1 / 8000
# The accountant's claim holds at every delta. At 1/8000 the p-value's delta term, 2 * m * delta (2.5 for 10,000
# canaries), swamps any evidence, so the broken engines are audited at delta = 1e-6 (2 * m * delta = 0.02).
AUDIT_DELTA = 1e-6
SMALL_CLAIM_SIGMA = 2.0  # at the teacher's q and T: eps 1.17 at 1e-6, small enough for a one-run audit to refute
NUM_CANARIES = 10_000


@functools.cache
def _claim(noise_multiplier: float, delta: float) -> float:
    event = DPEvent(noise_multiplier=noise_multiplier, sample_rate=TEACHER["sample_rate"],
                    num_steps=TEACHER["num_steps"])
    return compose_epsilon([event], delta=delta)


def _audit(**kwargs) -> dict[float, AuditResult]:
    """Train on the canaries (teacher's q and T unless overridden) and audit at both deltas."""
    run = run_canaries(num_canaries=NUM_CANARIES, **{**TEACHER, **kwargs})
    return {delta: audit_from_scores(run.scores, run.included, delta=delta, groups=run.tensors)
            for delta in (PROJECT_DELTA, AUDIT_DELTA)}


def _exact_p_value(m: int, r: int, v: int, epsilon: float, delta: Fraction) -> Fraction:
    """Appendix D in exact rational arithmetic, from its definition (no scipy)."""
    e = Fraction(math.exp(epsilon))
    p = e / (1 + e)
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:], Fraction(0))
    alpha = max((sum(pmf[v - i : v], Fraction(0)) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(Fraction(1), beta + alpha * delta * 2 * m)


@pytest.mark.parametrize("delta", [Fraction(0), Fraction(1, 100), Fraction(1, 8)])
@pytest.mark.parametrize("epsilon", [0.0, 0.7, 2.5])
@pytest.mark.parametrize("m,r,v", [(6, 6, 6), (6, 6, 4), (8, 5, 3), (10, 7, 0), (10, 10, 9), (12, 9, 5), (3, 1, 1)])
def test_p_value_matches_exact_binomial_sums(m, r, v, epsilon, delta):
    got = p_value(num_canaries=m, num_guesses=r, num_correct=v, epsilon=epsilon, delta=float(delta))
    assert got == pytest.approx(float(_exact_p_value(m, r, v, epsilon, delta)), rel=1e-9, abs=1e-15)


def test_p_value_edges_and_monotonicity():
    def p(**kw):
        return p_value(**{"num_canaries": 40, "num_guesses": 20, "num_correct": 15, "epsilon": 1.0, "delta": 1e-3,
                          **kw})

    assert p(num_correct=0) == 1.0  # no correct guess is always possible
    assert p(num_correct=20, delta=0.0) == pytest.approx((math.e / (1 + math.e)) ** 20, rel=1e-12)  # v = r
    assert p(num_correct=20) > p(num_correct=20, delta=0.0)  # the delta term counts even when all are right
    assert p(delta=1.0) == 1.0  # capped
    epsilons = [0.05 * i for i in range(100)]
    for v, delta in [(15, 0.0), (15, 1e-3), (20, 1e-3), (12, 1e-2)]:
        values = [p(num_correct=v, delta=delta, epsilon=e) for e in epsilons]
        assert all(a <= b + 1e-15 for a, b in itertools.pairwise(values)), (v, delta)  # grows with epsilon
    by_correct = [p(num_correct=v) for v in range(21)]
    assert all(a >= b for a, b in itertools.pairwise(by_correct))  # more correct guesses: smaller p-value
    assert p(delta=1e-4) <= p(delta=1e-3) <= p(delta=1e-2)
    with pytest.raises(ValueError, match="num_correct"):
        p(num_correct=21)
    with pytest.raises(ValueError, match="epsilon"):
        p(epsilon=-0.1)
    with pytest.raises(TypeError):
        p_value(40, 20, 15, 1.0, 1e-3)  # keyword-only: swapping counts must not pass silently


@pytest.mark.parametrize("m,r,v,delta", [(1000, 100, 90, 0.0), (1000, 100, 90, 1e-5), (10_000, 2000, 1900, 1e-6),
                                         (200, 200, 200, 0.0), (50, 50, 40, 1e-3)])
def test_epsilon_lower_bound_is_the_edge_of_rejection(m, r, v, delta):
    counts = {"num_canaries": m, "num_guesses": r, "num_correct": v, "delta": delta}
    bound = epsilon_lower_bound(**counts, confidence=0.95)
    assert bound > 0
    assert p_value(**counts, epsilon=bound) < 0.05 <= p_value(**counts, epsilon=bound + 2e-6)
    assert epsilon_lower_bound(**counts, confidence=0.99) < bound  # more confidence, smaller bound


def test_epsilon_lower_bound_is_zero_without_evidence():
    assert epsilon_lower_bound(num_canaries=100, num_guesses=100, num_correct=50, delta=0.0) == 0.0
    assert epsilon_lower_bound(num_canaries=100, num_guesses=0, num_correct=0, delta=0.0) == 0.0
    # ten right guesses reject eps = 0 alone, not with a delta term of 2 * 1000 * 1e-3 = 2
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=10, num_correct=10, delta=0.0) > 0
    assert epsilon_lower_bound(num_canaries=1000, num_guesses=10, num_correct=10, delta=1e-3) == 0.0


def test_audit_from_scores_separating_random_and_bonferroni():
    rng = np.random.default_rng(0)
    included = rng.random(2000) < 0.5
    separated = audit_from_scores(included + 0.1 * rng.random(2000), included, delta=1e-6)
    alone = epsilon_lower_bound(num_canaries=2000, num_guesses=separated.num_guesses,
                                num_correct=separated.num_correct, delta=1e-6,
                                confidence=1 - 0.05 / separated.num_tries)
    assert separated.epsilon_lower_bound == alone > 3
    assert separated.num_tries == 10 and separated.group is None
    assert audit_from_scores(rng.random(2000), included, delta=1e-6).epsilon_lower_bound < 0.5
    groups = np.where(np.arange(2000) < 1000, "a", "b")
    half = np.where(groups == "a", included + 0.1 * rng.random(2000), 3 * rng.normal(size=2000))  # only a leaks
    grouped = audit_from_scores(half, included, delta=1e-6, groups=groups)
    assert grouped.group == "a" and grouped.num_canaries == 1000 and grouped.num_tries == 30
    assert grouped.epsilon_lower_bound > audit_from_scores(half, included, delta=1e-6).epsilon_lower_bound
    with pytest.raises(ValueError, match="shape"):
        audit_from_scores([1.0, 2.0], [True], delta=1e-6)
    with pytest.raises(ValueError, match="guess_fractions"):
        audit_from_scores([1.0, 2.0], [True, False], delta=1e-6, guess_fractions=(0.0,))


def test_every_canary_is_its_own_coordinate_of_every_kind_of_tensor():
    index, sign = canary_directions(50)  # raises unless each gradient is one coordinate of its tensor, norm >= 2 C
    pairs = {(TENSORS[i % len(TENSORS)], int(index[i])) for i in range(50)}
    assert len(pairs) == 50  # no two canaries share a coordinate: no cross-talk
    assert {t for t, _ in pairs} == set(TENSORS)  # 1-D tensors (biases, LayerNorm) included
    assert set(np.abs(sign)) == {1.0}


@pytest.mark.parametrize("mode,clipping", [("bookkeeping", "flat"), ("bookkeeping", "per_layer"), ("ghost", "flat"),
                                           ("hooks", "flat"), ("hooks", "per_layer")])
def test_each_step_moves_an_included_canary_by_exactly_its_clipped_contribution(mode, clipping):
    """Noise-free, every canary in every batch, three chunks: scores count clipped contributions exactly."""
    run = run_canaries(num_canaries=40, sample_rate=1.0, num_steps=2, noise_multiplier=0.0, max_grad_norm=0.3,
                       mode=mode, clipping=clipping, physical_batch_size=8)
    contribution = 1.0 if clipping == "flat" else 1 / math.sqrt(len(TENSORS))  # C, or C / sqrt(L) per tensor
    assert 0 < run.included.sum() < 40
    np.testing.assert_allclose(run.scores[run.included], 2 * contribution, rtol=1e-4)
    np.testing.assert_array_equal(run.scores[~run.included], 0.0)


@pytest.mark.parametrize("mode,clipping", [("bookkeeping", "flat"), ("ghost", "flat"), ("hooks", "flat"),
                                          ("bookkeeping", "per_layer")])
def test_honest_engine_stays_below_the_accountant_at_the_teacher_settings(mode, clipping):
    audits = _audit(mode=mode, clipping=clipping)
    for delta, audit in audits.items():
        assert audit.epsilon_lower_bound <= _claim(TEACHER["noise_multiplier"], delta), delta
    assert audits[AUDIT_DELTA].epsilon_lower_bound > 0  # the audit sees the leak it is allowed


def test_honest_engine_stays_below_a_small_claim():
    audit = _audit(noise_multiplier=SMALL_CLAIM_SIGMA)[AUDIT_DELTA]
    assert audit.epsilon_lower_bound <= _claim(SMALL_CLAIM_SIGMA, AUDIT_DELTA)


@pytest.mark.parametrize("silenced", ["1-D tensors", "embedding.weight"])
def test_missing_noise_on_some_tensors_is_caught(monkeypatch, silenced):
    """The bk backend adds no noise to the 1-D tensors (biases, LayerNorm), or to the embedding table alone."""
    real = privacy.engine._generate_noise
    table = (math.ceil(math.ceil(NUM_CANARIES / len(TENSORS)) / 16), 16)  # CanaryModel's embedding shape

    def noise(*, std, reference, generator, secure_mode):
        drawn = real(std=std, reference=reference, generator=generator, secure_mode=secure_mode)
        quiet = reference.dim() == 1 if silenced == "1-D tensors" else tuple(reference.shape) == table
        return torch.zeros_like(drawn) if quiet else drawn

    monkeypatch.setattr(privacy.engine, "_generate_noise", noise)
    audit = _audit(noise_multiplier=SMALL_CLAIM_SIGMA)[AUDIT_DELTA]
    assert audit.epsilon_lower_bound > _claim(SMALL_CLAIM_SIGMA, AUDIT_DELTA)
    one_dimensional = {"linear.bias", "norm.weight", "norm.bias"}
    assert audit.group in (one_dimensional if silenced == "1-D tensors" else {silenced})  # found where it leaks


def test_sampling_faster_than_accounted_is_caught(monkeypatch):
    """Batches drawn at 4x the sample rate the accountant (and expected_batch_size) assume. (At 3x the one-run bound
    is about the claim: 1.0 to 1.4 against 1.17 over seeds, not a reliable catch with 10,000 canaries.)"""
    real = PoissonSampler.__init__

    def init(self, *, sample_rate, **kwargs):
        real(self, sample_rate=4 * sample_rate, **kwargs)

    monkeypatch.setattr(PoissonSampler, "__init__", init)
    audit = _audit(noise_multiplier=SMALL_CLAIM_SIGMA)[AUDIT_DELTA]
    assert audit.epsilon_lower_bound > _claim(SMALL_CLAIM_SIGMA, AUDIT_DELTA)
