"""The study flow: prepare the data -> plan the privacy budget -> DP teacher -> model lines (pruning rounds, structured
rounds, distilled students from the teacher; fine-tuning methods from the pretrained model) -> evaluate every model
(and profile the training of those from the pretrained model) -> results table -> register; then, with a `split`
section, the Split-and-Privatize branch (flows/split.py)."""
from __future__ import annotations

import dataclasses

from prefect import flow

from flows.config import StudyConfig, load_config, study_key
from flows.kinds import Run, run_lines
from flows.plan import model_lines, pretrained_stages, stage_plans
from flows.split import run_split
from tasks.budget import plan_privacy, release_budget, reserve_budget
from tasks.data import prepare_data
from tasks.evaluation import close_study, evaluate_model, open_study, results_table
from tasks.lock import study_lock
from tasks.profile import profile_training
from tasks.refs import RunContext
from tasks.registry import register_final
from tasks.teacher import train_nonprivate, train_teacher


@flow(name="dpcompress-study", log_prints=True, persist_result=False)
def study(config_path: str, overrides: list[str] | None = None, glue_dir: str | None = None) -> list[dict]:
    """Run (or resume) the study in `config_path`; returns one summary row per model.

    Args:
        config_path: The study's YAML config, absolute or relative to the working directory (on a worker,
            $DPCOMPRESS_WORKDIR), e.g. flows/configs/quickstart.yaml.
        overrides: Config keys to override, each KEY=VALUE like `dpcompress run --set`, e.g. privacy.epsilon=4.
        glue_dir: Local GLUE folder (SST-2/, CoLA/, ...) for a config without data.dir; default
            $DPCOMPRESS_GLUE_DIR, else the HF hub.
    """
    return run_study(load_config(config_path, overrides or [], glue_dir=glue_dir))


def run_study(cfg: StudyConfig) -> list[dict]:
    with study_lock(cfg.study_dir):  # one run of a study at a time, before the tracking store is touched
        return _run_study(cfg)


def _run_study(cfg: StudyConfig) -> list[dict]:
    out, uri = str(cfg.study_dir), cfg.tracking_uri()
    parent = open_study(tracking_uri=uri, experiment=cfg.tracking.experiment, study_key=study_key(cfg),
                        name=cfg.name, config=cfg.model_dump(mode="json"))
    context = RunContext(tracking_uri=uri, parent_run_id=parent)
    try:
        data = prepare_data(data=cfg.data, tokenizer_name=cfg.model.name_or_path, output_dir=out, context=context)
        calibration = [prepare_data(stage=f"prepare_calibration_{source.task}", data=source, private=data,
                                    tokenizer_name=cfg.model.name_or_path, output_dir=out, context=context)
                       for source in cfg.prune.calibration or []] if cfg.prune.enabled else []
        teacher_plan, line_plans = stage_plans(cfg, data.num_train)
        budgets = plan_privacy(teacher=teacher_plan, lines=list(line_plans.values()), budget=cfg.privacy,
                               num_train=data.num_train)
        account = reserve_budget(data=data, plan=budgets, budget=cfg.privacy, study=cfg.name,
                                 study_key=study_key(cfg))
        context = dataclasses.replace(context, account=account)  # every private stage charges the dataset's budget
        models = [train_nonprivate(stage="nonprivate_teacher", data=data, model=cfg.model,
                                   method=cfg.nonprivate.method, train=cfg.nonprivate.train, output_dir=out,
                                   context=context)] if cfg.nonprivate.enabled else []
        teacher = train_teacher(stage="teacher", budget=budgets["teacher"], data=data, model=cfg.model,
                                method=cfg.teacher.method, train=cfg.teacher.train, output_dir=out, context=context)
        run = Run(cfg=cfg, budgets=budgets, data=data, teacher=teacher, calibration=calibration or None,
                  output_dir=out, context=context)
        models += [teacher, *run_lines(run)]
        release_budget(account=account)

        evals = [evaluate_model(stage=m.stage, model=m, data=data, tracking_uri=uri) for m in models]
        starts = pretrained_stages(cfg) if cfg.profile.enabled else {}
        profiles = [profile_training(model=m, base=cfg.model, num_labels=data.num_labels, section=starts[m.stage][0],
                                     private=starts[m.stage][1], profile=cfg.profile, output_dir=out, tracking_uri=uri)
                    for m in models if m.stage in starts]
        register_final(models=models, evaluations=evals, scope=cfg.privacy.scope,
                       register_stage=cfg.tracking.register_stage, task_name=data.task, tracking_uri=uri,
                       name=cfg.tracking.registered_model or f"{cfg.name}-{data.task}")
        line_of = {s.name: name for name, stages in model_lines(cfg).items() for s in stages}
        rows = results_table(models=models, evaluations=evals, lines={"teacher": "teacher", **line_of},
                             metric=data.metric, scope=cfg.privacy.scope, tracking_uri=uri, parent_run_id=parent,
                             output_dir=out, profiles=profiles)
        if cfg.split.enabled:  # split fine-tuning under local d_chi noise, beside the study's epsilon
            run_split(cfg, data=data, output_dir=out, context=context)
    except BaseException:
        if context.account is not None:
            release_budget(account=context.account)
        close_study(tracking_uri=uri, run_id=parent, rows=None, failed=True)
        raise
    close_study(tracking_uri=uri, run_id=parent, rows=rows)
    return rows
