"""End to end on other model families: the quickstart study (DP teacher, two pruning rounds, DP distillation into an
every-other-layer student, evaluation with HF export) on a tiny RoBERTa and a tiny DistilBERT, through the real
flow against a real `mlflow server` process and a temporary Prefect server."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")]


def _tiny_model(directory: Path, model_type: str) -> str:
    """A 4-layer model of `model_type` built from a config, with the bundled MiniLM tokenizer (no download)."""
    from transformers import AutoTokenizer

    from compression.models import build_tiny, resolve_model_path, save_classifier

    model = build_tiny(model_type=model_type, vocab_size=30522, hidden_size=32, num_layers=4, intermediate_size=64,
                       seed=0)
    save_classifier(model, AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")), directory)
    return str(directory)


def _config(tmp_path: Path, model: str, uri: str, name: str) -> Path:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "flows/configs/quickstart.yaml").read_text())
    # rdp: the PRV accountant's calibrations take most of a tiny study's time; the families are what is tested here
    cfg["privacy"].update(dataset_ledger=str(tmp_path / "ledger.db"), dataset_budget=100.0, accountant="rdp")
    small = {"epochs": 1, "batch_size": 16, "physical_batch_size": 8}
    cfg.update(name=name, output_dir=str(tmp_path / "runs"), model={"name_or_path": model})
    cfg["data"].update(dir=str(GLUE), max_train_examples=48, max_eval_examples=32)
    for section in ("teacher", "prune", "distill"):
        cfg[section].update(train=small, method={"name": "full", "layers": 2})
    cfg["tracking"] = {"uri": uri, "experiment": "e2e-families"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_quickstart_study_runs_on_other_families(tmp_path, mlflow_server, prefect_backend, model_type):
    from transformers import AutoModelForSequenceClassification

    from compression.models import load_saved
    from flows.study import study

    model = _tiny_model(tmp_path / f"tiny-{model_type}", model_type)
    rows = study(config_path=str(_config(tmp_path, model, mlflow_server, f"tiny-{model_type}")))
    assert [r["stage"] for r in rows] == ["teacher", "prune_1", "prune_2", "distill"]
    assert rows[2]["sparsity"] == pytest.approx(0.5, abs=0.01)  # the family's layer weights, pruned in two rounds
    assert rows[-1]["epsilon"] == pytest.approx(8.0, rel=0.02) and rows[-1]["epsilon"] <= 8.0 * (1 + 1e-6)
    assert rows[-1]["parameters"] < rows[0]["parameters"]  # every other layer

    stages = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "runs" / f"tiny-{model_type}" / "stages").iterdir()}
    student, tokenizer = load_saved(stages["distill"] / "model")
    assert student.encoder.config.model_type == model_type and student.num_layers == 2
    exported = AutoModelForSequenceClassification.from_pretrained(stages["distill"] / "evaluation" / "hf",
                                                                 trust_remote_code=True)
    assert exported.config.encoder_config["model_type"] == model_type
    batch = tokenizer(["a fine film", "not good at all , sadly"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = student.eval()(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = exported(**batch).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
