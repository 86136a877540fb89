"""The study's privacy plan: which stages train on private data, their sampling, steps and calibrated sigma."""
from __future__ import annotations

from dataclasses import dataclass

from flows.config import StudyConfig
from privacy.accounting import StagePlan, plan_noise
from privacy.config import StageBudget


@dataclass(frozen=True)
class PlannedStage:
    stage: str
    sample_rate: float
    num_steps: int
    budget: StageBudget


def private_stages(cfg: StudyConfig, num_train: int) -> list[tuple[str, object, float]]:
    """(stage name, TrainConfig, budget share) for every stage that trains on the private data, in run order."""
    b = cfg.privacy
    stages = [("teacher", cfg.teacher, b.teacher_share)]
    if cfg.prune.enabled:
        rounds = cfg.prune.schedule.rounds
        stages += [(f"prune_{r}", cfg.prune.train, b.prune_share / rounds) for r in range(1, rounds + 1)]
    if cfg.distill.enabled:
        stages.append(("distill", cfg.distill.train, b.distill_share))
    return stages


def plan_budget(cfg: StudyConfig, num_train: int) -> dict[str, PlannedStage]:
    """Calibrate every stage's sigma so the composition of all stages meets (epsilon, delta) exactly.

    Stages are calibrated in run order, each to its cumulative share of the budget, so a later stage's
    settings never change an earlier stage's sigma (changing pruning never retrains the teacher).
    """
    delta = cfg.privacy.resolve_delta(num_train)
    stages = private_stages(cfg, num_train)
    plans = [StagePlan(stage=name, sample_rate=train.sample_rate(num_train), num_steps=train.num_steps(num_train),
                       budget_share=share) for name, train, share in stages]
    sigmas = plan_noise(plans, target_epsilon=cfg.privacy.epsilon, delta=delta, accountant=cfg.privacy.accountant)
    return {p.stage: PlannedStage(p.stage, p.sample_rate, p.num_steps, StageBudget(
        noise_multiplier=sigma, target_epsilon=cfg.privacy.epsilon, delta=delta,
        accountant=cfg.privacy.accountant, secure_mode=cfg.privacy.secure_mode)) for p, sigma in zip(plans, sigmas)}
