"""The Split-and-Privatize branch of a study (flows/split.py, the `split` section): its config (errors name the field;
the grid of configurations), and end to end through the real flow (flows/configs/sap.yaml shrunk to a tiny BERT, 48
SST-2 examples and two configurations) with a temporary Prefect server: the split table and plot are artifacts of the
study's run, each stage has a dataset-ledger row stating its local guarantee (never composed into epsilon) and MLflow
tags saying so, the vendor received the crossing schema only (no token ids, no text), and a rerun recomputes
nothing."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from flows.config import ConfigError, validate_config
from flows.config_split import attack_config, public_sources, split_configs

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
CONFIG = Path(__file__).resolve().parents[1] / "flows" / "configs" / "sap.yaml"
needs_glue = pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")


def _errors(split: dict, task: str = "sst2") -> str:
    with pytest.raises(ConfigError) as err:
        validate_config({"data": {"task": task}, "split": {"enabled": True, **split}}, "s.yaml")
    return str(err.value)


def test_an_attack_logs_which_kinds_it_ran_beside_metrics_that_mlflow_cannot_delete():
    from tasks.split import attack_logged

    every = {"attack": "neighbour_clean", "recovery": 0.4, "empirical_privacy": 0.6,
             "candidates": {"linear": 0.2, "neighbour_clean": 0.4, "neighbour": 0.3}}
    metrics, tags = attack_logged(every)
    assert metrics == {"attack_recovery": 0.4, "empirical_privacy": 0.6, "attack_recovery_linear": 0.2,
                       "attack_recovery_neighbour_clean": 0.4, "attack_recovery_neighbour": 0.3}
    assert tags["attack_candidates"] == "linear,neighbour,neighbour_clean" and tags["attack"] == "neighbour_clean"
    # attacked again with one kind: no per-kind metric, and the tag no longer names the earlier kinds
    metrics, tags = attack_logged({"attack": "linear", "recovery": 0.2, "empirical_privacy": 0.8, "candidates": {}})
    assert metrics == {"attack_recovery": 0.2, "empirical_privacy": 0.8} and tags["attack_candidates"] == "linear"


def test_the_split_section_names_every_bad_field():
    assert "s.yaml: split.etas: include inf" in _errors({"etas": [50]})
    assert "split.etas: give distinct etas > 0" in _errors({"etas": ["inf", 0]})
    assert "split.etas.1: expected a number, got the boolean true" in _errors({"etas": ["inf", True]})
    assert "split.splits: give one or more distinct block counts" in _errors({"splits": [2, 2]})
    assert "split.method: the vendor trains one of" in _errors({"method": {"name": "side"}})
    assert "split.attak: unknown key" in _errors({"attak": {}})
    assert "split.attack.public[0].task='sst2' is the private task" in _errors({"attack": {"public": [{"task":
                                                                                                       "sst2"}]}})
    assert "split.cti: contributing tokens are scored against class labels" in _errors(
        {"attack": {"public": [{"task": "cola"}]}}, task="stsb")
    assert "split.snap_to_vocab applies at the embedding split" in _errors({"snap_to_vocab": True, "splits": [2]})
    assert "split.attack.kind nearest reads the embedding table" in _errors({"splits": [0, 2],
                                                                              "attack": {"kind": "nearest"}})
    assert "split.attack.kind" in _errors({"attack": {"kind": "knn"}})
    assert "split.cti_score" in _errors({"cti_score": "chi2"})


def test_the_grid_runs_each_depths_baseline_first_and_cti_only_with_noise():
    cfg = validate_config({"data": {"task": "sst2", "dir": "/glue"}, "split": {
        "enabled": True, "splits": [0, 2], "etas": ["inf", 50], "cti": [False, True], "snap_to_vocab": True,
        "attack": {"public": [{"task": "cola"}, {"task": "mrpc", "dir": "/other"}]}}}, "s.yaml")
    configs = split_configs(cfg.split)
    assert list(configs) == ["split_k0_plain", "split_k0_eta50", "split_k0_eta50_cti",
                             "split_k2_plain", "split_k2_eta50", "split_k2_eta50_cti"]
    assert math.isinf(configs["split_k2_plain"].dx.eta) and not configs["split_k2_plain"].cti.enabled
    assert configs["split_k0_eta50"].dx.snap and not configs["split_k2_eta50"].dx.snap  # snap: embedding split only
    assert configs["split_k2_eta50_cti"].vendor.method.name == "lora"
    assert configs["split_k2_eta50_cti"].cti.score == "tfidf"
    assert [s.dir for s in public_sources(cfg.split, cfg.data)] == ["/glue", "/other"]
    assert attack_config(cfg.split).kind == "auto"
    other = validate_config({"data": {"task": "sst2"}, "split": {"enabled": True, "cti_score": "log_odds",
                                                                  "attack": {"kind": "neighbour"}}}, "s.yaml")
    assert attack_config(other.split).kind == "neighbour"
    assert {c.cti.score for c in split_configs(other.split).values()} == {"log_odds"}


def _tiny_bert(directory: Path) -> str:
    from transformers import AutoTokenizer

    from compression.models import build_tiny, resolve_model_path, save_classifier

    model = build_tiny(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0)
    save_classifier(model, AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")), directory)
    return str(directory)


def _config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.update(output_dir=str(tmp_path / "runs"), model={"name_or_path": _tiny_bert(tmp_path / "tiny")})
    cfg["data"].update(dir=str(GLUE), max_train_examples=48, max_eval_examples=24)
    cfg["privacy"].update(dataset_ledger=str(tmp_path / "ledger.db"), accountant="rdp")
    cfg["teacher"]["train"].update(batch_size=16)
    cfg["split"].update(splits=[1], etas=["inf", 20.0], cti=[True], batch_size=16, cti_tokens=20)
    cfg["split"]["attack"] = {"max_examples": 16, "max_public_tokens": 2000,
                              "public": [{"task": "cola", "max_train_examples": 300}]}
    path = tmp_path / "sap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@needs_glue
def test_split_branch_end_to_end_records_local_guarantees_and_reruns_from_cache(tmp_path, prefect_backend,
                                                                                monkeypatch):
    from mlflow import MlflowClient

    from compression.split.crossing import field_names
    from compression.split.vendor import Vendor
    from flows.study import study
    from privacy.accounting import compose_epsilon
    from privacy.dataset_ledger import DatasetLedger

    received, handle, recorded_first = [], Vendor.handle, []

    def vendor_sees(self, route, payload):
        if route == "train" and not any(r == "train" for r, _ in received):  # a stage's first crossing
            with DatasetLedger(tmp_path / "ledger.db", create=False) as ledger:
                recorded_first.append([r.mechanism for r in ledger.history()])
        received.append((route, payload))
        return handle(self, route, payload)

    monkeypatch.setattr(Vendor, "handle", vendor_sees)
    path = _config(tmp_path)
    study(config_path=str(path))
    study_dir = tmp_path / "runs" / "sap"

    with open(study_dir / "results" / "split" / "split.csv") as table:
        rows = {r["stage"]: r for r in csv.DictReader(table)}
    assert set(rows) == {"split_k1_plain", "split_k1_eta20_cti"}
    assert rows["split_k1_plain"]["attack"] in ("linear", "neighbour", "neighbour_clean")  # the strongest learned one
    assert rows["split_k1_plain"]["ep_gain_rel"] in ("0.0", "")
    for row in rows.values():
        assert 0 <= float(row["accuracy"]) <= 1 and math.isclose(float(row["ep"]) + float(row["recovery"]), 1)

    # the vendor saw the crossing schema only: float representations, masks, training labels; never ids or text
    assert {route for route, _ in received} == {"train", "eval"}
    assert recorded_first == [["dp_sgd", "nonprivate"]]  # the use is in the ledger before any data crosses
    for route, payload in received:
        assert field_names(payload) == ["hidden", "attention_mask"] + (["labels"] if route == "train" else [])

    with DatasetLedger(tmp_path / "ledger.db", create=False) as ledger:
        history = ledger.history()
        by_stage = {r.stage: r for r in history}
        assert [r.mechanism for r in history] == ["dp_sgd", "nonprivate", "dx"]
        local = by_stage["split_k1_eta20_cti"]
        assert (local.eta, local.event, local.noise) == (20.0, None, "secret")
        assert "per token representation" in local.guarantee and "labels cross" in local.guarantee
        assert "unperturbed" in by_stage["split_k1_plain"].guarantee and by_stage["split_k1_plain"].noise == ""
        teacher = by_stage["teacher"]
        assert ledger.epsilon(teacher.dataset, delta=teacher.delta, accountant="rdp") == pytest.approx(
            compose_epsilon([teacher.event], delta=teacher.delta, accountant="rdp"))  # the split stages: never
    stages = {p.name.rsplit("-", 1)[0]: p for p in (study_dir / "stages").iterdir()}
    record = yaml.safe_load((stages["split_k1_eta20_cti"] / "record.json").read_text())
    assert (record["mechanism"], record["central_dp"], record["unit"]) == ("dx", False, "one token representation")

    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dpcompress").experiment_id
    parent = client.search_runs([experiment], filter_string="tags.`dpcompress.kind` = 'study'")[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "split")}
    assert {"split/split.csv", "split/split.md", "split/accuracy_vs_ep.png"} <= artifacts
    stage_run = client.search_runs([experiment], filter_string="attributes.run_name = 'split_k1_eta20_cti'")[0]
    assert stage_run.data.tags["guarantee"] == "local dχ guarantee, no central DP"
    assert stage_run.data.tags["dx_eta"] == "20.0" and "attack_recovery" in stage_run.data.metrics
    assert {f"attack_recovery_{k}" for k in ("linear", "neighbour", "neighbour_clean")} <= set(stage_run.data.metrics)
    assert stage_run.data.tags["attack_candidates"] == "linear,neighbour,neighbour_clean"
    assert [d.dataset.name for d in stage_run.inputs.dataset_inputs] == ["sst2"]  # the private data it trained on

    before = {p.name: p.stat().st_mtime_ns for p in (study_dir / "stages").iterdir()}
    received.clear()
    study(config_path=str(path))  # a rerun: every stage and attack from its folder
    assert {p.name: p.stat().st_mtime_ns for p in (study_dir / "stages").iterdir()} == before
    assert received == []  # nothing trained: nothing crossed
    with DatasetLedger(tmp_path / "ledger.db", create=False) as ledger:
        assert len(ledger.history()) == len(history)  # nothing used again
