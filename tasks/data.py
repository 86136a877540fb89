"""Prefect task: load a GLUE task, tokenise it with the teacher's tokenizer, fingerprint it (keyed), save it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import task
from transformers import AutoTokenizer

from compression.data import (
    HF_DATASET,
    DataConfig,
    encode,
    fingerprint,
    load_source,
    row_hashes,
    save_encoded,
    subsample_task,
)
from compression.models import model_fingerprint, resolve_model_path
from privacy import files
from privacy.fingerprint import owner_key
from tasks import tracking
from tasks.caching import FOLDER_CACHED, mark_finished, stage_dir
from tasks.refs import DataRef, RunContext, sha256_of
from tasks.stage import reuse

ROWS_FILE = "row_hashes.npy"  # keyed hashes of every text of the source's train split: local, for overlap checks


@task(name="prepare_data", **FOLDER_CACHED)
def prepare_data(*, data: DataConfig, tokenizer_name: str, output_dir: str, context: RunContext,
                 stage: str = "prepare_data", private: DataRef | None = None) -> DataRef:
    """`stage`: "prepare_data" for the private task, another name (e.g. "prepare_calibration") for public text, which
    is refused if it shares any text with the `private` data's source. Only keyed fingerprints are published."""
    key = owner_key()
    spec, source, full_dev = load_source(data)
    train, dev = subsample_task(data, source, full_dev)
    digest, source_digest = fingerprint(train, dev, key=key), fingerprint(source, key=key)
    rows = row_hashes(source, key=key)
    if private is not None:
        _check_disjoint(rows, private, what=f"{stage} ({spec.name} from {data.dir or 'the hub'})")
    out = stage_dir(output_dir, stage, {"data": data, "tokenizer": tokenizer_name, "fingerprint": digest,
                                        "tokenizer_content": model_fingerprint(tokenizer_name)})
    if done := reuse(out, stage, context):  # keyed on the data's content: edited data at the same path is new
        return done
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name))
    save_encoded(out / "train.pt", encode(train, tokenizer, max_length=data.max_length))
    save_encoded(out / "dev.pt", encode(dev, tokenizer, max_length=data.max_length))
    files.atomic_write(out / ROWS_FILE, lambda handle: np.save(handle, np.array(sorted(rows), dtype="S64")))
    where = str((Path(data.dir) / spec.folder).resolve()) if data.dir else f"https://huggingface.co/datasets/{HF_DATASET}"
    meta = {"task": spec.name, "metric": spec.metric, "num_labels": spec.num_labels, "num_train": len(train),
            "num_dev": len(dev), "fingerprint": digest, "source_fingerprint": source_digest, "source": where}
    files.write_text(out / "data.json", json.dumps(meta, indent=2))
    ref = DataRef(path=str(out), fingerprint=digest, source_fingerprint=source_digest, task=spec.name,
                  metric=spec.metric, num_labels=spec.num_labels, num_train=len(train), num_dev=len(dev),
                  files={str(out / name): sha256_of(out / name, key=key) for name in ("train.pt", "dev.pt", ROWS_FILE)},
                  source=where)
    with tracking.stage_run(uri=context.tracking_uri, parent_run_id=context.parent_run_id, stage=stage,
                            stage_key=out.name) as run:
        run.params({"task": spec.name, "source": where, "max_length": data.max_length,
                    "num_train": len(train), "num_dev": len(dev), "seed": data.seed})
        run.tags({"data_fingerprint": digest, "source_fingerprint": source_digest, "fingerprint": "hmac-sha256"})
        run.dataset(ref, context="training" if private is None else "calibration")
        mark_finished(out, ref, run.logged)
    return ref


def _check_disjoint(rows: set[str], private: DataRef, *, what: str) -> None:
    """Public text must share no text with the private data (compared by keyed hashes, never by content)."""
    private_rows = {bytes(h).decode() for h in np.load(Path(private.path) / ROWS_FILE)}
    if rows & private_rows:
        raise ValueError(f"{what} is not public: it shares texts with the private training data of "
                         f"{private.task} ({private.path}); public sources must be disjoint from the private data")
