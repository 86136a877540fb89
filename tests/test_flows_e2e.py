"""End to end: a tiny study (tiny BERT from a config, a few dozen SST-2 rows) against a real `mlflow server`
process and a temporary Prefect server; rerun trains nothing; a failed middle stage resumes from there."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from privacy.files import sha256_of

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")]


class LocalLines(logging.Handler):
    """Collects what the local console logger prints (the only place training loss may appear)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def local_console():
    from tasks.console import console

    handler = LocalLines()
    console().addHandler(handler)
    yield handler
    console().removeHandler(handler)


def _what_left_the_process(storage: Path) -> str:
    """Every log line the Prefect server holds, and every persisted task result, as one text."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    logs = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(limit=200, offset=len(logs)):  # the API's page limit
            logs += page
    results = [f.read_bytes().decode("utf-8", "replace") for f in storage.rglob("*") if f.is_file()]
    return "\n".join([log.message for log in logs] + results)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT built from a config with the bundled MiniLM tokenizer (no download)."""
    from transformers import AutoTokenizer

    from compression.models import build_tiny, resolve_model_path, save_classifier

    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    model = build_tiny(vocab_size=30522, hidden_size=32, num_layers=4, intermediate_size=64, seed=0)
    save_classifier(model, AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")), path)
    return str(path)


def _config(tmp_path: Path, model: str, uri: str, name: str, schedule: dict | None = None,
            privacy: dict | None = None) -> Path:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "flows/configs/quickstart.yaml").read_text())
    cfg["prune"].setdefault("schedule", {}).update(schedule or {})
    cfg["privacy"].update({"dataset_ledger": str(tmp_path / "ledger.db"), **(privacy or {})})
    small = {"epochs": 1, "batch_size": 16, "physical_batch_size": 8}
    cfg.update(name=name, output_dir=str(tmp_path / "runs"), model={"name_or_path": model})
    cfg["data"].update(dir=str(GLUE), max_train_examples=48, max_eval_examples=32)
    for section in ("teacher", "prune", "distill"):
        cfg[section].update(train=small, method={"name": "full", "layers": 2})
    cfg["tracking"] = {"uri": uri, "experiment": "e2e"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _record_losses(monkeypatch) -> list[float]:
    """Every training loss the stages compute (what must never leave the process), at full precision."""
    import tasks.stage

    losses, train = [], tasks.stage.dp_train

    def spy(*args, on_step=None, **kwargs):
        def record(step, metrics):
            losses.append(metrics["loss"])
            if on_step:
                on_step(step, metrics)
        return train(*args, on_step=record, **kwargs)
    monkeypatch.setattr(tasks.stage, "dp_train", spy)
    return losses


class Calls:
    """Counts calls of a function a task uses, `module.name` (tasks run in threads of this process)."""

    def __init__(self, monkeypatch, where: str, fail_first: bool = False):
        import importlib

        module_name, name = where.rsplit(".", 1)
        module = importlib.import_module(module_name)
        self.count, self.fail_first, self.original = 0, fail_first, getattr(module, name)
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.count += 1
        if self.fail_first and self.count == 1:
            raise RuntimeError("injected failure in a middle stage")
        return self.original(*args, **kwargs)


def test_study_runs_tracks_and_reruns_from_cache(tmp_path, mlflow_server, prefect_backend, tiny_model, monkeypatch,
                                                 local_console):
    from compression.data import DataConfig, load_task
    from flows.study import study

    # this study may retrain its stages once with other settings: a lifetime budget for two studies' worth
    # this study retrains some stages with other settings or after damage: a lifetime budget for that
    path = _config(tmp_path, tiny_model, mlflow_server, "tiny", privacy={"dataset_budget": 30.0})
    trained = Calls(monkeypatch, "tasks.stage.dp_train")
    losses = _record_losses(monkeypatch)
    from_mlflow = LocalLines()  # what MLflow says while the study logs and registers
    logging.getLogger("mlflow").addHandler(from_mlflow)
    try:
        rows = study(config_path=str(path))
    finally:
        logging.getLogger("mlflow").removeHandler(from_mlflow)
    assert not [line for line in from_mlflow.lines if "pickle" in line.lower()]  # registered as code, not pickled
    # Nothing computed on private examples left the process: no loss value and no training text in Prefect's logs
    # or persisted results (they live on the server and in result storage), only on the local console.
    assert len(losses) >= 12 and any("loss " in line for line in local_console.lines)
    shipped = _what_left_the_process(prefect_backend)
    assert "step" in shipped and "eps" in shipped  # public progress did reach Prefect
    forms = [form for value in losses for form in (repr(value), f"{value:.6g}", f"loss {value:.4f}")]
    leaked = [form for form in forms if form in shipped]
    assert not leaked
    assert "loss" not in shipped.lower()
    _, train, _ = load_task(DataConfig(task="sst2", dir=str(GLUE), max_train_examples=48))
    assert not [text for text in train.texts[0] if len(text) > 12 and text in shipped]
    assert [r["stage"] for r in rows] == ["teacher", "prune_1", "prune_2", "distill"]
    assert trained.count == 4
    assert rows[-2]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(0 < r["epsilon"] <= 8.0 * (1 + 1e-6) for r in rows)
    assert rows[-1]["epsilon"] == pytest.approx(8.0, rel=0.02)  # the whole budget, no slack
    assert [r["epsilon"] for r in rows] == sorted(r["epsilon"] for r in rows)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("e2e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3 opens it as model training
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dpcompress.kind") == "study"]
    assert len(parents) == 1
    stages = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"prepare_data", "teacher", "prune_1", "prune_2", "distill"} <= stages
    teacher = next(r for r in runs if r.info.run_name == "teacher")
    assert "dev_accuracy" in teacher.data.metrics and teacher.data.tags["accountant"] == "prv"
    assert "ledger.json" in {a.path for a in client.list_artifacts(teacher.info.run_id)}
    assert not any("loss" in k for k in teacher.data.metrics)  # nothing computed on private data
    version = client.search_model_versions("name='tiny-sst2'")[0]
    assert float(version.tags["epsilon"]) == pytest.approx(rows[-1]["epsilon"], rel=1e-3)
    assert version.tags["accountant"] == "prv" and "delta" in version.tags
    assert version.tags["noise"] == "secret" and version.tags["unit_of_privacy"] == "example"
    assert version.tags["sampling"] == "poisson" and version.tags["epsilon_scope"] == "its own ledger"
    prepared = next(r for r in runs if r.info.run_name == "prepare_data")
    assert prepared.data.tags["fingerprint"] == "hmac-sha256" and len(prepared.data.tags["data_fingerprint"]) == 64
    (data_input,) = teacher.inputs.dataset_inputs  # the stage's dataset: task, keyed digest, counts; no rows
    assert data_input.dataset.name == "sst2"
    assert data_input.dataset.digest == prepared.data.tags["data_fingerprint"][:32]
    assert json.loads(data_input.dataset.profile)["num_train"] == 48
    champion = client.get_model_version_by_alias("tiny-sst2", "champion")
    assert champion.version == version.version and "Unit of privacy: one training example" in champion.description

    began = time.monotonic()
    again = study(config_path=str(path))
    assert trained.count == 4, "a rerun of a finished study must train nothing"
    assert again == rows
    assert time.monotonic() - began < 60

    # A cache hit means the outputs exist, verified: a damaged model and a deleted stage folder are recomputed.
    stages = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "runs" / "tiny" / "stages").iterdir()}
    weights = stages["distill"] / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    repaired = study(config_path=str(path))
    assert trained.count == 5 and repaired[:3] == rows[:3]  # distill alone trained again
    newest = max(int(v.version) for v in client.search_model_versions("name='tiny-sst2'"))
    assert int(client.get_model_version_by_alias("tiny-sst2", "champion").version) == newest > 1  # the new release
    evaluated = json.loads((stages["distill"] / "evaluation" / "done.json").read_text())
    assert json.dumps(evaluated).count(sha256_of(stages["distill"] / "model")) == 1  # the retrained model's, not stale
    shutil.rmtree(stages["prune_2"])
    study(config_path=str(path))
    assert trained.count == 7  # prune_2, and distill after it (its input changed)

    # Another tracking store: nothing trains, and the new store gets the study's runs, table and registered model.
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    study(config_path=str(path), overrides=[f"tracking.uri={other}"])
    assert trained.count == 7
    moved = MlflowClient(other)
    moved_runs = moved.search_runs([moved.get_experiment_by_name("e2e").experiment_id])
    assert {"teacher", "prune_1", "prune_2", "distill"} <= {r.info.run_name for r in moved_runs}
    assert {r.info.status for r in moved_runs} == {"FINISHED"}
    assert moved.search_model_versions("name='tiny-sst2'") and moved.get_model_version_by_alias("tiny-sst2", "champion")
    moved_teacher = next(r for r in moved_runs if r.info.run_name == "teacher")
    assert moved_teacher.inputs.dataset_inputs[0].dataset.digest == data_input.dataset.digest  # replayed with it
    assert not (Path.cwd() / "mlruns").exists()  # a local store keeps its artifacts beside its database
    assert list((tmp_path / "other" / "mlartifacts").rglob("results.md"))

    changed = study(config_path=str(path), overrides=["prune.schedule.target_sparsity=0.6"])
    assert trained.count == 7 + 3  # prune_1, prune_2 and distill retrain; the teacher does not
    assert changed[0] == rows[0] and changed[2]["sparsity"] == pytest.approx(0.6, abs=0.01)

    # One budget per dataset: another study on the same source file is refused before it trains anything, naming
    # the study that spent it; its dataset ledger lists every release of both runs above.
    from privacy.dataset_ledger import DatasetBudgetError, DatasetLedger

    second = _config(tmp_path, tiny_model, mlflow_server, "second")
    with pytest.raises(DatasetBudgetError, match=r"(?s)tiny.*dataset_budget"):
        study(config_path=str(second))
    assert trained.count == 10
    with DatasetLedger(tmp_path / "ledger.db") as lifetime:
        history = lifetime.history()
    assert [r.stage for r in history] == ["teacher", "prune_1", "prune_2", "distill", "distill", "prune_2", "distill",
                                          "prune_1", "prune_2", "distill"]  # every retrained stage spent again
    assert {r.study for r in history} == {"tiny"} and {r.noise for r in history} == {"secret"}


def test_failed_middle_stage_resumes_without_recomputing_earlier(tmp_path, mlflow_server, prefect_backend,
                                                                 tiny_model, monkeypatch):
    from flows.study import study
    from privacy.ledger import Ledger

    # activation scores from the private data: each round first releases input norms with DP (`{round}_stats`); the
    # seeded test mode is on, and says everywhere that these models have no guarantee
    path = _config(tmp_path, tiny_model, mlflow_server, "resume", schedule={"scorer": "wanda", "scope": "row"},
                   privacy={"reproducible_noise": True})
    released = Calls(monkeypatch, "compression.pruning.statistics.dp_input_norms")
    Calls(monkeypatch, "compression.pruning.recipe.prune_masks", fail_first=True)  # prune_1 fails after its release
    with pytest.raises(RuntimeError, match="injected failure"):
        study(config_path=str(path))
    assert released.count == 1
    teachers = Calls(monkeypatch, "tasks.teacher.load_classifier")
    trained = Calls(monkeypatch, "tasks.stage.dp_train")
    rows = study(config_path=str(path))
    assert teachers.count == 0, "the finished teacher stage must come from the cache"
    assert trained.count == 3  # prune_1, prune_2, distill
    assert released.count == 2, "the rerun reuses prune_1's saved release (a redraw would be unaccounted)"
    assert [r["stage"] for r in rows] == ["teacher", "prune_1", "prune_2", "distill"]
    assert rows[-1]["epsilon"] == pytest.approx(8.0, rel=0.02) and rows[-1]["epsilon"] <= 8.0 * (1 + 1e-6)
    (final,) = (tmp_path / "runs" / "resume" / "stages").glob("distill-*")
    entries = Ledger.load(final / "ledger.json").entries
    assert [e.stage for e in entries] == ["teacher", "prune_1_stats", "prune_1", "prune_2_stats", "prune_2", "distill"]
    assert [e.mechanism for e in entries if e.stage.endswith("_stats")] == ["gaussian_sum"] * 2
    assert all((e.sample_rate, e.num_steps) == (1.0, 1) for e in entries if e.stage.endswith("_stats"))
    assert {e.noise for e in entries} == {"seeded"}
    footer = (tmp_path / "runs" / "resume" / "results" / "footer.txt").read_text()
    assert "NO differential-privacy guarantee" in footer
    version = MlflowClient(mlflow_server).search_model_versions("name='resume-sst2'")[0]
    assert "epsilon" not in version.tags and version.tags["noise"] == "seeded"
    assert version.tags["dp_guarantee"].startswith("none")
    assert version.description.startswith("NO differential-privacy guarantee")


def test_cli_rejects_a_bad_key_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {task: sst2}\nteacher: {train: {epocs: 3}}\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(bad)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "teacher.train.epocs" in out.stderr and "epochs" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_paper_study_lines_table_report_and_exports(tmp_path, mlflow_server, prefect_backend, tiny_model):
    """flows/configs/paper.yaml at tiny size: a non-private baseline, unstructured and structured DPIMP, DPKD with
    every initialisation; each line composes to the budget on its own; table, plots, report and HF exports."""
    import json

    from transformers import AutoModelForSequenceClassification

    from flows.study import study
    from privacy.ledger import Ledger

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "flows/configs/paper.yaml").read_text())
    small = {"epochs": 1, "batch_size": 16, "physical_batch_size": 8}
    cfg.update(name="paper", output_dir=str(tmp_path / "runs"), model={"name_or_path": tiny_model})
    cfg["data"].update(dir=str(GLUE), max_train_examples=48, max_eval_examples=32)
    cfg["teacher"]["train"] = small
    for section in ("prune", "structured", "distill"):
        cfg[section]["train"] = small
    for source in cfg["prune"]["calibration"]:
        source.update(dir=str(GLUE), max_train_examples=16, max_eval_examples=8)
    cfg["nonprivate"]["train"] = {**small, "max_grad_norm": 1e6}
    cfg["tracking"] = {"uri": mlflow_server, "experiment": "e2e-paper"}
    cfg["privacy"]["dataset_ledger"] = str(tmp_path / "ledger.db")
    cfg["privacy"]["dataset_budget"] = 30.0  # the union of the lines at this tiny size (22.1), stated honestly
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(cfg))

    rows = study(config_path=str(path))
    by_stage = {r["stage"]: r for r in rows}
    assert list(by_stage) == ["nonprivate_teacher", "teacher", "prune_1", "prune_2", "prune_3", "structured_1",
                              "distill_every_other", "distill_pretrained", "distill_random"]
    assert by_stage["nonprivate_teacher"]["epsilon"] == float("inf")
    for last in ("prune_3", "structured_1", "distill_every_other", "distill_pretrained", "distill_random"):
        assert by_stage[last]["epsilon"] == pytest.approx(8.0, rel=0.02)  # each line spends the whole budget
        assert by_stage[last]["epsilon"] <= 8.0 * (1 + 1e-6)
    assert by_stage["prune_3"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert by_stage["structured_1"]["parameters"] < by_stage["teacher"]["parameters"]
    assert by_stage["structured_1"]["line"] == "structured"

    study_dir = tmp_path / "runs" / "paper"
    stage_dirs = {p.name.rsplit("-", 1)[0]: p for p in (study_dir / "stages").iterdir()}
    assert Ledger.load(stage_dirs["prune_1"] / "ledger.json").stage_names() == ["teacher", "prune_1"]  # public text
    assert json.loads((stage_dirs["prune_1"] / "reconstruction.json").read_text())  # per tensor output error ratio
    distilled = json.loads((stage_dirs["prune_1"] / "public_distill.json").read_text())
    assert distilled["num_texts"] == 16 + 2 * 16 + 2 * 16 and distilled["num_steps"] >= 1  # pairs split in two
    ledger = Ledger.load(stage_dirs["structured_1"] / "ledger.json")
    assert ledger.stage_names() == ["teacher", "structured_1"]  # its own line only
    structure = json.loads((stage_dirs["structured_1"] / "structure.json").read_text())
    assert structure["drop_layers"] == "top" and structure["layers_kept"] == [0, 1]  # of 4
    assert set(structure["heads"]) == {structure["targets"]["heads_per_layer"]}  # full width: no head removed
    for name, folder in stage_dirs.items():  # every private stage wrote its own ledger entry, last
        if name not in ("prepare_data", "nonprivate_teacher") and (folder / "model").exists():
            assert Ledger.load(folder / "ledger.json").stage_names()[-1] == name
    sparsity = json.loads((stage_dirs["prune_2"] / "sparsity.json").read_text())
    assert sparsity["overall"] == pytest.approx(0.7, abs=0.01) and len(sparsity) > 2  # per tensor, and overall
    with pytest.raises(ValueError, match="not a privacy ledger"):
        Ledger.load(stage_dirs["nonprivate_teacher"] / "ledger.json")
    footer = (study_dir / "results" / "footer.txt").read_text()
    union = float(footer.split("together: epsilon = ")[1].split()[0])
    assert union > 8.0  # releasing every line's models costs their composition
    exported = AutoModelForSequenceClassification.from_pretrained(stage_dirs["structured_1"] / "evaluation" / "hf",
                                                                  trust_remote_code=True)
    assert sum(p.numel() for p in exported.parameters()) == by_stage["structured_1"]["parameters"]
    assert json.loads((stage_dirs["prune_3"] / "evaluation" / "eval.json").read_text())["sparse_size_bytes"] > 0

    client = MlflowClient(mlflow_server)
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("e2e-paper").experiment_id])
                  if r.data.tags.get("dpcompress.kind") == "study")
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.csv", "results/results.md", "results/sparsity_vs_metric.png",
            "results/epsilon_vs_metric.png"} <= names
    compressed = [r for r in rows if r["stage"] not in ("teacher", "nonprivate_teacher")]
    best = max(compressed, key=lambda r: (r["accuracy"], rows.index(r)))
    version = client.search_model_versions("name='paper-sst2'")[0]
    assert version.tags["stage"] == best["stage"]  # several lines: the best compressed private model
    # its release depends on every line it was compared with: tagged with their union, not its own line's epsilon
    from privacy.ledger import union_epsilon

    union_compared = union_epsilon([Ledger.load(stage_dirs[r["stage"]] / "ledger.json") for r in compressed],
                                   delta=best["delta"])
    assert float(version.tags["epsilon"]) == pytest.approx(union_compared, rel=1e-3) and union_compared > 8.0
    assert version.tags["epsilon_scope"] == f"union of the {len(compressed)} models compared to select it"
    out = subprocess.run([sys.executable, "-m", "flows.cli", "report", parent.info.run_id, "--tracking-uri",
                          mlflow_server], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "| structured_1 | structured |" in out.stdout and "together: epsilon" in out.stdout
