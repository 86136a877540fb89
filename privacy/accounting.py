"""Privacy accounting for DP-SGD: epsilon of a composition of Poisson-subsampled Gaussian runs, and
noise calibration against a target epsilon. Pure functions on `DPEvent` values; not the ledger or budget
planning (ledger.py), not the mechanism itself (engine.py).

Assumptions everywhere in this module: add-or-remove-one-example neighbouring relation; every step
samples each example independently with probability `sample_rate` (Poisson sampling); each step adds
Gaussian noise of std `noise_multiplier * max_grad_norm` to a sum of per-example gradients clipped to
`max_grad_norm`. Only the hyperparameters (sigma, q, steps) enter the accounting, never the data.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain

log = logging.getLogger(__name__)

History = list[tuple[float, float, int]]  # Opacus accountant history: (sigma, q, steps)

# PRV error control (see `_prv_epsilon`). Opacus' cost grows as 1 / eps_error (mesh size).
PRV_RELATIVE_EPS_ERROR = 0.005  # aim for eps_error = 0.5% of epsilon ...
PRV_ACCEPT_EPS_ERROR = 0.01     # ... and refine once more if the first pass was above 1%
PRV_MAX_EPS_ERROR = 0.5         # Opacus' domain bound is only argued for eps_error < 1
PRV_MAX_DOMAIN_SIZE = 2**22     # ~4M grid points: about 4 s, 1.3 GB peak; beyond, eps_error is loosened
# Google PLD (`_pld_epsilon`): discretisation interval relative to epsilon, and its bounds. 2e-5 * epsilon kept
# the pessimistic rounding within 0.5% of a 10x finer grid from eps = 2e-4 (T = 10) to eps = 50 (T = 1e5);
# coarser than 1e-2 over-reports eps = 6e3 at T = 1e5 by 3%.
PLD_RELATIVE_INTERVAL = 2e-5
PLD_MIN_INTERVAL, PLD_MAX_INTERVAL = 1e-7, 1e-2
SIGMA_MIN, SIGMA_MAX = 0.1, 1e3  # noise multipliers calibrate_noise searches between


class BudgetError(ValueError):
    """A privacy budget cannot be met (the prior spend already reaches it, or no noise level fits)."""


@dataclass(frozen=True, kw_only=True)
class DPEvent:
    """`num_steps` steps of the Poisson-subsampled Gaussian mechanism.

    noise_multiplier: sigma = noise std / clipping norm (> 0; `math.inf` means no privacy loss).
    sample_rate: q, probability that an example is in a step's batch, in (0, 1].
    num_steps: number of steps (>= 0).
    """

    noise_multiplier: float
    sample_rate: float
    num_steps: int

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check_sample_rate(self.sample_rate)
        _check_steps(self.num_steps, minimum=0)

    @property
    def is_free(self) -> bool:
        """True when the event spends no privacy (no steps, or infinite noise)."""
        return self.num_steps == 0 or math.isinf(self.noise_multiplier)


def _check_steps(num_steps: int, *, minimum: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < minimum:
        raise ValueError(f"num_steps must be an integer >= {minimum}, got {num_steps!r}")


def _check_noise(noise_multiplier: float) -> None:
    if not noise_multiplier > 0:  # also rejects NaN
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")


def _check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


@functools.lru_cache(maxsize=4096)
def _rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP at Opacus' default orders, cached per (sigma, q): its fractional orders cost about 0.1 s a
    curve, and a ledger composes the same events again and again."""
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                     orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)  # shared by every later call: an in-place update would corrupt them all
    return curve


def _rdp_epsilon(history: History, delta: float) -> float:
    """Opacus RDP accountant (`RDPAccountant.get_epsilon`: its default orders, `get_privacy_spent`) from cached
    curves: an upper bound on epsilon, typically 5-20% above the PRV/PLD value."""
    rdp = sum(steps * _rdp_curve(float(sigma), float(q)) for sigma, q, steps in history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": still an upper bound
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


class _PRVAccountant(PRVAccountant):
    """Opacus' PRVAccountant with its discretisation domain (`compute_safe_domain_size`, `_get_domain`) computed
    from the cached RDP curves: the same numbers, without recomputing each event's RDP on every call."""

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
        total = sum(num_self_compositions)
        history = [(p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, num_self_compositions, strict=True)]
        half_width = max(
            _rdp_epsilon(history, delta_error / 4),
            *(_rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)) for sigma, q, _ in history),
            eps_error,
        ) + 3
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-half_width, half_width, mesh)


# Integer orders only: a looser RDP bound, much faster than Opacus' fractional orders, cached per
# (sigma, q). Used for cheap estimates that steer the search and the PRV grid, never reported.
_FAST_ORDERS = (*range(2, 33), 40, 48, 64, 96, 128)


@functools.lru_cache(maxsize=4096)
def _fast_rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                     orders=list(_FAST_ORDERS))
    curve.setflags(write=False)
    return curve


def _fast_rdp_epsilon(history: History, delta: float) -> float:
    rdp = sum(steps * _fast_rdp_curve(sigma, q) for sigma, q, steps in history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=list(_FAST_ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


def _prv_domain_size(history: History, eps_error: float, delta_error: float) -> float:
    """About the number of grid points Opacus' PRVAccountant uses (`PRVAccountant._get_domain` and
    `compute_safe_domain_size`), with the faster, looser RDP bound: an overestimate."""
    total_steps = sum(t for _, _, t in history)
    half_width = max(
        _fast_rdp_epsilon(history, delta_error / 4),
        *(_fast_rdp_epsilon([(s, q, 1)], delta_error / (8 * total_steps)) for s, q, _ in history),
        eps_error,
    ) + 3
    mesh = eps_error / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


def _pld_epsilon(history: History, delta: float, *, scale: float | None = None) -> float:
    """Google's `dp_accounting` PLD accountant (connect-the-dots, pessimistic rounding): an upper bound on
    epsilon. Its discretisation interval is PLD_RELATIVE_INTERVAL * `scale` (an estimate of epsilon; the
    fast RDP bound if none), within [PLD_MIN_INTERVAL, PLD_MAX_INTERVAL]."""
    if scale is None:
        scale = _fast_rdp_epsilon(history, delta)
    interval = min(max(PLD_RELATIVE_INTERVAL * scale, PLD_MIN_INTERVAL), PLD_MAX_INTERVAL)
    accountant = PLDAccountant(value_discretization_interval=interval)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    with np.errstate(all="ignore"):
        return max(float(accountant.get_epsilon(delta)), 0.0)


def _prv_epsilon(history: History, delta: float) -> float:
    """Opacus PRV accountant (Gopi et al. 2021) with eps_error chosen relative to epsilon; refined by Google's
    PLD accountant where PRV's grid cannot certify 1%.

    `PRVAccountant.get_epsilon(delta, eps_error=e)` returns the UPPER end of its error interval: the
    estimate at delta - delta_error (delta_error = delta / 1000) plus `e`, i.e. an upper bound on
    epsilon as far as Gopi et al.'s discretisation error bound holds (Opacus notes its domain choice is
    argued for e < 1). The estimate itself is usually far more accurate than `e`, so the result
    over-reports by about `e`; Opacus' default e = 0.01 is 4% of eps = 0.2. We start from e = 0.5%
    of a fast RDP epsilon (cheap, an upper bound), and if the PRV value shows that was above 1% of
    epsilon, recompute with e = 0.5% of the PRV estimate (at most 3 passes). The cost of a call grows
    as 1 / e, so e is floored to keep the grid under PRV_MAX_DOMAIN_SIZE points.

    Where that floor leaves e above 1% of epsilon (epsilon below ~0.1 at 1e5 steps, or below ~1e-3 at 10
    steps: +8% to +13% measured), or where even e = PRV_MAX_EPS_ERROR needs a larger grid (epsilon in the
    thousands: Opacus' RDP bound, +11%, would be the fallback), the PLD upper bound (`_pld_epsilon`, with an
    interval relative to epsilon) is computed too and the smaller of the two upper bounds is returned.
    Negative PRV values (delta so large that epsilon = 0 meets it) are clamped to 0.
    """
    delta_error = delta / 1000
    eps_error_floor = _prv_domain_size(history, 1.0, delta_error) / PRV_MAX_DOMAIN_SIZE
    if eps_error_floor > PRV_MAX_EPS_ERROR:
        bound = _rdp_epsilon(history, delta)
        log.debug("PRV grid too large for %s; PLD refines the RDP bound %.6g", history, bound)
        return min(bound, _pld_epsilon(history, delta, scale=bound))
    estimate = _fast_rdp_epsilon(history, delta)
    eps_error = math.inf
    for _ in range(3):
        wanted = min(max(PRV_RELATIVE_EPS_ERROR * estimate, eps_error_floor), PRV_MAX_EPS_ERROR)
        if wanted >= eps_error:
            break
        eps_error = wanted
        _check_deadline()  # each pass can take seconds
        accountant = _PRVAccountant()
        accountant.history = list(history)
        with np.errstate(all="ignore"):
            epsilon = max(float(accountant.get_epsilon(delta, eps_error=eps_error)), 0.0)
        estimate = max(epsilon - eps_error, 0.0)
        if eps_error <= max(PRV_ACCEPT_EPS_ERROR * estimate, eps_error_floor):
            break
    if eps_error > PRV_ACCEPT_EPS_ERROR * estimate:
        _check_deadline()
        refined = _pld_epsilon(history, delta, scale=max(estimate, epsilon / 2))
        log.debug("PRV eps_error %.3g is over 1%% of %.6g; PLD gives %.6g", eps_error, estimate, refined)
        epsilon = min(epsilon, refined)
    log.debug("PRV epsilon %.6g with eps_error %.3g for %d event(s)", epsilon, eps_error, len(history))
    return epsilon


ACCOUNTANTS: dict[str, Callable[[History, float], float]] = {
    "prv": _prv_epsilon,
    "rdp": _rdp_epsilon,
    "pld": _pld_epsilon,
}


def compose_epsilon(events: Sequence[DPEvent], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon of the (heterogeneous, in-order irrelevant) composition of `events` at `delta`.

    Assumes add-or-remove-one neighbours and Poisson sampling (module docstring); `delta` in (0, 1).
    Returns an upper bound on epsilon: "prv" (Opacus PRVAccountant, refined by Google's PLD where PRV's grid
    is too coarse) is about 0.5-1% above the tight value (see `_prv_epsilon`), "pld" (Google's
    dp_accounting PLD alone, interval relative to epsilon) about as close, "rdp" (Opacus RDPAccountant)
    typically 5-20% above it; all are independent of the order of `events`. Events that spend nothing (0 steps,
    infinite noise) are
    dropped; no events give 0.0.
    """
    _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; known: {sorted(ACCOUNTANTS)}")
    history = tuple((e.noise_multiplier, e.sample_rate, e.num_steps) for e in events if not e.is_free)
    return _composed(history, delta, accountant) if history else 0.0


@functools.lru_cache(maxsize=8192)
def _composed(history: tuple, delta: float, accountant: str) -> float:
    """Memoised (the accountants are deterministic): a plan calibrated twice in one process, as `dpcompress run` does
    (pre-flight, then the flow), pays once. Raises AccountingTimeout past a `time_limit`."""
    _check_deadline()
    with warnings.catch_warnings():  # Opacus' "optimal order is the largest alpha" on RDP bounds
        warnings.simplefilter("ignore", UserWarning)
        return ACCOUNTANTS[accountant](list(history), delta)


class AccountingTimeout(TimeoutError):
    """An epsilon computation would start after the deadline of `time_limit`."""


_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("accounting_deadline", default=None)


def _check_deadline() -> None:
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline:
        raise AccountingTimeout("privacy accounting ran past its time limit")


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Within the block, an epsilon computation (`compose_epsilon`, and so `calibrate_noise`) that would start more
    than `seconds` after entering raises AccountingTimeout: bounds a calibration that would search for minutes (a
    tiny target epsilon with PRV). One already running finishes; each is bounded (a few seconds, see `_prv_epsilon`)."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def calibrate_noise(
    *,
    sample_rate: float,
    num_steps: int,
    target_epsilon: float,
    delta: float,
    prior: Sequence[DPEvent] = (),
    accountant: str = "prv",
    tolerance: float = 0.005,
) -> float:
    """Smallest noise multiplier sigma such that `prior` followed by `num_steps` steps at
    (sigma, sample_rate) composes to at most `target_epsilon` at `delta`.

    The returned sigma always satisfies the target; it is within a factor (1 + tolerance) of the
    smallest one that does. Sigma is searched in [SIGMA_MIN, SIGMA_MAX] by bisection in log-space,
    bracketed around a guess from a fast RDP bound (SIGMA_MIN is returned if even it fits). Raises
    BudgetError if `prior` alone reaches the target or if even SIGMA_MAX does not fit.
    Same assumptions as `compose_epsilon`; `tolerance` is relative, on sigma.
    """
    _check_sample_rate(sample_rate)
    _check_delta(delta)
    _check_steps(num_steps, minimum=1)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    prior = list(prior)
    prior_epsilon = compose_epsilon(prior, delta=delta, accountant=accountant)
    if prior_epsilon >= target_epsilon:
        raise BudgetError(
            f"prior spend already has epsilon {prior_epsilon:.4g} (delta={delta:g}, {accountant}), "
            f">= target {target_epsilon:.4g}; no noise level fits"
        )

    history = [(e.noise_multiplier, e.sample_rate, e.num_steps) for e in prior if not e.is_free]

    def epsilon(sigma: float) -> float:
        event = DPEvent(noise_multiplier=sigma, sample_rate=sample_rate, num_steps=num_steps)
        return compose_epsilon([*prior, event], delta=delta, accountant=accountant)

    def fast_rdp(sigma: float) -> float:  # cheap, looser bound: steers the search only
        return _fast_rdp_epsilon([*history, (sigma, sample_rate, num_steps)], delta)

    # Start from the fast-RDP solution, rescaled by the accountant/RDP ratio measured there (nearly
    # constant nearby); then bracket and bisect with the accountant itself.
    guess = _solve(lambda s: fast_rdp(s) <= target_epsilon)
    ratio = epsilon(guess) / fast_rdp(guess)
    if 0 < ratio < math.inf:
        guess = _solve(lambda s: ratio * fast_rdp(s) <= target_epsilon)

    def fits(sigma: float) -> bool:
        return epsilon(sigma) <= target_epsilon

    lo, hi = _bracket(fits, guess, step=1 + 4 * tolerance)
    if hi is None:
        raise BudgetError(
            f"no noise multiplier up to {SIGMA_MAX:g} brings epsilon to {target_epsilon:.4g} "
            f"(prior epsilon {prior_epsilon:.4g}, delta={delta:g}, {accountant})"
        )
    sigma = hi if lo is None else _bisect(fits, tolerance, lo, hi)
    log.info("calibrated sigma=%.4f for q=%g, T=%d, target eps=%.3f", sigma, sample_rate, num_steps,
             target_epsilon)
    return sigma


def _solve(fits: Callable[[float], bool]) -> float:
    """About the smallest sigma in [SIGMA_MIN, SIGMA_MAX] with fits(sigma) (SIGMA_MAX if none)."""
    return _bisect(fits, 1e-3, SIGMA_MIN, SIGMA_MAX) if fits(SIGMA_MAX) else SIGMA_MAX


def _bracket(fits: Callable[[float], bool], guess: float, *, step: float):
    """(lo, hi) with not fits(lo) and fits(hi), searched outward from `guess` in [SIGMA_MIN, SIGMA_MAX]
    by steps that square each time (step, step^2, step^4, ...).

    hi is None when SIGMA_MAX does not fit; lo is None when SIGMA_MIN fits (then hi = SIGMA_MIN).
    """
    sigma = min(max(guess, SIGMA_MIN), SIGMA_MAX)
    if fits(sigma):
        hi = sigma
        while hi > SIGMA_MIN:
            candidate, step = max(hi / step, SIGMA_MIN), step * step
            if not fits(candidate):
                return candidate, hi
            hi = candidate
        return None, hi
    lo = sigma
    while lo < SIGMA_MAX:
        candidate, step = min(lo * step, SIGMA_MAX), step * step
        if fits(candidate):
            return lo, candidate
        lo = candidate
    return lo, None


def _bisect(fits: Callable[[float], bool], tolerance: float, lo: float, hi: float) -> float:
    """Bisection in log-space on a monotone predicate with fits(hi); returns a fitting sigma."""
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi
