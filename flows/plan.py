"""The study's model lines (which stages train on the private data, in what order, from which model) and their
privacy plan. A line starts from the DP teacher: the pruning rounds, the structured rounds, each distilled student."""
from __future__ import annotations

from dataclasses import dataclass

from compression.prune import stats_stage
from flows.config import StudyConfig
from privacy.ledger import StagePlan, plan_lines


@dataclass(frozen=True)
class Stage:
    """One private stage: its name, kind (`prune`, `structured`, `distill`), round or student, and training."""

    name: str
    kind: str
    train: object
    share: float
    round_index: int = 0
    init: str | None = None


def lines(cfg: StudyConfig) -> dict[str, list[Stage]]:
    """Line name -> its stages in run order. Pruning is one line of rounds (`prune.lines: chain`) or a line per
    target sparsity (`per_target`). Distillation joins the pruning chain (`distill.after: prune`, the default:
    the student composes after the pruning rounds) or gives each student a line of its own."""
    b, out = cfg.privacy, {}
    if cfg.prune.enabled:
        schedule, rounds = cfg.prune.schedule, cfg.prune.schedule.num_rounds
        if cfg.prune.lines == "per_target":  # the teacher pruned to each target in one round, a line each
            out |= {f"unstructured_{100 * schedule.sparsity_after(r):g}":
                    [Stage(f"prune_{r}", "prune", cfg.prune.train, b.prune_share, round_index=r)]
                    for r in range(1, rounds + 1)}
        else:
            out["unstructured"] = [Stage(f"prune_{r}", "prune", cfg.prune.train, b.prune_share / rounds,
                                         round_index=r) for r in range(1, rounds + 1)]
    if cfg.structured.enabled:
        rounds = cfg.structured.schedule.rounds
        out["structured"] = [Stage(f"structured_{r}", "structured", cfg.structured.train,
                                   b.structured_share / rounds, round_index=r) for r in range(1, rounds + 1)]
    if cfg.distill.enabled:
        inits = cfg.distill.inits or [None]
        students = [Stage(f"distill_{i}" if i else "distill", "distill", cfg.distill.train, b.distill_share, init=i)
                    for i in inits]
        if cfg.distill.after == "prune" and "unstructured" in out:
            out["unstructured"] += students
        else:
            out |= {s.name: [s] for s in students}
    return out


STATS_SHARE = 0.05  # of a pruning round's share: its statistics release (fixed sigma; the share only orders calibration)


def _plan(stage_name: str, train, share: float, num_train: int, fixed: dict) -> StagePlan:
    return StagePlan(stage=stage_name, sample_rate=train.sample_rate(num_train), num_steps=train.num_steps(num_train),
                     budget_share=share, noise_multiplier=fixed.get(stage_name))


def _stage_plans(cfg: StudyConfig, stage: Stage, num_train: int, fixed: dict) -> list[StagePlan]:
    """A stage's ledger events in run order: a pruning round with activation scores or reconstruction releases
    input statistics of the private data (one Gaussian sum over all examples: q = 1, one step, sigma
    `stats_noise`) before it fine-tunes, unless they come from public calibration text."""
    if stage.kind != "prune" or not cfg.prune.schedule.releases_statistics or cfg.prune.calibration is not None:
        return [_plan(stage.name, stage.train, stage.share, num_train, fixed)]
    name = stats_stage(stage.name)
    stats = StagePlan(stage=name, sample_rate=1.0, num_steps=1, budget_share=stage.share * STATS_SHARE,
                      noise_multiplier=fixed.get(name, cfg.prune.schedule.stats_noise), mechanism="gaussian_sum")
    return [stats, _plan(stage.name, stage.train, stage.share * (1 - STATS_SHARE), num_train, fixed)]


def line_plans(cfg: StudyConfig, num_train: int) -> dict[str, list[StagePlan]]:
    """Line name -> the ledger events of its stages, in run order (the teacher excluded)."""
    fixed = cfg.privacy.fixed_noise
    return {name: [p for s in line for p in _stage_plans(cfg, s, num_train, fixed)] for name, line in lines(cfg).items()}


def private_stages(cfg: StudyConfig, num_train: int) -> list[StagePlan]:
    """Every ledger event on the private data, in run order (teacher, then line by line)."""
    fixed = cfg.privacy.fixed_noise
    stages = [_plan("teacher", cfg.teacher, cfg.privacy.teacher_share, num_train, fixed)]
    stages += [p for line in line_plans(cfg, num_train).values() for p in line]
    unknown = sorted(set(fixed) - {s.stage for s in stages})
    if unknown:
        raise ValueError(f"privacy.fixed_noise names stages that do not run: {unknown}; "
                         f"stages: {[s.stage for s in stages]}")
    return stages


def plan_inputs(cfg: StudyConfig, num_train: int) -> tuple[StagePlan, list[list[StagePlan]]]:
    """The teacher's plan and each line's stage plans: what `privacy.ledger.plan_lines` calibrates."""
    stages = {s.stage: s for s in private_stages(cfg, num_train)}
    return stages["teacher"], [[stages[p.stage] for p in line] for line in line_plans(cfg, num_train).values()]


def plan_sigmas(cfg: StudyConfig, num_train: int) -> dict[str, float]:
    """Stage name -> calibrated sigma under `privacy.scope` (see `privacy.ledger.plan_lines`).

    Stages are calibrated in run order, each to its cumulative share, so a later stage's settings never
    change an earlier stage's sigma: changing pruning never retrains the teacher. ValueError if
    `privacy.fixed_noise` names a stage that does not run.
    """
    teacher, by_line = plan_inputs(cfg, num_train)
    b = cfg.privacy
    return plan_lines(teacher, by_line, scope=b.scope, target_epsilon=b.epsilon,
                      delta=b.resolve_delta(num_train), accountant=b.accountant)
