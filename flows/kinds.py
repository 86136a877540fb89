"""The kinds of stage a model line is made of, one registry entry each: the lines a kind contributes to a study (its
planner) and how one of its stages runs (which task, on what). A new kind is one entry here, one task, one library
module; the flow, the plan and `dpcompress budget plan` pick it up from this registry. A runner imports its task
when it runs, so that planning (`dpcompress budget plan`) never loads the orchestrator.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flows.config import StudyConfig
from flows.plan import Stage
from tasks.refs import DataRef, ModelRef, RunContext, StatsRef

# of a pruning round's share: its statistics release (fixed sigma; the share only orders calibration)
STATS_SHARE = 0.05


@dataclass(frozen=True)
class LineState:
    """Where a line stands: the model the next stage starts from, whose ledger it extends, and statistics released
    just before it (for a pruning round)."""

    model: ModelRef
    ledger_from: ModelRef | StatsRef
    statistics: StatsRef | None = None


@dataclass(frozen=True)
class Run:
    """What every stage's run sees: the config, the plan's budgets, the data, the DP teacher, public texts."""

    cfg: StudyConfig
    budgets: dict
    data: DataRef
    teacher: ModelRef
    calibration: list[DataRef] | None
    output_dir: str
    context: RunContext


@dataclass(frozen=True)
class StageKind:
    """lines: `(config, lines so far) -> lines` adds this kind's stages; run: `(stage, state, run) -> state`."""

    lines: Callable[[StudyConfig, dict[str, list[Stage]]], dict[str, list[Stage]]]
    run: Callable[[Stage, LineState, Run], LineState]


# --- unstructured pruning: an optional statistics release, then the round --------------------------------------------

def _prune_lines(cfg: StudyConfig, lines: dict[str, list[Stage]]) -> dict[str, list[Stage]]:
    """One chain of rounds, or a line per target sparsity (each the teacher pruned once, on the whole share)."""
    p = cfg.prune
    if not p.enabled:
        return lines
    rounds, share = p.schedule.num_rounds, cfg.privacy.share("prune")

    def round_stages(r: int, round_share: float) -> list[Stage]:
        stage = Stage(f"prune_{r}", "prune", "prune", round_share, round_index=r)
        if not p.schedule.needs_statistics or p.calibration is not None:
            return [stage]  # magnitude scores, or statistics of public text (no privacy cost)
        stats = Stage(f"prune_{r}_stats", "prune_statistics", "prune", round_share * STATS_SHARE, round_index=r,
                      mechanism="gaussian_sum", fixed_noise=p.schedule.stats_noise)
        return [stats, dataclasses.replace(stage, share=round_share * (1 - STATS_SHARE))]
    if p.layout == "per_target":
        return lines | {f"unstructured_{100 * p.schedule.sparsity_after(r):g}": round_stages(r, share)
                        for r in range(1, rounds + 1)}
    return lines | {"unstructured": [s for r in range(1, rounds + 1) for s in round_stages(r, share / rounds)]}


def _run_statistics(stage: Stage, state: LineState, run: Run) -> LineState:
    from tasks.prune import release_statistics

    stats = release_statistics(stage=stage.name, budget=run.budgets[stage.name], upstream=state.model,
                               ledger_from=state.ledger_from, data=run.data, schedule=run.cfg.prune.schedule,
                               seed=run.cfg.prune.train.seed, output_dir=run.output_dir, context=run.context)
    return dataclasses.replace(state, ledger_from=stats, statistics=stats)


def _run_prune(stage: Stage, state: LineState, run: Run) -> LineState:
    from tasks.prune import prune_round, public_statistics, public_targets

    p, statistics, targets = run.cfg.prune, state.statistics, None
    if statistics is None and p.schedule.needs_statistics:
        statistics = public_statistics(model=state.model, calibration=run.calibration, include=p.schedule.include,
                                       output_dir=run.output_dir)
    if p.public_distill is not None:
        targets = public_targets(teacher=run.teacher, calibration=run.calibration,
                                 split_pairs=p.public_distill.split_pairs, output_dir=run.output_dir)
    model = prune_round(stage=stage.name, budget=run.budgets[stage.name], round_index=stage.round_index,
                        upstream=state.model, ledger_from=state.ledger_from, data=run.data, teacher=run.teacher,
                        schedule=p.schedule, method=p.method, train=p.train, kd=p.kd, rewind=p.rewind,
                        statistics=statistics, public_distill=p.public_distill, calibration=run.calibration,
                        targets=targets, output_dir=run.output_dir, context=run.context)
    return LineState(model=model, ledger_from=model)


# --- structured pruning -----------------------------------------------------------------------------------------------

def _structured_lines(cfg: StudyConfig, lines: dict[str, list[Stage]]) -> dict[str, list[Stage]]:
    s = cfg.structured
    if not s.enabled:
        return lines
    rounds, share = s.schedule.rounds, cfg.privacy.share("structured")
    return lines | {"structured": [Stage(f"structured_{r}", "structured", "structured", share / rounds,
                                         round_index=r) for r in range(1, rounds + 1)]}


def _run_structured(stage: Stage, state: LineState, run: Run) -> LineState:
    from tasks.structured import structured_round

    s = run.cfg.structured
    model = structured_round(stage=stage.name, budget=run.budgets[stage.name], round_index=stage.round_index,
                             upstream=state.model, ledger_from=state.ledger_from, data=run.data, teacher=run.teacher,
                             schedule=s.schedule, method=s.method, train=s.train, kd=s.kd,
                             output_dir=run.output_dir, context=run.context)
    return LineState(model=model, ledger_from=model)


# --- DPKD students ----------------------------------------------------------------------------------------------------

def _distill_lines(cfg: StudyConfig, lines: dict[str, list[Stage]]) -> dict[str, list[Stage]]:
    """A student per initialisation; it joins the pruning chain (`after: prune`) or is a line of its own."""
    d = cfg.distill
    if not d.enabled:
        return lines
    students = [Stage(f"distill_{i}" if i else "distill", "distill", "distill", cfg.privacy.share("distill"), init=i)
                for i in d.inits or [None]]
    if d.after == "prune" and "unstructured" in lines:
        return lines | {"unstructured": [*lines["unstructured"], *students]}
    return lines | {s.name: [s] for s in students}


def _run_distill(stage: Stage, state: LineState, run: Run) -> LineState:
    from tasks.distill import distill

    d = run.cfg.distill
    student = dataclasses.replace(d.student, init=stage.init) if stage.init else d.student
    model = distill(stage=stage.name, budget=run.budgets[stage.name], teacher=run.teacher,
                    ledger_from=state.ledger_from, data=run.data, student=student, method=d.method, train=d.train,
                    kd=d.kd, base_model=run.cfg.model.name_or_path, output_dir=run.output_dir, context=run.context)
    return LineState(model=model, ledger_from=model)


# --- fine-tuning of the pretrained model by one method (a line of its own, not from the teacher) -------------------

def _finetune_lines(cfg: StudyConfig, lines: dict[str, list[Stage]]) -> dict[str, list[Stage]]:
    f = cfg.finetune
    if not f.enabled:
        return lines
    return lines | {f"finetune_{name}": [Stage(f"finetune_{name}", "finetune", "finetune", 1.0, variant=name,
                                               independent=True)] for name in f.lines}


def _run_finetune(stage: Stage, state: LineState, run: Run) -> LineState:
    from tasks.teacher import train_teacher

    section = run.cfg.finetune.lines[stage.variant]
    model = train_teacher(stage=stage.name, budget=run.budgets[stage.name], data=run.data, model=run.cfg.model,
                          method=section.method, train=section.train, ledger_from=state.ledger_from,
                          output_dir=run.output_dir, context=run.context)
    return LineState(model=model, ledger_from=model)


def _no_lines(cfg: StudyConfig, lines: dict[str, list[Stage]]) -> dict[str, list[Stage]]:
    return lines  # its stages come from another kind's planner (the pruning rounds')


KINDS: dict[str, StageKind] = {
    "prune": StageKind(lines=_prune_lines, run=_run_prune),
    "prune_statistics": StageKind(lines=_no_lines, run=_run_statistics),
    "structured": StageKind(lines=_structured_lines, run=_run_structured),
    "distill": StageKind(lines=_distill_lines, run=_run_distill),
    "finetune": StageKind(lines=_finetune_lines, run=_run_finetune),
}


def run_lines(run: Run) -> list[ModelRef]:
    """Every line from the DP teacher, stage after stage; returns the models, in run order. Scope "study": each stage
    extends the ledger of the stage run before it, across lines, so the last one covers the whole study; scope
    "line": its own line's (a line independent of the teacher starts a ledger of its own), so lines are independent
    and run concurrently where `execution` names a Dask cluster. Each line's wall time goes to `LINE_TIMES`."""
    from flows.plan import model_lines

    lines = model_lines(run.cfg)
    if run.cfg.privacy.scope == "line" and run.cfg.execution.concurrent and len(lines) > 1:
        from flows.execution import run_concurrently

        models, times = run_concurrently(lines, run)
    else:
        models, times, last = [], {}, run.teacher
        for name, line in lines.items():
            line_models, last, times[name] = timed_line(line, run, last)
            models += line_models
    write_line_times(run, times)
    return models


LINE_TIMES = Path("timings") / "lines.json"  # in the study folder


def timed_line(line: list[Stage], run: Run, last: ModelRef | StatsRef
               ) -> tuple[list[ModelRef], ModelRef | StatsRef, dict]:
    """`run_line`, and the line's timing: when it began (epoch seconds), its wall time, the process that ran it and
    its torch threads."""
    import torch  # the threads the line's stages computed on

    began = time.time()
    models, last = run_line(line, run, last)
    return models, last, {"began": round(began, 3), "seconds": round(time.time() - began, 3),
                          "process": f"{socket.gethostname()}:{os.getpid()}", "threads": torch.get_num_threads()}


def write_line_times(run: Run, times: dict[str, dict]) -> None:
    """Every line's wall time, start and process in the study folder's `LINE_TIMES` (orchestration facts, nothing of
    the data; stays local). A rerun replaces it: reused stages take seconds."""
    path = Path(run.output_dir) / LINE_TIMES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(times, indent=2))


def run_line(line: list[Stage], run: Run, last: ModelRef | StatsRef) -> tuple[list[ModelRef], ModelRef | StatsRef]:
    """One line's stages from the DP teacher: (its models, the last ledger it wrote). `last`: the ledger the line's
    stages extend under scope "study" (the stage run before)."""
    models = []
    state = LineState(model=run.teacher, ledger_from=None if line[0].independent else run.teacher)
    for stage in line:
        if run.cfg.privacy.scope == "study":
            state = dataclasses.replace(state, ledger_from=last)
        state = KINDS[stage.kind].run(stage, state, run)
        last = state.ledger_from
        if state.model.stage == stage.name:  # a model stage (not a statistics release)
            models.append(state.model)
    return models, last
