"""Prefect task: training memory and step time of a stage's method (compression.profile), on a synthetic batch in a
fresh process; logged to the model's run. No private data goes in: no privacy cost, no ledger entry."""
from __future__ import annotations

import dataclasses
import json

from prefect import task

from compression.models import ModelConfig, model_fingerprint
from compression.profile import measure_in_fresh_process, run_job
from privacy import files
from tasks import tracking
from tasks.caching import FOLDER_CACHED, finished, jsonable, mark_finished, stage_dir
from tasks.console import run_logger
from tasks.refs import EvalRef, ModelRef, sha256_of

FIELDS = ("trainable_parameters", "peak_mb", "step_mb", "median_step_s")


@task(name="profile_training", **FOLDER_CACHED)
def profile_training(*, model: ModelRef, base: ModelConfig, num_labels: int, section, private: bool, profile,
                     output_dir: str, tracking_uri: str) -> EvalRef:
    """The stage's `section.method` training `base` (the pretrained model `model` started from), DP (`private`) or not,
    with `section.train`'s optimizer and engine, on `profile.batch_size` x `profile.seq_len` random token ids:
    trainable parameters, peak RSS, the step's own memory and its time (compression.profile), logged as `train_*`
    metrics of `model`'s run."""
    method, train = section.method, section.train
    batch_size, seq_len, steps = profile.batch_size, profile.seq_len, profile.steps
    job = {"model": {"name_or_path": base.name_or_path, "num_labels": num_labels, "pooling": base.pooling},
           "method": jsonable(method), "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "dp": private,
           "optimizer": train.optimizer, "engine": train.engine, "fresh_process": profile.fresh_process}
    job["method"].pop("__type__")
    out = stage_dir(output_dir, "profile", job | {"model_content": model_fingerprint(base.name_or_path)})
    done = finished(out)
    if done is None:
        run_logger().info("profile_training: %s (%s), batch %d x %d tokens, synthetic", model.stage,
                          job["method"]["name"], batch_size, seq_len)
        row = measure_in_fresh_process(job) if profile.fresh_process else run_job(job)
        results = {k: row[k] for k in FIELDS} | {"batch_size": batch_size, "seq_len": seq_len, "private": private}
        files.write_text(out / "profile.json", json.dumps(results, indent=2))
        done = EvalRef(stage="profile", model_sha256="", results=results,
                       files={str(out / "profile.json"): sha256_of(out / "profile.json")})
        mark_finished(out, done)
    if model.run_id:
        tracking.log_once(tracking_uri, model.run_id, {f"train_{k}": float(done.results[k]) for k in FIELDS},
                          tags={"train_profile": f"batch {batch_size} x {seq_len} synthetic tokens, "
                                                 + ("fresh process" if profile.fresh_process else "study process")})
    return dataclasses.replace(done, stage=model.stage, run_id=model.run_id)

