"""tasks.caching, tasks.serializer, tasks.lock, tasks.tracking's bookkeeping of runs: reuse only verified outputs,
results as JSON of the reference types (never a pickle), one run of a study at a time, no RUNNING run left behind."""
from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from compression.train import TrainConfig
from tasks import tracking
from tasks.caching import finished, jsonable, mark_finished
from tasks.lock import StudyLockedError, study_lock
from tasks.lock import holder as holder_of
from tasks.refs import DataRef, ModelRef, sha256_of
from tasks.serializer import RefSerializer


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    """Two local tracking stores (creating one takes seconds: shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("stores")
    return f"sqlite:///{root / 'a' / 'mlflow.db'}", f"sqlite:///{root / 'b' / 'mlflow.db'}"


def _model_ref(folder: Path) -> ModelRef:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(b"w" * 100)
    (folder / "ledger.json").write_text("{}")
    return ModelRef(stage="s", path=str(folder / "model"), sha256=sha256_of(folder / "model"),
                    ledger_path=str(folder / "ledger.json"), ledger_sha256=sha256_of(folder / "ledger.json"),
                    epsilon=float("inf"), delta=0.0, run_id="run-of-another-store")


def test_results_are_json_of_reference_types_and_nothing_else_is_read_back():
    serializer = RefSerializer()
    ref = DataRef(path="p", fingerprint="f", source_fingerprint="s", task="sst2", metric="accuracy", num_labels=2,
                  num_train=3, num_dev=2, files={"p/train.pt": "abc"})
    blob = serializer.dumps({"data": ref, "eps": [float("inf"), 1.5]})
    assert json.loads(blob)["data"]["__ref__"] == "DataRef"  # plain JSON: no pickle opcode anywhere
    assert serializer.loads(blob) == {"data": ref, "eps": [float("inf"), 1.5]}
    forged = json.dumps({"__ref__": "Popen", "args": ["sh", "-c", "touch /tmp/owned"]}).encode()
    with pytest.raises(ValueError, match="unknown type 'Popen'"):
        serializer.loads(forged)
    with pytest.raises(TypeError, match="may not hold"):
        serializer.dumps(TrainConfig())


def test_a_finished_stage_is_reused_only_while_its_outputs_match_their_digests(tmp_path):
    ref = _model_ref(tmp_path / "stage")
    assert finished(tmp_path / "stage") is None  # not marked finished yet (interrupted)
    mark_finished(tmp_path / "stage", ref)
    reused = finished(tmp_path / "stage")
    assert reused == ModelRef(**{**vars(ref), "run_id": ""})  # run ids belong to a tracking store, not the folder
    (tmp_path / "stage" / "model" / "weights.bin").write_bytes(b"w" * 50)  # damaged
    assert finished(tmp_path / "stage") is None
    (tmp_path / "stage" / "model" / "weights.bin").unlink()  # deleted
    assert finished(tmp_path / "stage") is None


def test_settings_that_cannot_change_a_result_are_not_in_keys():
    assert jsonable(TrainConfig(checkpoint_every=5)) == jsonable(TrainConfig(checkpoint_every=500))
    assert jsonable(TrainConfig(epochs=2)) != jsonable(TrainConfig(epochs=3))
    ref = ModelRef(stage="s", path="p", sha256="x", ledger_path="l", ledger_sha256="y", epsilon=1.0, delta=1e-5)
    assert jsonable(ref) == jsonable(ModelRef(**{**vars(ref), "run_id": "another store's run"}))


def _hold(path: str, ready, done) -> None:
    with study_lock(path):
        ready.set()
        done.wait(30)


def test_one_run_of_a_study_at_a_time(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(tmp_path / "study"), ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        locked = rf"in use by pid {holder.pid} .*one run of a study at a time"
        with pytest.raises(StudyLockedError, match=locked), study_lock(tmp_path / "study"):
            pass
        assert holder_of(tmp_path / "study") == f"pid {holder.pid} on {socket.gethostname()}"  # pre-flight's probe
    finally:
        done.set()
        holder.join(30)
    assert holder_of(tmp_path / "study") is None and holder_of(tmp_path / "elsewhere") is None
    with study_lock(tmp_path / "study"):  # released when its holder ended
        pass


def test_a_rerun_marks_the_runs_a_killed_run_left_running_as_killed(stores):
    uri = stores[0]
    parent = tracking.study_run(uri=uri, experiment="e", study_key="killed", name="study", config={})
    client = tracking.client(uri)
    orphan = client.create_run(client.get_run(parent).info.experiment_id, run_name="teacher",
                               tags={"mlflow.parentRunId": parent})  # a stage run whose process was killed
    assert client.get_run(orphan.info.run_id).info.status == "RUNNING"
    assert tracking.study_run(uri=uri, experiment="e", study_key="killed", name="study", config={}) == parent
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    location = client.get_experiment_by_name("e").artifact_location
    assert location == (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()  # not the cwd


def test_a_stage_reused_in_another_store_is_logged_there_again(tmp_path, stores):
    first, second = stores
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "ledger.json").write_text("{}")
    parent = tracking.study_run(uri=first, experiment="e", study_key="k", name="study", config={})
    with tracking.stage_run(uri=first, parent_run_id=parent, stage="teacher", stage_key="teacher-1") as run:
        run.params({"train": {"epochs": 3}})
        run.tags({"epsilon": "4.0"})
        run.metrics({"epsilon": 4.0})
        run.artifact(tmp_path / "stage" / "ledger.json")
    assert tracking.finished_stage_run(uri=first, parent_run_id=parent, stage_key="teacher-1") == run.run_id
    other = tracking.study_run(uri=second, experiment="e", study_key="k", name="study", config={})
    assert tracking.finished_stage_run(uri=second, parent_run_id=other, stage_key="teacher-1") is None
    again = tracking.replay(uri=second, parent_run_id=other, stage="teacher", stage_key="teacher-1",
                            logged=run.logged)
    copy = tracking.client(second).get_run(again)
    assert copy.data.params["train.epochs"] == "3" and copy.data.tags["epsilon"] == "4.0"
    assert copy.data.metrics["epsilon"] == 4.0 and copy.info.status == "FINISHED"
    assert [a.path for a in tracking.client(second).list_artifacts(again)] == ["ledger.json"]


class Killed(BaseException):
    """Stands for kill -9 at a chosen point (BaseException: nothing on the way catches it)."""


def test_a_stage_killed_after_finishing_is_not_trained_again(tmp_path, monkeypatch, stores):
    """Killed after its outputs and done.json were written but before the flow got its result: the rerun reuses
    the stage instead of training again (the checkpoint is deleted only after done.json)."""
    import tasks.stage
    from compression.data import save_encoded
    from compression.methods.full import FullConfig
    from compression.models import ModelConfig, build_tiny, save_classifier
    from privacy.config import StageBudget
    from tasks.refs import RunContext
    from tasks.teacher import train_teacher

    save_classifier(build_tiny(seed=0), None, tmp_path / "base")
    encoded = {"input_ids": [[2, 5 + i % 7, 3] for i in range(24)], "token_type_ids": [[0, 0, 0]] * 24,
               "labels": __import__("torch").tensor([i % 2 for i in range(24)])}
    save_encoded(tmp_path / "data" / "train.pt", encoded)
    data = DataRef(path=str(tmp_path / "data"), fingerprint="f", source_fingerprint="s", task="sst2",
                   metric="accuracy", num_labels=2, num_train=24, num_dev=0)
    train = TrainConfig(epochs=1, batch_size=8, physical_batch_size=8, checkpoint_every=1)
    budget = StageBudget(event=train.event(24, noise_multiplier=1.0), mechanism="dp_sgd", target_epsilon=100.0,
                         delta=1e-3)
    uri = stores[0]
    context = RunContext(tracking_uri=uri, parent_run_id=tracking.study_run(
        uri=uri, experiment="e", study_key="resumed", name="study", config={}))
    kwargs = dict(stage="teacher", budget=budget, data=data, model=ModelConfig(name_or_path=str(tmp_path / "base")),
                  method=FullConfig(layers=1), train=train, output_dir=str(tmp_path / "out"), context=context)

    def killed(*args, **kw):
        raise Killed
    monkeypatch.setattr(tasks.stage, "shutil", SimpleNamespace(rmtree=killed))  # the checkpoint's removal
    with pytest.raises(Killed):
        train_teacher.fn(**kwargs)
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(tasks.stage, "dp_train", lambda *a, **kw: calls.append(1))
    ref = train_teacher.fn(**kwargs)
    assert calls == [] and Path(ref.path).exists() and ref.run_id  # reused, logged in this store
