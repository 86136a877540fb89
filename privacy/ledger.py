"""The privacy ledger: the study's privacy spend as data (one plain entry per DP training stage), its
composed epsilon, the budget check made before a stage trains, and per-stage noise planning.
Not here: the epsilon arithmetic itself (accounting.py) or the DP-SGD mechanism (engine.py).

Assumptions, as in accounting.py: add-or-remove-one-training-example neighbours, Poisson sampling,
Gaussian noise; every stage runs on the same private data set, so all stages compose. Entries hold
hyperparameters and a data fingerprint only, never private data.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from . import files
from .accounting import ACCOUNTANTS, BudgetError, DPEvent, calibrate_noise, compose_epsilon
from .mechanisms import get_mechanism
from .noise import NOISE_SOURCES

FORMAT = "dpcompress.ledger/1"
SAMPLINGS = ("poisson",)  # what the accountants assume
UNITS = ("example",)      # unit of privacy the accountants assume


class BudgetExceededError(BudgetError):
    """A stage would bring the study's composed epsilon over its budget."""


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One finished DP stage on the private data.

    noise_multiplier, sample_rate, num_steps: the stage's DP-SGD run, or its Gaussian-sum release (see `DPEvent`).
    max_grad_norm: per-example clipping (or normalisation) norm (L2), recorded for audit; it does not enter epsilon.
    mechanism: a name in the mechanism registry (privacy.mechanisms).
    epsilon_after: epsilon of the whole ledger composed up to and including this entry, at `delta`
        with `accountant`.
    dataset_fingerprint: keyed fingerprint (HMAC, privacy.fingerprint) of the private data used ("" if unknown).
    noise: where the noise and the sampling came from (privacy.noise.NOISE_SOURCES); "seeded" means the test mode,
        with NO differential-privacy guarantee.
    """

    stage: str
    noise_multiplier: float
    sample_rate: float
    num_steps: int
    max_grad_norm: float
    epsilon_after: float
    delta: float
    accountant: str
    sampling: str = "poisson"
    unit: str = "example"
    dataset_fingerprint: str = ""
    mechanism: str = "dp_sgd"
    noise: str = "secret"

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not self.stage:
            raise ValueError(f"stage must be a non-empty string, got {self.stage!r}")
        _ = self.event  # validates noise_multiplier, sample_rate, num_steps
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not self.epsilon_after >= 0:
            raise ValueError(f"epsilon_after must be >= 0, got {self.epsilon_after!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; known: {sorted(ACCOUNTANTS)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS} (what the accountants assume), "
                             f"got {self.sampling!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {self.noise!r}")
        get_mechanism(self.mechanism).check(self.event)

    @property
    def event(self) -> DPEvent:
        return DPEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                       num_steps=self.num_steps)


@dataclass(frozen=True)
class Ledger:
    """An immutable, ordered record of the study's DP stages; `append` returns a new ledger."""

    entries: tuple[LedgerEntry, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        for entry in self.entries:
            if not isinstance(entry, LedgerEntry):
                raise TypeError(f"ledger entries must be LedgerEntry, got {type(entry).__name__}")
        names = self.stage_names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate stage names in ledger: {duplicates}")

    @property
    def has_guarantee(self) -> bool:
        """False if any entry's noise was seeded (the test mode): then no epsilon of this ledger is a guarantee."""
        return all(entry.noise != "seeded" for entry in self.entries)

    def stage_names(self) -> list[str]:
        return [entry.stage for entry in self.entries]

    def events(self) -> list[DPEvent]:
        return [entry.event for entry in self.entries]

    def epsilon(self, *, delta: float, accountant: str = "prv") -> float:
        """Epsilon of all entries composed, at `delta` (recomputed, not read from epsilon_after)."""
        return compose_epsilon(self.events(), delta=delta, accountant=accountant)

    def check_fits(self, *, stage: str, event: DPEvent, target_epsilon: float, delta: float,
                   accountant: str = "prv") -> float:
        """Composed epsilon after adding `event`; call BEFORE training the stage.

        Raises BudgetExceededError if it exceeds `target_epsilon` (relative slack 1e-9 for rounding),
        and ValueError if `stage` is already recorded (`append` would refuse it after training).
        """
        if stage in self.stage_names():
            raise ValueError(f"stage '{stage}' is already in the ledger")
        epsilon = compose_epsilon([*self.events(), event], delta=delta, accountant=accountant)
        if epsilon > target_epsilon * (1 + 1e-9):
            raise BudgetExceededError(
                f"stage '{stage}' would bring epsilon to {epsilon:.3f} (delta={delta:g}, {accountant}), "
                f"over the study budget {target_epsilon:.3f} by {epsilon - target_epsilon:.3f}"
            )
        return epsilon

    def append(self, entry: LedgerEntry) -> Ledger:
        """A new ledger with `entry` added; refuses a stage name already present."""
        if entry.stage in self.stage_names():
            raise ValueError(f"stage '{entry.stage}' is already in the ledger")
        return Ledger((*self.entries, entry))

    def record(self, *, stage: str, event: DPEvent, max_grad_norm: float, delta: float,
               accountant: str = "prv", dataset_fingerprint: str = "", mechanism: str = "dp_sgd",
               noise: str = "secret") -> Ledger:
        """`append` an entry for `event`, with epsilon_after computed from this ledger plus `event`."""
        epsilon_after = compose_epsilon([*self.events(), event], delta=delta, accountant=accountant)
        return self.append(LedgerEntry(
            stage=stage, noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate,
            num_steps=event.num_steps, max_grad_norm=max_grad_norm, epsilon_after=epsilon_after,
            delta=delta, accountant=accountant, dataset_fingerprint=dataset_fingerprint, mechanism=mechanism,
            noise=noise,
        ))

    def to_json(self) -> str:
        data = {"format": FORMAT, "entries": [asdict(entry) for entry in self.entries]}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a privacy ledger (expected format {FORMAT!r})")
        known = {f.name for f in fields(LedgerEntry)}
        entries = []
        for item in data.get("entries", []):
            unknown = sorted(set(item) - known)
            if unknown:
                raise ValueError(f"unknown ledger entry keys: {unknown}")
            entries.append(LedgerEntry(**item))
        return cls(tuple(entries))

    def save(self, path: str | os.PathLike) -> None:
        """Write the ledger as pretty JSON with sorted keys, atomically (privacy.files)."""
        files.write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ledger:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """A DP stage still to run. budget_share: this stage's share of the total epsilon; the cumulative
    spend after it may reach target * (shares so far) / (all shares). noise_multiplier: a fixed sigma
    that `plan_noise` uses as given, or None to calibrate one. mechanism: a registered mechanism's name."""

    stage: str
    sample_rate: float
    num_steps: int
    budget_share: float
    noise_multiplier: float | None = None
    mechanism: str = "dp_sgd"

    def __post_init__(self) -> None:
        DPEvent(noise_multiplier=self.noise_multiplier or 1.0, sample_rate=self.sample_rate,
                num_steps=self.num_steps)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps!r}")
        if not self.budget_share > 0:
            raise ValueError(f"budget_share must be > 0, got {self.budget_share!r}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"stage '{self.stage}': noise_multiplier must be > 0, got {self.noise_multiplier!r}")

    def event_at(self, noise_multiplier: float) -> DPEvent:
        return DPEvent(noise_multiplier=noise_multiplier, sample_rate=self.sample_rate, num_steps=self.num_steps)


def plan_noise(stages: Sequence[StagePlan], *, target_epsilon: float, delta: float,
               spent: Ledger | Sequence[DPEvent] = (), accountant: str = "prv") -> list[float]:
    """Noise multipliers for `stages`, in order, calibrated sequentially.

    Stage i gets the smallest sigma such that `spent` followed by stages 0..i composes to
    target_epsilon * (budget_share of stages 0..i) / (sum of all budget_share); the last stage lands on
    target_epsilon. Stage i's sigma depends on later stages only through the sum of all shares (not at
    all if the shares sum to 1); their steps and sample rates never change it. Shares are fractions
    of the whole target_epsilon, `spent` included: BudgetError if `spent` already reaches a stage's
    cumulative budget. Stage names must be unique and not already in a `spent` Ledger.

    A stage with a fixed `noise_multiplier` keeps it: BudgetError naming it if `spent` and the fixed
    stages up to it already compose to more than target_epsilon. The other stages are calibrated as
    above, except that the last calibrated stage lands on target_epsilon with every fixed stage (later
    ones too) included, and a calibrated stage after fixed stages that spent more than their shares
    gets at least its share of what is left: e + (target - e) * share / (shares from it on), for e the
    epsilon spent before it.
    """
    _check_names(stages, spent)
    events = list(spent.events() if isinstance(spent, Ledger) else spent)
    _check_fixed(stages, events, target_epsilon=target_epsilon, delta=delta, accountant=accountant)
    calibrated = [i for i, plan in enumerate(stages) if plan.noise_multiplier is None]
    total_share = sum(s.budget_share for s in stages)
    sigmas, share_so_far = [], 0.0
    for i, plan in enumerate(stages):
        share_before, share_so_far = share_so_far, share_so_far + plan.budget_share
        if plan.noise_multiplier is not None:
            sigma = plan.noise_multiplier
        elif i == calibrated[-1]:
            later_fixed = [p.event_at(p.noise_multiplier) for p in stages[i + 1:]]
            sigma = _calibrate(plan, target_epsilon, [*events, *later_fixed], delta, accountant)
        else:
            target = target_epsilon * share_so_far / total_share
            if any(p.noise_multiplier is not None for p in stages[:i]):
                spent_before = compose_epsilon(events, delta=delta, accountant=accountant)
                rest = (target_epsilon - spent_before) * plan.budget_share / (total_share - share_before)
                target = max(target, spent_before + rest)
            sigma = _calibrate(plan, target, events, delta, accountant)
        sigmas.append(sigma)
        events.append(plan.event_at(sigma))
    return sigmas


def _check_names(stages: Sequence[StagePlan], spent) -> None:
    names = [s.stage for s in stages]
    taken = set(spent.stage_names()) if isinstance(spent, Ledger) else set()
    clashes = sorted({n for n in names if names.count(n) > 1 or n in taken})
    if clashes:
        raise ValueError(f"stage names already used: {clashes}")


def _check_fixed(stages: Sequence[StagePlan], events: list[DPEvent], *, target_epsilon: float, delta: float,
                 accountant: str) -> None:
    """BudgetError naming the first fixed-sigma stage with which `events` and the fixed stages so far
    compose to more than target_epsilon (relative slack 1e-9)."""
    fixed = list(events)
    for plan in stages:
        if plan.noise_multiplier is None:
            continue
        fixed.append(plan.event_at(plan.noise_multiplier))
        epsilon = compose_epsilon(fixed, delta=delta, accountant=accountant)
        if epsilon > target_epsilon * (1 + 1e-9):
            raise BudgetError(
                f"stage '{plan.stage}' with fixed noise multiplier {plan.noise_multiplier:g} brings epsilon "
                f"to {epsilon:.3f} (delta={delta:g}, {accountant}), over the budget {target_epsilon:.3f}"
            )


def _calibrate(plan: StagePlan, target: float, prior: list[DPEvent], delta: float, accountant: str) -> float:
    try:
        return calibrate_noise(sample_rate=plan.sample_rate, num_steps=plan.num_steps, target_epsilon=target,
                               delta=delta, prior=prior, accountant=accountant)
    except BudgetError as err:
        raise BudgetError(f"stage '{plan.stage}' (cumulative budget {target:.4g}): {err}") from err


SCOPES = ("study", "line")


def plan_lines(teacher: StagePlan, lines: Sequence[Sequence[StagePlan]], *, scope: str, target_epsilon: float,
               delta: float, accountant: str = "prv") -> dict[str, float]:
    """Noise multipliers (stage name -> sigma) for a teacher followed by model lines that each start from it.

    scope "study": every stage of every line composes with every other into one (target_epsilon, delta),
    in the order teacher, line 0, line 1, ... (`plan_noise` over that sequence): releasing all models
    together is covered. scope "line": each line, teacher included, composes to target_epsilon on its
    own (the paper's comparison of compression methods at one epsilon); the teacher takes the fraction
    `teacher.budget_share` (< 1) of it in every line and each line's stages split the rest by their
    shares. The teacher gets one sigma, the same in every line. Releasing models of several lines
    together costs their composition (`union_epsilon`), above target_epsilon.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "study" or not lines:
        stages = [teacher, *(s for line in lines for s in line)]
        return dict(zip((s.stage for s in stages), plan_noise(stages, target_epsilon=target_epsilon, delta=delta,
                                                                  accountant=accountant)))
    if not 0 < teacher.budget_share < 1:
        raise ValueError(f"with scope 'line' the teacher's share is a fraction of epsilon in (0, 1), "
                         f"got {teacher.budget_share!r}")
    _check_names([teacher, *(s for line in lines for s in line)], ())
    sigmas: dict[str, float] = {}
    for line in lines:
        rest = (1 - teacher.budget_share) / sum(s.budget_share for s in line)
        first = teacher if not sigmas else replace(teacher, noise_multiplier=sigmas[teacher.stage])
        stages = [first, *(replace(s, budget_share=s.budget_share * rest) for s in line)]
        sigmas |= dict(zip((s.stage for s in stages), plan_noise(stages, target_epsilon=target_epsilon,
                                                                  delta=delta, accountant=accountant)))
    return sigmas


def union_epsilon(ledgers: Sequence[Ledger], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon of releasing every model whose ledger is given: the composition of all distinct stages
    (a stage shared by several lineages, like the teacher, counts once)."""
    entries = {e.stage: e for ledger in ledgers for e in ledger.entries}
    return compose_epsilon([e.event for e in entries.values()], delta=delta, accountant=accountant)


def plan_budgets(teacher: StagePlan, lines: Sequence[Sequence[StagePlan]], *, budget, num_train: int) -> dict:
    """Every stage's `privacy.config.StageBudget` (its event at the calibrated sigma, mechanism, target, delta,
    accountant, noise source) for a study with `budget` (a `BudgetConfig`) and `num_train` private examples: the one
    source of these numbers for the stages, their ledgers and `dpcompress budget plan`."""
    from .config import StageBudget

    delta = budget.resolve_delta(num_train)
    sigmas = plan_lines(teacher, lines, scope=budget.scope, target_epsilon=budget.epsilon, delta=delta,
                        accountant=budget.accountant)
    return {p.stage: StageBudget(event=p.event_at(sigmas[p.stage]), mechanism=p.mechanism,
                                 target_epsilon=budget.epsilon, delta=delta, accountant=budget.accountant,
                                 secure_mode=budget.secure_mode, seeded=budget.reproducible_noise)
            for p in [teacher, *(s for line in lines for s in line)]}
