"""Prefect tasks for the budget: calibrate every private stage's noise against the study budget (memoised in the
process: PRV takes seconds, and pre-flight has planned the same study already), and reserve / release the study's
releases in the persistent dataset ledger (one lifetime budget per dataset, across studies)."""
from __future__ import annotations

import uuid

from prefect import task

from privacy.config import BudgetConfig, StageBudget
from privacy.dataset_ledger import DatasetLedger, default_ledger_url
from privacy.planning import StagePlan, plan_budgets
from tasks.caching import NOT_CACHED
from tasks.console import run_logger
from tasks.refs import BudgetAccount, DataRef


@task(name="plan_privacy", **NOT_CACHED)  # pure and memoised (privacy.accounting)
def plan_privacy(*, teacher: StagePlan, lines: list[list[StagePlan]], budget: BudgetConfig,
                 num_train: int) -> dict[str, StageBudget]:
    """Every private stage's budget (its DP event at the calibrated sigma) so that the study (scope "study") or each
    line (scope "line") meets (epsilon, delta)."""
    budgets = plan_budgets(teacher, lines, budget=budget, num_train=num_train)
    logger = run_logger()
    for name, stage in budgets.items():
        logger.info("privacy plan: %-14s q=%.4g steps=%d sigma=%.4f (%s)", name, stage.event.sample_rate,
                    stage.event.num_steps, stage.noise_multiplier, stage.mechanism)
    return budgets


@task(name="reserve_budget", **NOT_CACHED)
def reserve_budget(*, data: DataRef, plan: dict[str, StageBudget], budget: BudgetConfig, study: str,
                   study_key: str) -> BudgetAccount:
    """Reserve every planned release of this run against the dataset's lifetime budget, before any private stage
    touches the data; DatasetBudgetError (naming the studies that spent it) if they would not fit."""
    first = next(iter(plan.values()))
    account = BudgetAccount(url=budget.dataset_ledger or default_ledger_url(), dataset=data.source_fingerprint,
                            study=study, study_key=study_key, run_id=uuid.uuid4().hex,
                            epsilon_budget=budget.lifetime_epsilon, delta=first.delta, accountant=first.accountant)
    planned = [(name, stage.event, stage.mechanism) for name, stage in plan.items()]
    with DatasetLedger(account.url) as ledger:
        reserved = ledger.reserve(dataset=account.dataset, study=study, study_key=study_key, run_id=account.run_id,
                                  planned=planned, epsilon_budget=account.epsilon_budget, delta=account.delta,
                                  accountant=account.accountant)
    run_logger().info("dataset budget: reserved %d of %d planned releases (lifetime epsilon %g)", len(reserved),
                          len(planned), account.epsilon_budget)
    return account


@task(name="release_budget", **NOT_CACHED)
def release_budget(*, account: BudgetAccount) -> None:
    """Drop this run's reservations that no stage used (stages served from the cache spend nothing)."""
    with DatasetLedger(account.url) as ledger:
        ledger.release(run_id=account.run_id)
