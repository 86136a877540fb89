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


def _public_worker(out: str, calls: str, ready: str) -> str:
    import os
    import time

    import torch

    from tasks.prune import _public_tensors

    def compute():
        with open(calls, "a") as f:
            f.write("x")
        time.sleep(1.0)  # while the other process asks for the same tensors
        return {"t": torch.ones(2)}

    Path(ready, str(os.getpid())).touch()
    while len(list(Path(ready).iterdir())) < 2:  # both processes imported: ask at the same moment
        time.sleep(0.01)
    return _public_tensors(Path(out), "public_targets", compute).sha256


def test_concurrent_lines_compute_shared_public_tensors_once(tmp_path):
    """Two processes (as two Dask workers running per-target pruning lines) asking for the same public tensors: one
    computes them, the other waits and reuses them."""
    out, calls, ready = tmp_path / "stages" / "public_targets-abc", tmp_path / "calls.txt", tmp_path / "ready"
    ready.mkdir()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        digests = pool.starmap(_public_worker, [(str(out), str(calls), str(ready))] * 2)
    assert calls.read_text() == "x" and len(set(digests)) == 1, (calls.read_text(), digests)


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


def test_a_rerun_of_the_same_study_logs_the_config_it_ran_with(stores):
    """Sections outside the study key (split, execution, tracking) can change between runs of one study: the
    parent run's config.json is the latest run's."""
    import json

    import mlflow

    uri = stores[0]
    parent = tracking.study_run(uri=uri, experiment="e", study_key="same", name="study", config={"split": {"k": 2}})
    assert tracking.study_run(uri=uri, experiment="e", study_key="same", name="study",
                              config={"split": {"k": 4}}) == parent
    with mlflow.utils.file_utils.TempDir() as tmp:
        path = tracking.client(uri).download_artifacts(parent, "config.json", tmp.path())
        assert json.loads(Path(path).read_text()) == {"split": {"k": 4}}


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


def test_a_stage_killed_while_logging_its_release_is_logged_not_trained_or_charged_again(tmp_path, monkeypatch,
                                                                                          stores):
    """Killed after the release was saved and charged to the dataset ledger but before done.json (while logging to
    a slow tracking server, say): the rerun finds released.json, logs, and neither trains nor charges again."""
    import tasks.stage
    from compression.data import save_encoded
    from compression.methods.full import FullConfig
    from compression.models import ModelConfig, build_tiny, save_classifier
    from privacy.config import StageBudget
    from privacy.dataset_ledger import DatasetLedger
    from tasks.refs import BudgetAccount, RunContext
    from tasks.teacher import train_teacher

    save_classifier(build_tiny(seed=0), None, tmp_path / "base")
    encoded = {"input_ids": [[2, 5 + i % 7, 3] for i in range(24)], "token_type_ids": [[0, 0, 0]] * 24,
               "labels": __import__("torch").tensor([i % 2 for i in range(24)])}
    save_encoded(tmp_path / "data" / "train.pt", encoded)
    data = DataRef(path=str(tmp_path / "data"), fingerprint="f", source_fingerprint="s", task="sst2",
                   metric="accuracy", num_labels=2, num_train=24, num_dev=0)
    train = TrainConfig(epochs=1, batch_size=8, physical_batch_size=8)
    budget = StageBudget(event=train.event(24, noise_multiplier=1.0), mechanism="dp_sgd", target_epsilon=100.0,
                         delta=1e-3)
    uri, url = stores[0], f"sqlite:///{tmp_path / 'ledger.db'}"

    def account(run_id: str) -> BudgetAccount:
        return BudgetAccount(url=url, dataset="d", study="study", study_key="k", run_id=run_id, epsilon_budget=100.0,
                             delta=1e-3, accountant="rdp")
    parent = tracking.study_run(uri=uri, experiment="e", study_key="logging", name="study", config={})
    kwargs = dict(stage="teacher", budget=budget, data=data, model=ModelConfig(name_or_path=str(tmp_path / "base")),
                  method=FullConfig(layers=1), train=train, output_dir=str(tmp_path / "out"))
    monkeypatch.setattr(tasks.stage, "_log_release", lambda *a, **kw: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        train_teacher.fn(**kwargs, context=RunContext(tracking_uri=uri, parent_run_id=parent, account=account("r1")))
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(tasks.stage, "dp_train", lambda *a, **kw: calls.append(1))
    ref = train_teacher.fn(**kwargs, context=RunContext(tracking_uri=uri, parent_run_id=parent, account=account("r2")))
    assert calls == [] and Path(ref.path).exists() and ref.run_id
    assert tracking.client(uri).get_run(ref.run_id).data.tags["epsilon"]  # logged now
    with DatasetLedger(url) as ledger:
        assert [(r.stage, r.run_id) for r in ledger.history("d")] == [("teacher", "r1")]  # charged once


def test_a_damaged_dp_release_is_refused_not_reused_or_redrawn(tmp_path, stores):
    from privacy.config import StageBudget
    from privacy.ledger import Ledger
    from tasks.refs import RunContext, StatsRef
    from tasks.stage import run_release

    (tmp_path / "up").mkdir()
    Ledger().save(tmp_path / "up" / "ledger.json")
    upstream = StatsRef(stage="teacher", path=str(tmp_path / "up" / "ledger.json"), sha256="x",
                        ledger_path=str(tmp_path / "up" / "ledger.json"))
    data = DataRef(path=str(tmp_path), fingerprint="f", source_fingerprint="s", task="sst2", metric="accuracy",
                   num_labels=2, num_train=100, num_dev=0)
    budget = StageBudget(event=__import__("privacy.accounting", fromlist=["DPEvent"]).DPEvent(
        noise_multiplier=5.0, sample_rate=1.0, num_steps=1), mechanism="gaussian_sum", target_epsilon=100.0,
        delta=1e-3)
    uri = stores[0]
    context = RunContext(tracking_uri=uri, parent_run_id=tracking.study_run(
        uri=uri, experiment="e", study_key="release", name="study", config={}))
    draws = []

    def release():
        draws.append(1)
        return {"sum": __import__("torch").ones(3) * len(draws)}
    kwargs = dict(name="stats", budget=budget, release=release, data=data, out=tmp_path / "stats",
                  ledger_from=upstream, context=context)
    first = run_release(**kwargs)
    assert run_release(**kwargs) == first and draws == [1]  # the same release, drawn once
    assert first.ledger_sha256 == sha256_of(first.ledger_path)
    (tmp_path / "stats" / "done.json").unlink()
    Path(first.path).write_bytes(b"damaged")
    with pytest.raises(ValueError, match="damaged or incomplete.*spends its epsilon again"):
        run_release(**kwargs)
    assert draws == [1]


def test_no_task_leaves_a_result_for_prefect_to_read_back():
    """Prefect reads a stored result with the serializer its file names (a pickle, if someone replaced it): no task
    or flow of dpcompress persists a result or uses Prefect's cache."""
    import importlib
    import pkgutil

    from prefect import Flow, Task
    from prefect.cache_policies import NO_CACHE

    import tasks

    found = []
    for module in pkgutil.iter_modules(tasks.__path__):
        for value in vars(importlib.import_module(f"tasks.{module.name}")).values():
            if isinstance(value, Task):
                found.append(value.name)
                assert value.persist_result is False and value.cache_policy is NO_CACHE, value.name
    assert {"prepare_data", "plan_privacy", "register_model", "train_teacher", "evaluate"} <= set(found)
    from flows.study import study

    assert isinstance(study, Flow) and study.persist_result is False


def test_the_encoded_private_data_is_published_only_under_keyed_digests(tmp_path):
    from privacy.fingerprint import owner_key

    (tmp_path / "train.pt").write_bytes(b"encoded private rows")
    keyed = sha256_of(tmp_path / "train.pt", key=owner_key())
    assert keyed != sha256_of(tmp_path / "train.pt")  # a guess re-encoded and hashed does not match
    ref = DataRef(path=str(tmp_path), fingerprint="f", source_fingerprint="s", task="sst2", metric="accuracy",
                  num_labels=2, num_train=1, num_dev=0, files={str(tmp_path / "train.pt"): keyed})
    mark_finished(tmp_path, ref)
    assert finished(tmp_path) == ref
    (tmp_path / "train.pt").write_bytes(b"edited private rows")
    assert finished(tmp_path) is None


def test_the_study_key_ignores_where_a_study_is_tracked_and_how_often_it_checkpoints(tmp_path):
    from flows.config import load_config, study_key

    path = tmp_path / "s.yaml"
    path.write_text("data: {task: sst2}\n")
    base = study_key(load_config(path))
    assert base == study_key(load_config(path, ["tracking.uri=sqlite:///elsewhere.db",
                                                "teacher.train.checkpoint_every=7"]))
    assert base != study_key(load_config(path, ["teacher.train.epochs=7"]))


def test_the_registry_is_asked_whether_it_holds_the_model_already(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    assert tracking.registered_version(uri=uri, name="m", tags={"model_sha256": "a"}) is None  # no such model
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path), tags={"model_sha256": "a", "epsilon": "4.0000"})
    assert tracking.registered_version(uri=uri, name="m", tags={"model_sha256": "a", "epsilon": "4.0000"}) == "1"
    assert tracking.registered_version(uri=uri, name="m", tags={"model_sha256": "a", "epsilon": "5.0000"}) is None
    fresh = f"sqlite:///{tmp_path / 'reset.db'}"  # a store reset: it must be registered again
    assert tracking.registered_version(uri=fresh, name="m", tags={"model_sha256": "a"}) is None
