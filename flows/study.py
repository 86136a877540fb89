"""The study flow: prepare data -> DP teacher -> model lines (DP pruning rounds, structured rounds, DP distillation),
each starting from the teacher -> evaluate every model -> results table -> register the final model."""
from __future__ import annotations

import dataclasses
import hashlib
import json

from prefect import flow

from compression.prune import stats_stage
from flows.config import StudyConfig, load_config
from flows.plan import Stage, lines, plan_inputs
from tasks.budget import plan_privacy, release_budget, reserve_budget
from tasks.data import prepare_data
from tasks.evaluation import close_study, evaluate_model, open_study, register_final, results_table
from tasks.structured import structured_round
from tasks.training import distill, prune_round, train_nonprivate, train_teacher


def study_key(cfg: StudyConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


@flow(name="dpcompress-study", log_prints=True)
def study(config_path: str, overrides: list[str] | None = None, glue_dir: str | None = None) -> list[dict]:
    """Run (or resume) the study in `config_path`; returns one summary row per model."""
    cfg = load_config(config_path, overrides or [], glue_dir=glue_dir)
    return run_study(cfg)


def run_study(cfg: StudyConfig) -> list[dict]:
    out, uri = str(cfg.study_dir), cfg.tracking_uri()
    parent = open_study(tracking_uri=uri, experiment=cfg.tracking.experiment, study_key=study_key(cfg),
                        name=cfg.name, config=cfg.model_dump(mode="json"))
    common = {"output_dir": out, "tracking_uri": uri, "parent_run_id": parent}
    try:
        data = prepare_data(data=cfg.data, tokenizer_name=cfg.model.name_or_path, **common)
        calibration = None  # public text for pruning statistics and public distillation
        if cfg.prune.enabled and cfg.prune.calibration and (cfg.prune.schedule.releases_statistics
                                                            or cfg.prune.public_distill is not None):
            calibration = [prepare_data(stage=f"prepare_calibration_{source.task}", data=source, private=data,
                                        tokenizer_name=cfg.model.name_or_path, **common)
                           for source in cfg.prune.calibration]
        teacher_plan, line_plans = plan_inputs(cfg, data.num_train)
        plan = plan_privacy(teacher=teacher_plan, lines=line_plans, budget=cfg.privacy, num_train=data.num_train)
        account = reserve_budget(data=data, stages=[teacher_plan, *(s for line in line_plans for s in line)],
                                 plan=plan, budget=cfg.privacy, study=cfg.name, study_key=study_key(cfg))
        common["account"] = account  # every private stage charges the dataset's lifetime budget
        models = []
        if cfg.nonprivate.enabled:
            models.append(train_nonprivate(stage="nonprivate_teacher", data=data, model=cfg.model,
                                           train=cfg.nonprivate.train, **common))
        teacher = train_teacher(stage="teacher", data=data, model=cfg.model, train=cfg.teacher,
                                budget=plan["teacher"], **common)
        models.append(teacher)
        model_lines = lines(cfg)
        last = teacher  # study scope: every stage extends the ledger of the stage before it, across lines
        for line in model_lines.values():
            previous = teacher
            for stage in line:
                spent = last if cfg.privacy.scope == "study" else previous
                previous = last = run_stage(cfg, stage, source=previous, teacher=teacher, spent=spent, data=data,
                                            budgets=plan, common=common, calibration=calibration)
                models.append(previous)

        release_budget(account=common.pop("account"))
        evals = [evaluate_model(stage=m.stage, model=m, data=data, tracking_uri=uri) for m in models]
        chosen, compared = final_model(cfg, models, evals)
        register_final(model=chosen, compared=compared, task_name=data.task, tracking_uri=uri,
                       name=cfg.tracking.registered_model or f"{cfg.name}-{data.task}")
        line_of = {s.name: name for name, stages in model_lines.items() for s in stages}
        rows = results_table(models=models, evaluations=evals, lines={"teacher": "teacher", **line_of},
                             metric=data.metric, scope=cfg.privacy.scope, tracking_uri=uri, parent_run_id=parent,
                             output_dir=out)
    except BaseException:
        if "account" in common:
            release_budget(account=common["account"])
        close_study(tracking_uri=uri, run_id=parent, rows=None, failed=True)
        raise
    close_study(tracking_uri=uri, run_id=parent, rows=rows)
    return rows


def final_model(cfg: StudyConfig, models: list, evals: list) -> tuple:
    """(the model to register, the models compared to choose it or None). `tracking.register_stage` names it up
    front; else the last one (scope "study": the end of the chain, whose ledger holds the whole study); with several
    lines (scope "line"), the compressed private model with the best dev metric (higher is better), and the
    choice depends on every compressed model, so all of them are `compared` (their union epsilon is its tag)."""
    if cfg.tracking.register_stage is not None:
        named = [m for m in models if m.stage == cfg.tracking.register_stage]
        if not named:
            raise ValueError(f"tracking.register_stage={cfg.tracking.register_stage!r} is not a stage of this study; "
                             f"stages: {[m.stage for m in models]}")
        return named[0], None
    if cfg.privacy.scope == "study" or len(models) < 3:
        return models[-1], None
    compressed = [(e.results["metric"], i) for i, (m, e) in enumerate(zip(models, evals))
                  if m.stage not in ("teacher", "nonprivate_teacher")]
    if not compressed:
        return models[-1], None
    return models[max(compressed)[1]], [models[i] for _, i in compressed]


def run_stage(cfg: StudyConfig, stage: Stage, *, source, teacher, spent, data, budgets, common, calibration=None):
    """One private stage of a line: a pruning round, a structured round, or a distilled student."""
    budget = budgets[stage.name]
    if stage.kind == "prune":
        p = cfg.prune
        return prune_round(stage=stage.name, round_index=stage.round_index, upstream=source, spent=spent,
                           teacher=teacher, data=data, schedule=p.schedule, train=p.train, budget=budget,
                           distill_alpha=p.distill_alpha, temperature=p.temperature, rewind=p.rewind,
                           stats_budget=budgets.get(stats_stage(stage.name)), calibration=calibration,
                           public_distill=p.public_distill, **common)
    if stage.kind == "structured":
        s = cfg.structured
        return structured_round(stage=stage.name, round_index=stage.round_index, upstream=source, spent=spent,
                                data=data, schedule=s.schedule, train=s.train, budget=budget, teacher=teacher,
                                distill_alpha=s.distill_alpha, temperature=s.temperature, **common)
    method = dataclasses.replace(cfg.distill.method, init=stage.init) if stage.init else cfg.distill.method
    return distill(stage=stage.name, teacher=teacher, spent=spent, data=data, method=method,
                   train=cfg.distill.train, budget=budget, base_model=cfg.model.name_or_path, **common)
