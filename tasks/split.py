"""Prefect tasks of the Split-and-Privatize branch (compression.split): one split fine-tuning per configuration, the
inversion attacks of one split depth, the table. A split stage uses the private training data under local d_chi noise,
not central DP: it writes a release record (not a privacy ledger) and a dataset-ledger row that say so (mechanism dx,
its eta, unit one token representation; without noise, nonprivate), and nothing of it enters any epsilon.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from prefect import task

from compression.data import load_encoded, sample_encoded
from compression.models import ModelConfig, load_classifier, model_fingerprint
from compression.split import AttackConfig, SplitConfig, attack, fine_tune_split
from compression.split.audit import representations
from compression.split.customer import Customer, DXConfig
from compression.split.report import split_rows, write_split_results
from compression.split.training import guarantee
from privacy import files
from privacy.dataset_ledger import DatasetLedger
from privacy.mechanisms.dx import NoiseStream
from tasks import tracking
from tasks.caching import FOLDER_CACHED, NOT_CACHED, finished, jsonable, mark_finished, stage_dir
from tasks.refs import DataRef, EvalRef, RunContext, SplitRef, sha256_of
from tasks.stage import console_progress, reuse

LOCAL = "local dχ guarantee, no central DP"
NONE = "no guarantee: representations cross unperturbed, no central DP"
SEEDED = "none: noise seeded from the config (privacy.reproducible_noise, a test mode), no central DP"


@task(name="split_stage", **FOLDER_CACHED)
def split_stage(*, stage: str, config: SplitConfig, data: DataRef, model: ModelConfig, max_train_examples: int | None,
                seeded: bool, output_dir: str, context: RunContext) -> SplitRef:
    """Split fine-tuning of the pretrained `model` on (a seeded sample of) the private training data, evaluated on
    dev through the same boundary; the dev metric and steps in split.json, what it guarantees in record.json and
    the dataset ledger, logged to the stage's run. `seeded`: the test mode (noise seeded from the config)."""
    key = {"config": config, "data": data, "model": model, "max_train_examples": max_train_examples,
           "seeded": seeded, "model_content": model_fingerprint(model.name_or_path)}
    out = stage_dir(output_dir, stage, key)
    if done := reuse(out, stage, context):
        return done
    net, _ = load_classifier(model.name_or_path, num_labels=data.num_labels, pooling=model.pooling,
                             dropout=model.dropout, seed=config.seed)
    train = sample_encoded(load_encoded(data.train_file), max_train_examples, seed=config.seed)
    with tracking.stage_run(uri=context.tracking_uri, parent_run_id=context.parent_run_id, stage=stage,
                            stage_key=out.name) as run:
        run.params({"split": jsonable(config), "max_train_examples": max_train_examples})
        run.dataset(data, num_rows=len(train["labels"]))
        # the use of the data is in the ledger before any of it crosses to the vendor (idempotent: a retried stage
        # records it once)
        noise = "none" if math.isinf(config.dx.eta) else "seeded" if seeded else "secret"
        record = _record(stage, config, data, noise=noise)
        _record_use(context, stage, out.name, record)
        files.write_text(out / "record.json", json.dumps(record, indent=2))
        metrics = fine_tune_split(net, train, load_encoded(data.dev_file), config=config, metric=data.metric,
                                  noise=NoiseStream(seed=config.seed) if seeded else None,
                                  on_step=console_progress(stage, "split, local d_chi noise")).metrics
        results = {"dev": metrics["dev"], "num_steps": metrics["num_steps"], "num_train": metrics["num_train"]}
        files.write_text(out / "split.json", json.dumps(metrics, indent=2))  # eta levels of CTI: local only
        run.metrics({f"dev_{k}": v for k, v in results["dev"].items()} | {"num_steps": results["num_steps"]})
        run.tags(_tags(record))
        run.artifact(out / "record.json")
        ref = SplitRef(stage=stage, split_layer=config.split_layer, eta=config.dx.eta, cti=config.cti.enabled,
                       path=str(out / "split.json"), sha256=sha256_of(out / "split.json"),
                       record_path=str(out / "record.json"), record_sha256=sha256_of(out / "record.json"),
                       results=results, run_id=run.run_id)
        mark_finished(out, ref, run.logged)
    return ref


def _record(stage: str, config: SplitConfig, data: DataRef, *, noise: str) -> dict:
    noisy = not math.isinf(config.dx.eta)
    said = SEEDED if noise == "seeded" else guarantee(config)
    return {"format": "dpcompress.split_release/1", "stage": stage, "mechanism": "dx" if noisy else "nonprivate",
            "eta": config.dx.eta if noisy else "inf", "unit": "one token representation", "central_dp": False,
            "composed_into_epsilon": False, "guarantee": said, "cti": config.cti.enabled,
            "crossed": "privatized token representations after block k, attention masks, training labels",
            "noise": noise, "dataset_fingerprint": data.fingerprint}


def _record_use(context: RunContext, stage: str, stage_key: str, record: dict) -> None:
    """The dataset ledger's row: listed in the data's history with its guarantee, never composed into epsilon."""
    if (account := context.account) is None:
        return
    with DatasetLedger(account.url) as lifetime:
        lifetime.record_uncomposed(
            dataset=account.dataset, study=account.study, study_key=account.study_key, run_id=account.run_id,
            stage=stage, stage_key=stage_key, mechanism=record["mechanism"], guarantee=record["guarantee"],
            eta=record["eta"] if record["mechanism"] == "dx" else None,
            noise="" if record["noise"] == "none" else record["noise"])


def _tags(record: dict) -> dict:
    said = LOCAL if record["mechanism"] == "dx" else NONE
    if record["noise"] == "seeded":
        said = SEEDED
    return {"guarantee": said, "central_dp": "none",
            "dx_eta": str(record["eta"]), "unit_of_privacy": record["unit"], "labels": "cross to the vendor",
            "cti": str(record["cti"]).lower(), "noise": record["noise"]}


def attack_logged(found: dict) -> tuple[dict, dict]:
    """The metrics and tags an attack's results log to its stage's run. MLflow cannot delete a metric, so a stage
    attacked again with fewer kinds keeps its old `attack_recovery_<kind>`; the tag `attack_candidates` names the
    kinds this attack ran (one kind logs no per-kind metric)."""
    candidates = found.get("candidates", {})
    metrics = {"attack_recovery": found["recovery"], "empirical_privacy": found["empirical_privacy"]}
    return metrics | {f"attack_recovery_{name}": v for name, v in candidates.items()}, {
        "attack": found["attack"], "attacked_text": "dev (held out)",
        "attack_candidates": ",".join(sorted(candidates)) or found["attack"]}


@task(name="split_attack", **FOLDER_CACHED)
def split_attack(*, split_layer: int, stages: list[SplitRef], configs: dict[str, SplitConfig], data: DataRef,
                 public: list[DataRef], model: ModelConfig, settings: AttackConfig, max_train_examples: int | None,
                 seeded: bool, output_dir: str, tracking_uri: str) -> EvalRef:
    """The inversion attack on every configuration at `split_layer` (`configs`, by stage), each cached on its own:
    top-1 recovery on the dev text as the customer sends it, CTI fit on the same training sample as the stage; the
    public text's clean representations are computed once for the depth. Logged to each stage's run."""
    from compression.pruning.public_distill import public_texts

    net, tokenizer = load_classifier(model.name_or_path, num_labels=data.num_labels, pooling=model.pooling)
    special = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id]
    texts = public_texts([load_encoded(p.train_file) for p in public], split_pairs=True)
    train, clean, results, digests = None, None, {}, {}
    for ref in stages:
        config = configs[ref.stage]
        out = stage_dir(output_dir, "split_attack", {"config": config, "data": data, "public": public, "model": model,
                                                     "settings": settings, "max_train_examples": max_train_examples,
                                                     "seeded": seeded, "model_content": model_fingerprint(
                                                         model.name_or_path)})
        if (done := finished(out)) is None:
            if train is None:  # the stage's own sample: CTI is fit on what the customer trained on
                train = sample_encoded(load_encoded(data.train_file), max_train_examples, seed=config.seed)
            if clean is None and split_layer > 0:  # the same public bottom for every eta and CTI setting
                bottom = Customer(net, split_layer=split_layer, dx=DXConfig())
                clean = representations(bottom, texts, special_ids=special, max_tokens=settings.max_public_tokens)
            found = attack(net, train, texts, config=config, special_ids=special, attack_config=settings,
                           attacked=load_encoded(data.dev_file), public_clean=clean,
                           noise=NoiseStream(seed=config.seed) if seeded else None).to_dict()
            files.write_text(out / "attack.json", json.dumps(found, indent=2))
            done = EvalRef(stage=ref.stage, model_sha256="", results=found,
                           files={str(out / "attack.json"): sha256_of(out / "attack.json")})
            mark_finished(out, done)
        results[ref.stage], digests = done.results, digests | done.files
        if ref.run_id:
            metrics, tags = attack_logged(done.results)
            tracking.log_once(tracking_uri, ref.run_id, metrics, tags=tags)
    return EvalRef(stage=f"split_attack_k{split_layer}", model_sha256="", results=results, files=digests)


@task(name="split_table", **NOT_CACHED)
def split_table(*, stages: list[SplitRef], attacks: list[EvalRef], metric: str, tracking_uri: str,
                parent_run_id: str, output_dir: str) -> list[dict]:
    """The study's split table (compression.split.report) under results/split/, logged to the study's run as
    artifacts `split/`; returns its rows."""
    found = {stage: result for a in attacks for stage, result in a.results.items()}
    rows = split_rows([{"stage": s.stage, "split": s.split_layer, "eta": s.eta, "cti": s.cti,
                        "metric": s.results["dev"][metric], "attack": found[s.stage]["attack"],
                        "recovery": found[s.stage]["recovery"]} for s in stages])
    directory = Path(output_dir) / "results" / "split"
    write_split_results(rows, directory, metric=metric)
    run = tracking.StageRun(tracking.client(tracking_uri), parent_run_id)
    run.artifact(directory, "split")
    run.tags({"split_guarantee": f"split stages: {LOCAL} (eta per token representation, reported beside epsilon)"})
    return rows
