"""What a user finds in MLflow: experiments open in the model-training view, every stage run names its dataset (task,
source, keyed digest, row counts; never a row), and the released model is registered as a model that serves (pyfunc
from code, nothing pickled), with the alias `champion`, a description of its guarantee and named labels."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from compression.data import DataConfig
from tasks import tracking
from tasks.refs import RunContext

KIND = "mlflow.experimentKind"
SST2 = "sentence\tlabel\n" + "".join(f"private sentence number {i} about the film \t{i % 2}\n" for i in range(40))


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny study's pieces, for real: sst2 prepared from a GLUE folder, a DP teacher of a tiny BERT, its evaluation
    and HF export, and its registration (as `register_final` does it), in a sqlite store. What MLflow logged while
    registering is kept."""
    from transformers import AutoTokenizer

    from compression.methods.full import FullConfig
    from compression.models import ModelConfig, build_tiny, resolve_model_path, save_classifier
    from compression.train import TrainConfig
    from privacy.config import StageBudget
    from tasks.data import prepare_data
    from tasks.evaluation import evaluate_model
    from tasks.registry import register_final
    from tasks.teacher import train_teacher

    root = tmp_path_factory.mktemp("released")
    (root / "glue" / "SST-2").mkdir(parents=True)
    (root / "glue" / "SST-2" / "train.tsv").write_text(SST2)
    (root / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\na dev sentence \t1\nanother one \t0\n")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2"))
    save_classifier(build_tiny(vocab_size=tokenizer.vocab_size, seed=0), tokenizer, root / "base")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    parent = tracking.study_run(uri=uri, experiment="study", study_key="k", name="tiny", config={})
    context = RunContext(tracking_uri=uri, parent_run_id=parent)
    data = prepare_data.fn(data=DataConfig(task="sst2", dir=str(root / "glue"), max_train_examples=32),
                           tokenizer_name=str(root / "base"), output_dir=str(root / "out"), context=context)
    train = TrainConfig(epochs=1, batch_size=8, physical_batch_size=8)
    budget = StageBudget(event=train.event(data.num_train, noise_multiplier=1.0), mechanism="dp_sgd",
                         target_epsilon=100.0, delta=1e-3)
    teacher = train_teacher.fn(stage="teacher", budget=budget, data=data, model=ModelConfig(name_or_path=str(
        root / "base")), method=FullConfig(layers=1), train=train, output_dir=str(root / "out"), context=context)
    evaluation = evaluate_model.fn(stage="teacher", model=teacher, data=data, tracking_uri=uri)
    records = Records()
    logging.getLogger("mlflow").addHandler(records)
    try:
        version = register_final.fn(models=[teacher], evaluations=[evaluation], scope="study", register_stage=None,
                                    name="tiny-sst2", task_name="sst2", tracking_uri=uri)
    finally:
        logging.getLogger("mlflow").removeHandler(records)
    return {"uri": uri, "root": root, "parent": parent, "data": data, "teacher": teacher, "evaluation": evaluation,
            "version": version, "logged": records.messages}


def _stage_run(client: MlflowClient, parent: str, name: str):
    (run,) = [r for r in client.search_runs([client.get_run(parent).info.experiment_id])
              if r.info.run_name == name and r.data.tags.get("mlflow.parentRunId") == parent]
    return run


def test_experiments_open_in_the_model_training_view_new_or_reused(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.study_run(uri=uri, experiment="new", study_key="k", name="s", config={})
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("new").tags[KIND] == "custom_model_development"
    old = client.create_experiment("old")  # as an earlier dpcompress (or anyone) made it: MLflow 3 shows traces
    assert KIND not in client.get_experiment(old).tags
    assert tracking.experiment_id(uri, "old") == old
    assert client.get_experiment(old).tags[KIND] == "custom_model_development"


def test_every_stage_run_names_its_dataset_by_keyed_digest_and_counts_never_rows(released):
    client, data = MlflowClient(released["uri"]), released["data"]
    for stage in ("prepare_data", "teacher"):
        (entry,) = _stage_run(client, released["parent"], stage).inputs.dataset_inputs
        dataset = entry.dataset
        assert dataset.name == "sst2" and dataset.digest == data.fingerprint[:32]
        assert json.loads(dataset.source) == {"uri": str((released["root"] / "glue" / "SST-2").resolve())}
        assert json.loads(dataset.profile) == {"num_rows": 32, "num_train": 32, "num_dev": 2}
        assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]] == ["sentence", "label"]
        assert {(t.key, t.value) for t in entry.tags} == {("mlflow.data.context", "training")}
        logged = json.dumps([dataset.name, dataset.digest, dataset.source, dataset.schema, dataset.profile])
        assert "private sentence" not in logged and "film" not in logged and "dev sentence" not in logged
        plain = hashlib.sha256((released["root"] / "glue" / "SST-2" / "train.tsv").read_bytes()).hexdigest()
        assert dataset.digest not in plain  # keyed: not a plain hash of the data


def test_a_dataset_entry_counts_the_rows_a_stage_sampled_beside_the_datasets(released):
    entry = tracking.dataset_entry(released["data"], context="training", num_rows=5)
    assert json.loads(entry["profile"]) == {"num_rows": 5, "num_train": 32, "num_dev": 2}


def test_a_stage_replayed_into_another_store_names_its_dataset_there(released, tmp_path):
    out = Path(released["teacher"].path).parent
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    parent = tracking.study_run(uri=uri, experiment="study", study_key="k", name="tiny", config={})
    run_id = tracking.replay(uri=uri, parent_run_id=parent, stage="teacher", stage_key=out.name,
                             logged=json.loads((out / "tracking.json").read_text()))
    (entry,) = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert entry.dataset.digest == released["data"].fingerprint[:32]


def test_the_release_is_registered_as_the_champion_with_its_guarantee_and_label_names(released):
    client = MlflowClient(released["uri"])
    champion = client.get_model_version_by_alias("tiny-sst2", "champion")
    assert str(champion.version) == released["version"] == "1"
    epsilon = float(champion.tags["epsilon"])
    for description in (champion.description, client.get_registered_model("tiny-sst2").description):
        assert f"epsilon = {epsilon:.4f}" in description and f"delta = {released['teacher'].delta:.3g}" in description
        assert "Unit of privacy: one training example" in description and "PRV accountant" in description
        assert "one of negative, positive" in description
    folder = Path(mlflow.artifacts.download_artifacts("models:/tiny-sst2@champion", tracking_uri=released["uri"],
                                                      dst_path=str(released["root"] / "download")))
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert not list(folder.rglob("*.pkl"))  # models from code: nothing pickled
    config = json.loads((folder / flavor["artifacts"]["model"]["path"] / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert "+" not in (folder / "requirements.txt").read_text()  # pins that resolve on PyPI (no local labels)
    assert not [m for m in released["logged"] if "pickle" in m.lower()]
    assert not [m for m in released["logged"] if "Failed to validate" in m]  # MLflow ran it on the input example


def test_the_champion_loads_without_a_question_and_names_its_labels(released, capsys):
    import pandas as pd

    local = mlflow.artifacts.download_artifacts("models:/tiny-sst2@champion", tracking_uri=released["uri"],
                                                dst_path=str(released["root"] / "load"))
    answer = mlflow.pyfunc.load_model(local).predict(pd.DataFrame({"text": ["a moving film", "a dull mess", "ok"]}))
    assert list(answer.columns) == ["label", "score"] and len(answer) == 3
    assert set(answer["label"]) <= {"negative", "positive"}
    shown = capsys.readouterr()
    assert "custom code" not in shown.out + shown.err  # transformers asks (on stdin) unless the code is trusted


def test_a_rerun_keeps_the_version_and_moves_the_champion_back_to_it(released):
    from tasks.registry import register_final

    client = MlflowClient(released["uri"])
    client.delete_registered_model_alias("tiny-sst2", "champion")  # say another release took it since
    version = register_final.fn(models=[released["teacher"]], evaluations=[released["evaluation"]], scope="study",
                                register_stage=None, name="tiny-sst2", task_name="sst2",
                                tracking_uri=released["uri"])
    assert version == "1" and len(client.search_model_versions("name='tiny-sst2'")) == 1
    assert str(client.get_model_version_by_alias("tiny-sst2", "champion").version) == "1"


def test_a_version_an_older_dpcompress_registered_in_another_format_is_not_reused(released):
    """Same model and guarantee, but registered before the pyfunc-from-code format (no model_format tag): a rerun
    registers the servable version and makes it the champion."""
    from tasks.registry import register_final

    client = MlflowClient(released["uri"])
    current = client.get_model_version("tiny-sst2", "1")
    client.create_registered_model("tiny-old")
    old = client.create_model_version("tiny-old", current.source, run_id=current.run_id,
                                      tags={k: v for k, v in current.tags.items() if k != "model_format"})
    version = register_final.fn(models=[released["teacher"]], evaluations=[released["evaluation"]], scope="study",
                                register_stage=None, name="tiny-old", task_name="sst2",
                                tracking_uri=released["uri"])
    assert version != str(old.version)
    assert client.get_model_version("tiny-old", version).tags["model_format"] == "pyfunc-from-code:hf-folder"
    assert str(client.get_model_version_by_alias("tiny-old", "champion").version) == version


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_champion_serves_labels_over_http(released):
    """`mlflow models serve -m models:/NAME@champion` on loopback: two sentences in, two named labels out."""
    port, root = _free_port(), released["root"]
    bin_dir = str(Path(sys.executable).parent)  # mlflow's CLI starts uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": released["uri"], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = open(root / "serve.log", "w")  # noqa: SIM115  (the server writes it)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny-sst2@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (root / "serve.log").read_text()[-3000:]
            time.sleep(1)
        body = json.dumps({"dataframe_records": [{"text": "a wonderful, moving film"},
                                                 {"text": "a dull and tedious mess"}]}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a stuck server does not outlive the test
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
    predictions = answer["predictions"]
    assert len(predictions) == 2
    assert {p["label"] for p in predictions} <= {"negative", "positive"}
    assert all(0.5 <= p["score"] <= 1.0 for p in predictions)


_SQLITE_COLLISION = ("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
                     "datasets.digest")


class _CollidingClient:
    """`log_inputs` raises `message` (MLflow's dataset-row collision, or another error) `failures` times, then
    succeeds."""

    def __init__(self, failures: int, message: str):
        self.failures, self.message, self.calls = failures, message, 0

    def log_inputs(self, run_id, datasets):
        self.calls += 1
        if self.calls <= self.failures:
            raise mlflow.exceptions.MlflowException(self.message)


_ENTRY = {"name": "sst2", "digest": "0" * 32, "source_type": "local", "source": "glue/SST-2", "context": "training"}


@pytest.mark.parametrize("message", [_SQLITE_COLLISION, 'duplicate key value violates unique constraint "dataset_pk"'])
def test_two_runs_logging_one_dataset_at_once_retry_past_the_collision(monkeypatch, message):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    client = _CollidingClient(tracking._DATASET_TRIES - 1, message)
    run = tracking.StageRun(client, "run")
    run.datasets([dict(_ENTRY)])
    assert client.calls == tracking._DATASET_TRIES and run.logged["datasets"] == [_ENTRY]


@pytest.mark.parametrize("failures, message", [(tracking._DATASET_TRIES, _SQLITE_COLLISION),
                                               (1, "RESOURCE_DOES_NOT_EXIST: run")])
def test_a_lasting_collision_or_another_error_is_raised_not_swallowed(monkeypatch, failures, message):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    client = _CollidingClient(failures, message)
    run = tracking.StageRun(client, "run")
    with pytest.raises(mlflow.exceptions.MlflowException):
        run.datasets([dict(_ENTRY)])
    assert client.calls == failures and run.logged["datasets"] == []
