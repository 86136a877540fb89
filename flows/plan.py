"""Which stages of a study train on the private data, with their sampling, steps and share of the budget."""
from __future__ import annotations

from flows.config import StudyConfig
from privacy.ledger import StagePlan


def private_stages(cfg: StudyConfig, num_train: int) -> list[StagePlan]:
    """Every stage that trains on the private data, in run order.

    Stages are calibrated in this order, each to its cumulative share of the budget, so a later stage's
    settings (steps, sampling) never change an earlier stage's sigma: changing pruning never retrains
    the teacher. Shares are renormalised over the stages that run. A stage named in
    `privacy.fixed_noise` keeps that noise multiplier; ValueError if it names a stage that does not run.
    """
    b = cfg.privacy
    stages = [("teacher", cfg.teacher, b.teacher_share)]
    if cfg.prune.enabled:
        rounds = cfg.prune.schedule.rounds
        stages += [(f"prune_{r}", cfg.prune.train, b.prune_share / rounds) for r in range(1, rounds + 1)]
    if cfg.distill.enabled:
        stages.append(("distill", cfg.distill.train, b.distill_share))
    unknown = sorted(set(b.fixed_noise) - {name for name, _, _ in stages})
    if unknown:
        raise ValueError(f"privacy.fixed_noise names stages that do not run: {unknown}; "
                         f"stages: {[name for name, _, _ in stages]}")
    return [StagePlan(stage=name, sample_rate=train.sample_rate(num_train), num_steps=train.num_steps(num_train),
                      budget_share=share, noise_multiplier=b.fixed_noise.get(name)) for name, train, share in stages]
