"""Prefect task for one round of structured DPIMP: remove layers, heads and FFN neurons (physically shrinking the
weight matrices), then DP fine-tune. Scores are data-free (weight magnitude): pruning itself costs no privacy."""
from __future__ import annotations

import json

from prefect import get_run_logger, task

from compression.models import load_saved
from compression.structured import StructuredConfig, structured_round as prune_structure
from compression.train import TrainConfig
from privacy.config import StageBudget
from tasks.caching import STAGE_CACHE, stage_dir
from tasks.refs import BudgetAccount, DataRef, ModelRef
from tasks.training import _dp_stage, _kd_loss


@task(name="structured_round", cache_policy=STAGE_CACHE, persist_result=True)
def structured_round(*, stage: str, round_index: int, upstream: ModelRef, data: DataRef, schedule: StructuredConfig,
                     train: TrainConfig, budget: StageBudget, output_dir: str, tracking_uri: str, parent_run_id: str,
                     account: BudgetAccount, spent: ModelRef | None = None, teacher: ModelRef | None = None, distill_alpha: float = 0.0,
                     temperature: float = 2.0) -> ModelRef:
    """Shrink `upstream` to round `round_index`'s targets, then DP fine-tune (KD from `teacher` when distill_alpha > 0);
    `spent`: the ledger to extend."""
    kd = [teacher, distill_alpha, temperature] if teacher is not None and distill_alpha > 0 else None
    out = stage_dir(output_dir, stage, {"upstream": upstream, "spent": spent, "schedule": schedule, "train": train,
                                        "budget": budget, "round": round_index, **({"kd": kd} if kd else {})})
    net, tokenizer = load_saved(upstream.path)
    report = prune_structure(net, schedule, round_index)
    get_run_logger().info("%s: %d layers kept, heads %s, FFN widths %s, parameters %d -> %d", stage,
                          report["num_layers"], report["heads"], report["ffn"],
                          report["parameters_before"], report["parameters_after"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "structure.json").write_text(json.dumps(report, indent=2, default=str))
    loss_fn = _kd_loss(load_saved(teacher.path)[0], data, alpha=distill_alpha, temperature=temperature) if kd else None
    return _dp_stage(stage=stage, model=net, tokenizer=tokenizer, data=data, train=train, budget=budget,
                     spent=spent or upstream, out=out, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                     account=account, loss_fn=loss_fn, params={"schedule": vars(schedule), "layers_kept": report["num_layers"],
                                              "parameters_after": report["parameters_after"],
                                              "distill_alpha": distill_alpha if kd else 0.0})

