"""The study flow: prepare data -> DP teacher -> DP pruning rounds -> DP distillation -> evaluate -> register."""
from __future__ import annotations

import hashlib
import json

from prefect import flow

from flows.config import StudyConfig, load_config
from flows.plan import private_stages
from tasks.budget import plan_privacy
from tasks.data import prepare_data
from tasks.evaluation import close_study, evaluate_model, open_study, register_final
from tasks.training import distill, prune_round, train_teacher


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
        plan = plan_privacy(stages=private_stages(cfg, data.num_train), budget=cfg.privacy, num_train=data.num_train)

        teacher = train_teacher(stage="teacher", data=data, model=cfg.model, train=cfg.teacher,
                                budget=plan["teacher"], **common)
        models, last = [teacher], teacher
        if cfg.prune.enabled:
            for r in range(1, cfg.prune.schedule.rounds + 1):
                last = prune_round(stage=f"prune_{r}", round_index=r, upstream=last, data=data,
                                   schedule=cfg.prune.schedule, train=cfg.prune.train,
                                   budget=plan[f"prune_{r}"], **common)
                models.append(last)
        if cfg.distill.enabled:
            models.append(distill(stage="distill", teacher=teacher, spent=last, data=data,
                                  method=cfg.distill.method, train=cfg.distill.train,
                                  budget=plan["distill"], **common))

        evals = [evaluate_model(stage=m.stage, model=m, data=data, tracking_uri=uri) for m in models]
        register_final(model=models[-1], name=cfg.tracking.registered_model or f"{cfg.name}-{data.task}",
                       task_name=data.task, tracking_uri=uri)
    except BaseException:
        close_study(tracking_uri=uri, run_id=parent, rows=None, failed=True)
        raise
    rows = [summary_row(e, data.metric) for e in evals]
    close_study(tracking_uri=uri, run_id=parent, rows=rows)
    return rows


def summary_row(evaluation, metric: str) -> dict:
    r = evaluation.results
    return {"stage": evaluation.stage, metric: r["metric"], "sparsity": r["sparsity"], "parameters": r["parameters"],
            "size_mb": r.get("size_bytes", 0) / 1e6, "epsilon": r["epsilon"], "delta": r["delta"]}
