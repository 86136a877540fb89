"""Pre-flight checks of a study's privacy budget, bounded in time: delta against 1/n, the stages `privacy.fixed_noise`
and `tracking.register_stage` name, a cheap test that any noise level fits, then the full plan (under a time limit),
and the dataset's lifetime budget across studies (read-only). One line per problem, naming the field.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.config import StudyConfig, study_key
from flows.plan import TEACHER, model_lines, stage_plans
from privacy.accounting import SIGMA_MAX, AccountingTimeout, compose_epsilon, time_limit
from privacy.planning import StagePlan

PLAN_TIMEOUT_S = 60.0
# the quick test (PLD at sigma = SIGMA_MAX: fast where PRV takes seconds, but up to ~5% above it) refuses a budget
# only this far beyond it; closer cases are left to the full plan with the study's own accountant
FEASIBILITY_MARGIN = 1.25


def check_budget(cfg: StudyConfig, num_train: int) -> list[str]:
    """The quick checks, each a second or less: delta < 1/n, fixed-noise stages that run, the stage to register,
    and whether even the most noise the calibration may choose fits the budget."""
    if num_train < 2:  # delta must be below 1/n: no mechanism protects a dataset of one
        return [f"data: {num_train} training example(s) after data.max_train_examples; a private study needs at "
                "least 2 (and many more to learn anything under differential privacy)"]
    try:
        delta = cfg.privacy.resolve_delta(num_train)
        teacher, lines = stage_plans(cfg, num_train)
    except ValueError as err:  # its message names privacy.delta or privacy.fixed_noise
        return [str(err)]
    groups = ([[teacher, *(p for line in lines.values() for p in line)]] if cfg.privacy.scope == "study"
              else [[*line] if line[0].independent else [teacher, *line] for line in lines.values()] + [[teacher]])
    with time_limit(PLAN_TIMEOUT_S):
        try:
            found = next(filter(None, (_fits(cfg, group, delta) for group in groups)), [])
        except AccountingTimeout:
            found = [_timeout(cfg)]
    return _register_stage(cfg) + _ledger_place(cfg) + found


def _ledger_place(cfg: StudyConfig) -> list[str]:
    """The dataset ledger's URL is one dpcompress can use; a SQLite ledger's folder can be written (the first study
    creates the file)."""
    from flows.preflight_io import unwritable
    from privacy.dataset_ledger import default_ledger_url
    from privacy.ledger_store import resolve_url

    text = cfg.privacy.dataset_ledger or default_ledger_url()
    field = ("privacy.dataset_ledger" if cfg.privacy.dataset_ledger else
             "$DPCOMPRESS_LEDGER_URL" if os.environ.get("DPCOMPRESS_LEDGER_URL") else "the dataset ledger")
    try:
        url = resolve_url(text)
    except ValueError as err:
        return [f"{field}={text!r}: {err}"]
    why = url.get_backend_name() == "sqlite" and unwritable(Path(url.database).parent)
    return [f"{field}={text!r}: {why}"] if why else []


def _register_stage(cfg: StudyConfig) -> list[str]:
    stage = cfg.tracking.register_stage
    names = [TEACHER, *(s.name for line in model_lines(cfg).values() for s in line if s.kind != "prune_statistics")]
    if stage is None or stage in names:
        return []
    return [f"tracking.register_stage={stage!r} is not a private model this study trains; models: {names}"]


def _fits(cfg: StudyConfig, group: list[StagePlan], delta: float) -> list[str]:
    """Two necessary conditions of a plan. The fixed-noise stages alone fit the budget (with the study's accountant, as
    the plan checks them: the first stage that breaks it is named). The calibrated stages alone fit it at the largest
    noise the calibration tries (SIGMA_MAX), by the PLD accountant, fast at such noise where PRV takes seconds; it
    refuses only past FEASIBILITY_MARGIN, as PLD runs a few percent above PRV there."""
    target, fixed = cfg.privacy.epsilon, []
    for plan in (p for p in group if p.noise_multiplier is not None):
        fixed.append(plan.event_at(plan.noise_multiplier))
        epsilon = compose_epsilon(fixed, delta=delta, accountant=cfg.privacy.accountant)
        if epsilon > target * (1 + 1e-9):
            return [(f"{_fixed_field(cfg, plan.stage)}: stage {plan.stage!r} with fixed noise multiplier "
                    f"{plan.noise_multiplier:g} brings epsilon to {epsilon:.3g} (delta {delta:.3g}), over "
                    f"privacy.epsilon={target:g}; raise its noise or the budget")]
    calibrated = [p.event_at(SIGMA_MAX) for p in group if p.noise_multiplier is None]
    epsilon = compose_epsilon(calibrated, delta=delta, accountant="pld")
    if epsilon > target * FEASIBILITY_MARGIN:
        return [(f"privacy.epsilon={target:g} cannot be met: even noise multiplier {SIGMA_MAX:g} in each of the "
                f"{len(calibrated)} calibrated stages gives epsilon {epsilon:.3g} (delta {delta:.3g}); raise epsilon "
                "or train fewer steps (epochs, batch_size)")]
    return []


def _fixed_field(cfg: StudyConfig, stage: str) -> str:
    if stage in cfg.privacy.fixed_noise or not stage.endswith("_stats"):
        return f"privacy.fixed_noise.{stage}"
    return "prune.schedule.stats_noise"


def bounded_plan(cfg: StudyConfig, num_train: int, compute: Callable[[StudyConfig, int], Any],
                 timeout_s: float | None = None) -> tuple[Any, list[str]]:
    """(`compute(cfg, num_train)`, []) with every epsilon computation started within `timeout_s` (default
    PLAN_TIMEOUT_S), or (None, [the problem]) if it ran out of time or the budget cannot be met."""
    try:
        with time_limit(PLAN_TIMEOUT_S if timeout_s is None else timeout_s):
            return compute(cfg, num_train), []
    except AccountingTimeout:
        return None, [_timeout(cfg, timeout_s)]
    except ValueError as err:  # BudgetError, a line-scope teacher share out of (0, 1)
        message = str(err)
        stage = message.split("'")[1] if message.startswith("stage '") else None
        field = _fixed_field(cfg, stage) if stage and "fixed noise" in message else "privacy.epsilon"
        return None, [f"{field}: {message}"]


def _timeout(cfg: StudyConfig, timeout_s: float | None = None) -> str:
    return (f"privacy: could not plan within {PLAN_TIMEOUT_S if timeout_s is None else timeout_s:g} s "
            f"(epsilon={cfg.privacy.epsilon:g}, {cfg.privacy.accountant} accountant); a tiny epsilon makes the "
            "calibration slow: raise privacy.epsilon, train fewer steps, or try privacy.accountant: pld")


def check_dataset_budget(cfg: StudyConfig, budgets: dict, source_train) -> list[str]:
    """Would the dataset's lifetime budget refuse this study (privacy.dataset_ledger)? Read-only; skipped where no
    study can have spent anything yet (no fingerprint key, no ledger file) or the ledger is not a local file."""
    from sqlalchemy.exc import SQLAlchemyError

    from compression.data import fingerprint
    from privacy.dataset_ledger import DatasetBudgetError, DatasetLedger, default_ledger_url
    from privacy.fingerprint import KEY_FILE, owner_home, owner_key
    from privacy.ledger_store import resolve_url

    text = cfg.privacy.dataset_ledger or default_ledger_url()
    if resolve_url(text).get_backend_name() != "sqlite" or not (owner_home() / KEY_FILE).is_file():
        return []
    try:
        ledger = DatasetLedger(text, create=False)
    except FileNotFoundError:
        return []  # no ledger yet: nothing spent
    first = next(iter(budgets.values()))
    planned = [(name, budget.event, budget.mechanism) for name, budget in budgets.items()]
    try:
        with ledger, time_limit(PLAN_TIMEOUT_S):
            ledger.check(dataset=fingerprint(source_train, key=owner_key()), study=cfg.name, study_key=study_key(cfg),
                         planned=planned, epsilon_budget=cfg.privacy.lifetime_epsilon, delta=first.delta,
                         accountant=first.accountant)
    except DatasetBudgetError as err:
        return [f"privacy.dataset_budget: {err}"]
    except AccountingTimeout:
        return [_timeout(cfg)]
    except SQLAlchemyError as err:
        return [f"privacy.dataset_ledger={text!r}: cannot read it ({str(err).splitlines()[0]})"]
    return []
