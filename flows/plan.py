"""The study's plan: its model lines (which stages train or release on the private data, in what order, drawing on
which share of the budget) and, once, every stage's DP event (sigma, q, steps, mechanism) under the budget. The
stages' tasks, their ledger entries, their progress lines and `dpcompress budget plan` all read these numbers from
here.

A line starts from the DP teacher; each kind of stage (flows.kinds) contributes its lines.
"""
from __future__ import annotations

from dataclasses import dataclass

from flows.config import StudyConfig
from privacy.accounting import compose_epsilon
from privacy.config import StageBudget
from privacy.planning import StagePlan, plan_budgets

TEACHER = "teacher"


@dataclass(frozen=True)
class Stage:
    """One private stage of a line. kind: its entry in flows.kinds.KINDS; section: the config section whose method
    and training it uses (and whose budget share it draws on); share: its fraction of the whole budget; fixed_noise:
    a sigma used as given (a one-shot release's), or None to calibrate one. variant: the entry of a section with
    several (a finetune line's name). independent: the first stage of a line that starts from the pretrained
    model, not from the DP teacher."""

    name: str
    kind: str
    section: str
    share: float
    round_index: int = 0
    init: str | None = None
    mechanism: str = "dp_sgd"
    fixed_noise: float | None = None
    variant: str | None = None
    independent: bool = False


def model_lines(cfg: StudyConfig) -> dict[str, list[Stage]]:
    """Line name -> its stages in run order, as the kinds of stage contribute them (teacher excluded)."""
    from flows.kinds import KINDS

    lines: dict[str, list[Stage]] = {}
    for kind in KINDS.values():
        lines = kind.lines(cfg, lines)
    return lines


def stage_section(cfg: StudyConfig, stage: Stage):
    """The config section (method, train, ...) stage `stage` runs with: its section's, or its variant's there."""
    section = getattr(cfg, stage.section)
    return section.lines[stage.variant] if stage.variant is not None else section


def pretrained_stages(cfg: StudyConfig) -> dict[str, tuple[object, bool]]:
    """The stages that train the pretrained model itself: stage name -> (its section: method and train, private)."""
    stages = {TEACHER: (cfg.teacher, True)} | ({"nonprivate_teacher": (cfg.nonprivate, False)}
                                               if cfg.nonprivate.enabled else {})
    return stages | {s.name: (stage_section(cfg, s), True) for line in model_lines(cfg).values() for s in line
                     if s.independent}


def _stage_plan(cfg: StudyConfig, stage: Stage, num_train: int) -> StagePlan:
    fixed = cfg.privacy.fixed_noise.get(stage.name, stage.fixed_noise)
    if stage.mechanism == "gaussian_sum":  # one release over every example
        return StagePlan(stage=stage.name, sample_rate=1.0, num_steps=1, budget_share=stage.share,
                         noise_multiplier=fixed, mechanism=stage.mechanism, independent=stage.independent)
    train = stage_section(cfg, stage).train
    return StagePlan(stage=stage.name, sample_rate=train.sample_rate(num_train), num_steps=train.num_steps(num_train),
                     budget_share=stage.share, noise_multiplier=fixed, mechanism=stage.mechanism,
                     independent=stage.independent)


def stage_plans(cfg: StudyConfig, num_train: int) -> tuple[StagePlan, dict[str, list[StagePlan]]]:
    """The teacher's plan and each line's stage plans, in run order. ValueError if `privacy.fixed_noise` names a
    stage that does not run."""
    teacher = _stage_plan(cfg, Stage(TEACHER, TEACHER, TEACHER, cfg.privacy.share(TEACHER)), num_train)
    lines = {name: [_stage_plan(cfg, s, num_train) for s in line] for name, line in model_lines(cfg).items()}
    names = [teacher.stage, *(p.stage for line in lines.values() for p in line)]
    if unknown := sorted(set(cfg.privacy.fixed_noise) - set(names)):
        raise ValueError(f"privacy.fixed_noise names stages that do not run: {unknown}; stages: {names}")
    return teacher, lines


def plan_study(cfg: StudyConfig, num_train: int) -> dict[str, StageBudget]:
    """Every private stage's budget under `privacy.scope` (privacy.planning.plan_budgets), teacher first.

    Stages are calibrated in run order, each to its cumulative share, so a later stage's settings never change an
    earlier stage's sigma: changing pruning never retrains the teacher.
    """
    teacher, lines = stage_plans(cfg, num_train)
    return plan_budgets(teacher, list(lines.values()), budget=cfg.privacy, num_train=num_train)


def cumulative_epsilons(cfg: StudyConfig, budgets: dict[str, StageBudget]) -> dict[str, float]:
    """Each stage's epsilon composed with the stages before it: in run order (scope "study") or along its own line,
    teacher first unless the line is independent of it (scope "line")."""
    teacher = budgets[TEACHER]
    spent, history = {TEACHER: _epsilon([teacher], teacher)}, [teacher]
    for line in model_lines(cfg).values():
        if cfg.privacy.scope == "line":
            history = [] if line and line[0].independent else [teacher]
        for stage in line:
            history = [*history, budgets[stage.name]]
            spent[stage.name] = _epsilon(history, teacher)
    return spent


def _epsilon(budgets: list[StageBudget], any_budget: StageBudget) -> float:
    return compose_epsilon([s.event for s in budgets], delta=any_budget.delta, accountant=any_budget.accountant)
