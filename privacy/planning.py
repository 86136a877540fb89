"""Noise planning before a study trains: sigma for each private stage so that the stages compose to the budget, in
run order, each up to its cumulative share, under scope "study" (everything composes) or "line" (each model line
does). Not here: the record of what was spent (ledger.py) or the epsilon arithmetic (accounting.py).

Assumptions as in accounting.py: add-or-remove-one-example neighbours, Poisson sampling, Gaussian noise; every stage
runs on the same private data set, so all stages compose.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .accounting import BudgetError, DPEvent, calibrate_noise, compose_epsilon
from .ledger import Ledger
from .mechanisms import require_composable


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """A DP stage still to run. budget_share: this stage's share of the total epsilon; the cumulative
    spend after it may reach target * (shares so far) / (all shares). noise_multiplier: a fixed sigma
    that `plan_noise` uses as given, or None to calibrate one. mechanism: a registered mechanism's name.
    independent: the first stage of a model line that does not start from the teacher (it fine-tunes the
    pretrained model itself): `plan_lines` plans that line without the teacher."""

    stage: str
    sample_rate: float
    num_steps: int
    budget_share: float
    noise_multiplier: float | None = None
    mechanism: str = "dp_sgd"
    independent: bool = False

    def __post_init__(self) -> None:
        require_composable(self.mechanism)
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
    """Noise multipliers (stage name -> sigma) for a teacher followed by model lines that each start from it, or
    from the pretrained model (an independent line: its first stage is `independent`).

    scope "study": every stage of every line composes with every other into one (target_epsilon, delta),
    in the order teacher, line 0, line 1, ... (`plan_noise` over that sequence): releasing all models
    together is covered. scope "line": each line composes to target_epsilon on its own (the paper's
    comparison of compression methods at one epsilon). A line from the teacher includes it: the teacher
    takes the fraction `teacher.budget_share` (< 1) of epsilon in every such line and the line's stages
    split the rest by their shares; the teacher gets one sigma, the same in every line. An independent
    line's stages split all of epsilon by their shares, and the teacher alone (no line from it) gets all
    of it. Releasing models of several lines together costs their composition (`union_epsilon`), above
    target_epsilon.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "study":
        stages = [teacher, *(s for line in lines for s in line)]
        return dict(zip((s.stage for s in stages), plan_noise(stages, target_epsilon=target_epsilon, delta=delta,
                                                                  accountant=accountant)))
    _check_names([teacher, *(s for line in lines for s in line)], ())
    independent = [line for line in lines if line and line[0].independent]
    from_teacher = [line for line in lines if line and not line[0].independent]
    if not from_teacher:
        sigmas = dict(zip([teacher.stage], plan_noise([replace(teacher, budget_share=1.0)],
                                                      target_epsilon=target_epsilon, delta=delta,
                                                      accountant=accountant)))
    elif not 0 < teacher.budget_share < 1:
        raise ValueError(f"with scope 'line' the teacher's share is a fraction of epsilon in (0, 1), "
                         f"got {teacher.budget_share!r}")
    else:
        sigmas = {}
    for line in from_teacher:
        rest = (1 - teacher.budget_share) / sum(s.budget_share for s in line)
        first = teacher if not sigmas else replace(teacher, noise_multiplier=sigmas[teacher.stage])
        stages = [first, *(replace(s, budget_share=s.budget_share * rest) for s in line)]
        sigmas |= dict(zip((s.stage for s in stages), plan_noise(stages, target_epsilon=target_epsilon,
                                                                  delta=delta, accountant=accountant)))
    for line in independent:
        sigmas |= dict(zip((s.stage for s in line), plan_noise(line, target_epsilon=target_epsilon, delta=delta,
                                                                accountant=accountant)))
    return sigmas


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
