"""Prefect task: calibrate every private stage's noise against the study budget (cached: PRV takes seconds)."""
from __future__ import annotations

from prefect import get_run_logger, task

from privacy.config import BudgetConfig, StageBudget
from privacy.ledger import StagePlan, plan_lines
from tasks.caching import STAGE_CACHE


@task(name="plan_privacy", cache_policy=STAGE_CACHE, persist_result=True)
def plan_privacy(*, teacher: StagePlan, lines: list[list[StagePlan]], budget: BudgetConfig,
                 num_train: int) -> dict[str, StageBudget]:
    """Sigma per stage so that the study (scope "study") or each line (scope "line") meets (epsilon, delta)."""
    delta = budget.resolve_delta(num_train)
    sigmas = plan_lines(teacher, lines, scope=budget.scope, target_epsilon=budget.epsilon, delta=delta,
                        accountant=budget.accountant)
    plans = {p.stage: p for p in [teacher, *(s for line in lines for s in line)]}
    logger = get_run_logger()
    for name, sigma in sigmas.items():
        logger.info("privacy plan: %-14s q=%.4g steps=%d sigma=%.4f", name, plans[name].sample_rate,
                    plans[name].num_steps, sigma)
    return {name: StageBudget(noise_multiplier=sigma, target_epsilon=budget.epsilon, delta=delta,
                              accountant=budget.accountant, secure_mode=budget.secure_mode,
                              seeded=budget.reproducible_noise)
            for name, sigma in sigmas.items()}
