"""Prefect tasks for the teachers: the DP teacher (the root of every model line) and the non-private baseline."""
from __future__ import annotations

import json
import math
import shutil

from prefect import task

from compression.data import load_encoded
from compression.methods import merge, prepare
from compression.models import ModelConfig, load_classifier, model_fingerprint, save_classifier
from compression.train import TrainConfig, dp_train
from privacy import files
from privacy.config import StageBudget
from privacy.dataset_ledger import DatasetLedger
from tasks import tracking
from tasks.caching import FOLDER_CACHED, mark_finished, stage_dir
from tasks.refs import DataRef, ModelRef, RunContext, sha256_of
from tasks.stage import console_progress, reuse, run_dp_stage


@task(name="train_teacher", **FOLDER_CACHED)
def train_teacher(*, stage: str, budget: StageBudget, data: DataRef, model: ModelConfig, method, train: TrainConfig,
                  output_dir: str, context: RunContext, ledger_from: ModelRef | None = None) -> ModelRef:
    """DP fine-tuning of the pretrained model (`model`) with a fresh head: the DP teacher, or a line of the
    comparison of fine-tuning methods (its ledger extending `ledger_from`'s under scope "study")."""
    key = {"data": data, "model": model, "method": method, "train": train, "budget": budget,
           "model_content": model_fingerprint(model.name_or_path)}
    out = stage_dir(output_dir, stage, key if ledger_from is None else key | {"ledger_from": ledger_from})
    if done := reuse(out, stage, context):
        return done
    net, tokenizer = load_classifier(model.name_or_path, num_labels=data.num_labels, pooling=model.pooling,
                                     dropout=model.dropout, seed=train.seed, encoder_dropout=model.encoder_dropout)
    return run_dp_stage(name=stage, budget=budget, model=net, tokenizer=tokenizer, data=data, train=train,
                        method=method, out=out, ledger_from=ledger_from, context=context,
                        params={"model": vars(model)})


@task(name="train_nonprivate", **FOLDER_CACHED)
def train_nonprivate(*, stage: str, data: DataRef, model: ModelConfig, method, train: TrainConfig, output_dir: str,
                     context: RunContext) -> ModelRef:
    """A non-private baseline teacher (no noise; epsilon = infinity). Its record is deliberately not a privacy
    ledger, so `Ledger.load` refuses it and no private stage can start from it; the dataset ledger lists it."""
    out = stage_dir(output_dir, stage, {"data": data, "model": model, "method": method, "train": train,
                                        "model_content": model_fingerprint(model.name_or_path)})
    if done := reuse(out, stage, context):
        return done
    net, tokenizer = load_classifier(model.name_or_path, num_labels=data.num_labels, pooling=model.pooling,
                                     dropout=model.dropout, seed=train.seed, encoder_dropout=model.encoder_dropout)
    with tracking.stage_run(uri=context.tracking_uri, parent_run_id=context.parent_run_id, stage=stage,
                            stage_key=out.name) as run:
        run.params({"train": vars(train), "method": vars(method), "private": False, "model": vars(model)})
        run.dataset(data)
        net = prepare(net, method)
        dp_train(net, load_encoded(data.train_file), config=train, method=method, noise_multiplier=0.0,
                 checkpoint_dir=out / "checkpoint", on_step=console_progress(stage))
        save_classifier(merge(net, method), tokenizer, out / "model")
        record = {"format": "dpcompress.nonprivate/1", "epsilon": "inf", "dataset_fingerprint": data.fingerprint,
                  "note": "trained on the private data WITHOUT differential privacy: a baseline, never release it"}
        files.write_text(out / "ledger.json", json.dumps(record, indent=2))
        if (account := context.account) is not None:  # listed in the dataset's history, never composed
            with DatasetLedger(account.url) as lifetime:
                lifetime.record_nonprivate(dataset=account.dataset, study=account.study,
                                           study_key=account.study_key, run_id=account.run_id, stage=stage,
                                           stage_key=out.name)
        run.tags({"epsilon": "inf", "private": "false"})
        run.artifact(out / "ledger.json")
        ref = ModelRef(stage=stage, path=str(out / "model"), sha256=sha256_of(out / "model"),
                       ledger_path=str(out / "ledger.json"), ledger_sha256=sha256_of(out / "ledger.json"),
                       epsilon=math.inf, delta=0.0, run_id=run.run_id)
        mark_finished(out, ref, run.logged)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return ref
