"""Prefect task: load a GLUE task, tokenise it with the teacher's tokenizer, fingerprint it, save it."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from transformers import AutoTokenizer

from compression.data import DataConfig, encode, fingerprint, load_task, save_encoded
from compression.models import resolve_model_path
from tasks import tracking
from tasks.caching import STAGE_CACHE, stage_dir
from tasks.refs import DataRef


@task(name="prepare_data", cache_policy=STAGE_CACHE, persist_result=True)
def prepare_data(*, data: DataConfig, tokenizer_name: str, output_dir: str, tracking_uri: str,
                 parent_run_id: str, stage: str = "prepare_data") -> DataRef:
    """`stage`: "prepare_data" for the private task, another name (e.g. "prepare_calibration") for public text."""
    spec, train, dev = load_task(data)
    digest = fingerprint(train, dev)
    out = stage_dir(output_dir, stage, {"data": data, "tokenizer": tokenizer_name, "sha": digest})
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name))
    save_encoded(out / "train.pt", encode(train, tokenizer, max_length=data.max_length))
    save_encoded(out / "dev.pt", encode(dev, tokenizer, max_length=data.max_length))
    meta = {"task": spec.name, "metric": spec.metric, "num_labels": spec.num_labels, "num_train": len(train),
            "num_dev": len(dev), "fingerprint_sha256": digest, "source": data.dir or "huggingface hub"}
    Path(out / "data.json").write_text(json.dumps(meta, indent=2))
    with tracking.stage_run(uri=tracking_uri, parent_run_id=parent_run_id, stage=stage) as run:
        run.params({"task": spec.name, "source": meta["source"], "max_length": data.max_length,
                    "num_train": len(train), "num_dev": len(dev), "seed": data.seed})
        run.tags({"data_fingerprint_sha256": digest})
    return DataRef(path=str(out), fingerprint=digest, task=spec.name, metric=spec.metric,
                   num_labels=spec.num_labels, num_train=len(train), num_dev=len(dev))
