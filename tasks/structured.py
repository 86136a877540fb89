"""Prefect task for one round of structured DPIMP: remove layers, heads and FFN neurons (physically shrinking the
weight matrices), then DP fine-tune. Scores are data-free (weight magnitude): pruning itself costs no privacy."""
from __future__ import annotations

import json

from prefect import task

from compression.data import load_encoded
from compression.distill import distillation_loss
from compression.losses import KDConfig
from compression.models import load_saved
from compression.pruning.structured import StructuredConfig
from compression.pruning.structured import structured_round as shrink
from compression.train import TrainConfig
from privacy import files
from privacy.config import StageBudget
from tasks.caching import FOLDER_CACHED, stage_dir
from tasks.console import run_logger
from tasks.refs import DataRef, ModelRef, RunContext
from tasks.stage import reuse, run_dp_stage


@task(name="structured_round", **FOLDER_CACHED)
def structured_round(*, stage: str, budget: StageBudget, round_index: int, upstream: ModelRef,
                     ledger_from: ModelRef, data: DataRef, teacher: ModelRef, schedule: StructuredConfig, method,
                     train: TrainConfig, kd: KDConfig, output_dir: str, context: RunContext) -> ModelRef:
    """Shrink `upstream` to round `round_index`'s targets, then DP fine-tune it (KD from `teacher` when
    kd.weight > 0)."""
    out = stage_dir(output_dir, stage, {"upstream": upstream, "ledger_from": ledger_from, "teacher": teacher,
                                        "schedule": schedule, "method": method, "train": train, "kd": kd,
                                        "budget": budget, "round": round_index})
    if done := reuse(out, stage, context):
        return done
    net, tokenizer = load_saved(upstream.path)
    report = shrink(net, schedule, round_index)
    run_logger().info("%s: %d layers kept, heads %s, FFN widths %s, parameters %d -> %d", stage,
                          report["num_layers"], report["heads"], report["ffn"], report["parameters_before"],
                          report["parameters_after"])
    files.write_text(out / "structure.json", json.dumps(report, indent=2, default=str))
    loss_fn = (distillation_loss(load_saved(teacher.path)[0], load_encoded(data.train_file), kd)
               if kd.weight > 0 else None)
    return run_dp_stage(name=stage, budget=budget, model=net, tokenizer=tokenizer, data=data, train=train,
                        method=method, out=out, ledger_from=ledger_from, context=context, loss_fn=loss_fn,
                        params={"schedule": vars(schedule), "layers_kept": report["num_layers"],
                                "parameters_after": report["parameters_after"], "kd": vars(kd)})
