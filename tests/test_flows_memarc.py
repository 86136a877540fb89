"""End to end: the comparison of fine-tuning methods (flows/configs/memarc.yaml, shrunk to a tiny BERT and 48 SST-2
examples) through the real flow against a real `mlflow server` and a temporary Prefect server: every line trains at
its own epsilon from the pretrained model, the table carries each method's trainable parameters, training memory and
step time (profiled on synthetic tokens in a fresh process), the memory plot is an artifact, a rerun trains nothing."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
CONFIG = Path(__file__).resolve().parents[1] / "flows" / "configs" / "memarc.yaml"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")]


def _tiny_bert(directory: Path) -> str:
    from transformers import AutoTokenizer

    from compression.models import build_tiny, resolve_model_path, save_classifier

    model = build_tiny(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0)
    save_classifier(model, AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")), directory)
    return str(directory)


def _config(tmp_path: Path, uri: str) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    small = {"epochs": 1, "batch_size": 16, "physical_batch_size": 8, "learning_rate": 0.5,
             "encoder_learning_rate": 0.5}
    cfg.update(output_dir=str(tmp_path / "runs"), model={"name_or_path": _tiny_bert(tmp_path / "tiny")})
    cfg["data"].update(dir=str(GLUE), max_train_examples=48, max_eval_examples=32)
    cfg["privacy"].update(dataset_ledger=str(tmp_path / "ledger.db"), accountant="rdp", dataset_budget=40.0)
    cfg["nonprivate"]["train"].update(epochs=1, batch_size=16)
    cfg["teacher"]["train"] = small
    for line in cfg["finetune"]["lines"].values():
        line["train"] = small
    cfg["finetune"]["lines"]["side"]["method"]["reduction"] = 2
    cfg["profile"].update(batch_size=4, seq_len=16, steps=1, fresh_process=False)  # fresh: test_compression_profile
    cfg["tracking"] = {"uri": uri, "experiment": "e2e-memarc"}
    path = tmp_path / "memarc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_memarc_study_compares_methods_at_one_epsilon(tmp_path, mlflow_server, prefect_backend):
    from mlflow import MlflowClient

    from flows.study import study
    from privacy.ledger import Ledger

    path = _config(tmp_path, mlflow_server)
    rows = study(config_path=str(path))
    by_stage = {r["stage"]: r for r in rows}
    lines = [f"finetune_{m}" for m in ("bitfit", "lora", "side", "reversible")]
    assert list(by_stage)[:2] == ["nonprivate_teacher", "teacher"] and sorted(list(by_stage)[2:]) == sorted(lines)
    assert math.isinf(by_stage["nonprivate_teacher"]["epsilon"])
    for stage in ["teacher", *lines]:  # each at the whole epsilon: no line carries the teacher's share
        assert by_stage[stage]["epsilon"] == pytest.approx(8.0, rel=0.02), stage
        assert by_stage[stage]["epsilon"] <= 8.0 * (1 + 1e-6)
        for column in ("trainable_parameters", "train_peak_mb", "train_step_s"):
            assert by_stage[stage][column] > 0, (stage, column)
        assert by_stage[stage]["train_step_mb"] >= 0  # in the study's process a tiny step may fit freed memory
    trainable = {s: by_stage[s]["trainable_parameters"] for s in by_stage}
    assert trainable["finetune_bitfit"] < trainable["finetune_lora"] < trainable["teacher"]
    assert trainable["finetune_side"] < trainable["teacher"] == trainable["nonprivate_teacher"]

    stages = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "runs" / "memarc" / "stages").iterdir()}
    for stage in lines:  # a ledger of its own: the teacher's release is not in it
        assert [e.stage for e in Ledger.load(stages[stage] / "ledger.json").entries] == [stage]

    client = MlflowClient(mlflow_server)
    parent = client.search_runs([client.get_experiment_by_name("e2e-memarc").experiment_id],
                                filter_string="tags.`dpcompress.kind` = 'study'")[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert "results/memory_vs_metric.png" in artifacts and "results/results.csv" in artifacts
    side_run = client.get_run(by_stage["finetune_side"].get("run_id") or _run_of(client, parent, "finetune_side"))
    assert side_run.data.metrics["train_trainable_parameters"] == trainable["finetune_side"]

    before = {p.name: p.stat().st_mtime_ns for p in stages.values()}
    assert study(config_path=str(path)) == rows  # a rerun trains nothing and profiles nothing
    assert {p.name: p.stat().st_mtime_ns for p in stages.values()} == before


def _run_of(client, parent, stage: str) -> str:
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                            f"and attributes.run_name = '{stage}'")
    return runs[0].info.run_id
