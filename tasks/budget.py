"""Prefect task: calibrate every private stage's noise against the study budget (cached: PRV takes seconds)."""
from __future__ import annotations

from prefect import get_run_logger, task

from privacy.config import BudgetConfig, StageBudget
from privacy.ledger import StagePlan, plan_noise
from tasks.caching import STAGE_CACHE


@task(name="plan_privacy", cache_policy=STAGE_CACHE, persist_result=True)
def plan_privacy(*, stages: list[StagePlan], budget: BudgetConfig, num_train: int) -> dict[str, StageBudget]:
    """Sigma per stage so the composition of all stages meets (epsilon, delta); stage name -> its budget."""
    delta = budget.resolve_delta(num_train)
    sigmas = plan_noise(stages, target_epsilon=budget.epsilon, delta=delta, accountant=budget.accountant)
    logger = get_run_logger()
    for plan, sigma in zip(stages, sigmas):
        logger.info("privacy plan: %-8s q=%.4g steps=%d sigma=%.4f", plan.stage, plan.sample_rate,
                    plan.num_steps, sigma)
    return {plan.stage: StageBudget(noise_multiplier=sigma, target_epsilon=budget.epsilon, delta=delta,
                                    accountant=budget.accountant, secure_mode=budget.secure_mode)
            for plan, sigma in zip(stages, sigmas)}
