"""The only module that talks to MLflow: the study's parent run, one nested run per stage, the registry.

Only public or privatised values are logged: configs, ledgers, dev-set metrics, model weights of DP
models. Never training texts, per-example values or losses computed on private training data.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from compression.data import GLUE_TASKS
from tasks.refs import DataRef

log = logging.getLogger(__name__)
STUDY_TAG = "dpcompress.study_key"
# MLflow 3 opens an experiment without this tag in its GenAI (traces) view; this one is model training's.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CHAMPION = "champion"  # the alias of the registered model's current release
SERVING_CODE = Path(__file__).with_name("serving.py")
# what a registered version holds: a rerun reuses only a version of this format (an older dpcompress pickled it)
MODEL_FORMAT = {"model_format": "pyfunc-from-code:hf-folder"}


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def artifact_root(uri: str) -> str | None:
    """Where a local sqlite store keeps its artifacts: `mlartifacts/` beside the database (under the study folder
    by default), never the working directory's `mlruns/`. None for a server (it decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def experiment_id(uri: str, name: str) -> str:
    """The experiment `name` (created if new), marked as model training (also one an older version created)."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        return mlflow_client.create_experiment(name, artifact_location=artifact_root(uri), tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if found.tags.get(key) != value:
            mlflow_client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def study_run(*, uri: str, experiment: str, study_key: str, name: str, config: dict, kind: str = "study") -> str:
    """The parent run of a study (or of a sweep of studies, `kind`): reused when the same study (same config) is run
    or resumed again. Stage runs an earlier, killed run left RUNNING are marked KILLED (nothing of a killed stage is
    released). Its config.json is always this run's config (sections outside the study key, such as `split` or
    `execution`, may differ from the run that created it); its params stay those of the first run."""
    mlflow_client = client(uri)
    exp = experiment_id(uri, experiment)
    runs = mlflow_client.search_runs([exp], filter_string=f"tags.`{STUDY_TAG}` = '{study_key}'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
        orphans = mlflow_client.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'")
        for orphan in orphans:
            mlflow_client.set_terminated(orphan.info.run_id, "KILLED")
        mlflow_client.update_run(run_id, status="RUNNING")
        _log_dict(mlflow_client, run_id, config, "config.json")
        return run_id
    run = mlflow_client.create_run(exp, run_name=name, tags={STUDY_TAG: study_key, "dpcompress.kind": kind})
    _log_dict(mlflow_client, run.info.run_id, config, "config.json")
    for key, value in _flatten(config).items():
        mlflow_client.log_param(run.info.run_id, key, str(value)[:500])
    return run.info.run_id


def end_study(*, uri: str, run_id: str, failed: bool = False, table: list[dict] | None = None) -> None:
    mlflow_client = client(uri)
    if table is not None:
        _log_dict(mlflow_client, run_id, table, "summary.json")
    mlflow_client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


_DATASET_TRIES = 3  # attempts at logging a run's dataset inputs (see StageRun.datasets)
# how MLflow's sqlite and PostgreSQL stores report a second insert of one dataset row
_DATASET_COLLISIONS = ("UNIQUE constraint failed: datasets", 'unique constraint "dataset_pk"')


class StageRun:
    """A nested run for one stage; methods log through the client (safe from any thread). What it logs (params,
    final metrics, tags, artifacts) is kept in `logged`, so that a stage reused from its folder can be logged again
    into another tracking store (`replay`)."""

    def __init__(self, mlflow_client: MlflowClient, run_id: str):
        self.client, self.run_id = mlflow_client, run_id
        self.logged: dict = {"params": {}, "metrics": {}, "tags": {}, "artifacts": [], "datasets": []}

    def params(self, params: dict) -> None:
        for key, value in _flatten(params).items():
            self.client.log_param(self.run_id, key, str(value)[:500])
            self.logged["params"][key] = str(value)[:500]

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.client.log_metric(self.run_id, key, float(value), step=step or 0)
                if step is None:
                    self.logged["metrics"][key] = float(value)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        self.logged["artifacts"].append([str(path), artifact_path])

    def tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))
            self.logged["tags"][key] = str(value)

    def dataset(self, data: DataRef, *, context: str = "training", num_rows: int | None = None) -> None:
        """Record `data` as the run's dataset input: its task, where it was read, its keyed fingerprint and row
        counts (`num_rows`: the training rows the stage used, when a sample of them); never a row."""
        self.datasets([dataset_entry(data, context=context, num_rows=num_rows)])

    def datasets(self, entries: list[dict]) -> None:
        """Log dataset inputs given as `dataset_entry` dicts (what `logged` keeps)."""
        inputs = [DatasetInput(Dataset(**{k: v for k, v in entry.items() if k != "context"}),
                               tags=[InputTag("mlflow.data.context", entry["context"])]) for entry in entries]
        for attempt in range(_DATASET_TRIES):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                break
            except MlflowException as error:
                # MLflow creates a dataset row by look-up-then-insert: two runs logging the same dataset at once
                # (parallel workers on one store) can collide; the retry finds the row the other run created
                if not any(marker in str(error) for marker in _DATASET_COLLISIONS) or attempt == _DATASET_TRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        self.logged["datasets"] += entries


def dataset_entry(data: DataRef, *, context: str, num_rows: int | None = None) -> dict:
    """An MLflow dataset input's fields for `data`: name (the task), digest (the first 32 hex digits of its keyed
    fingerprint: MLflow keeps 36 characters), source, schema (the task's columns) and profile (row counts: num_rows
    the training rows the stage used, `num_rows` or all of them)."""
    spec = GLUE_TASKS[data.task]
    local = not data.source.startswith(("http://", "https://"))
    columns = [{"type": "string", "name": name} for name in spec.text_columns]
    columns.append({"type": "double" if spec.is_regression else "long", "name": spec.label_column})
    return {"name": data.task, "digest": data.fingerprint[:32], "source_type": "local" if local else "http",
            "source": json.dumps({"uri": data.source} if local else {"url": data.source}),
            "schema": json.dumps({"mlflow_colspec": columns}),
            "profile": json.dumps({"num_rows": data.num_train if num_rows is None else num_rows,
                                   "num_train": data.num_train, "num_dev": data.num_dev}),
            "context": context}


STAGE_KEY_TAG = "dpcompress.stage_key"


@contextlib.contextmanager
def stage_run(*, uri: str, parent_run_id: str, stage: str, stage_key: str = "") -> Iterator[StageRun]:
    """Open a nested run under the study run, tagged with the stage's folder name (`stage_key`); it ends FAILED if
    the stage raises (KILLED, by the next run of the study, if the process dies)."""
    mlflow_client = client(uri)
    parent = mlflow_client.get_run(parent_run_id)
    run = mlflow_client.create_run(parent.info.experiment_id, run_name=stage,
                                   tags={"mlflow.parentRunId": parent_run_id, "dpcompress.stage": stage,
                                         STAGE_KEY_TAG: stage_key})
    try:
        yield StageRun(mlflow_client, run.info.run_id)
    except BaseException:
        mlflow_client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow_client.set_terminated(run.info.run_id, "FINISHED")


def log_once(uri: str, run_id: str, metrics: dict, *, tags: dict) -> None:
    """Log `metrics` and `tags` to `run_id`, each metric unless the run already holds it with the same value (a reused
    stage's evaluation logs nothing again; one recomputed with other settings updates the run)."""
    mlflow_client = client(uri)
    have = mlflow_client.get_run(run_id).data.metrics
    run = StageRun(mlflow_client, run_id)
    run.metrics({k: v for k, v in metrics.items() if k not in have or have[k] != v})
    run.tags(tags)


def finished_stage_run(*, uri: str, parent_run_id: str, stage_key: str) -> str | None:
    """The FINISHED run of stage folder `stage_key` under the study run, if this store has one."""
    mlflow_client = client(uri)
    parent = mlflow_client.get_run(parent_run_id)
    runs = mlflow_client.search_runs(
        [parent.info.experiment_id], max_results=1,
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{STAGE_KEY_TAG}` = '{stage_key}' "
                      "and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def replay(*, uri: str, parent_run_id: str, stage: str, stage_key: str, logged: dict) -> str:
    """Log a finished stage again, from what its run logged (`StageRun.logged`), into this store: a study reused
    from its folders in a new tracking store gets every stage's run, params, tags, metrics and artifacts."""
    with stage_run(uri=uri, parent_run_id=parent_run_id, stage=stage, stage_key=stage_key) as run:
        run.params(logged["params"])
        run.tags(logged["tags"])
        run.metrics(logged["metrics"])
        if logged.get("datasets"):
            run.datasets(logged["datasets"])
        for path, artifact_path in logged["artifacts"]:
            if Path(path).exists():
                run.artifact(path, artifact_path)
    return run.run_id


def register_model(*, uri: str, run_id: str, folder: str | Path, name: str, tags: dict, description: str,
                   example: list[dict], pip_requirements: list[str]) -> str:
    """Log the exported HF `folder` under `run_id` as an MLflow pyfunc model from code (tasks/serving.py: nothing is
    pickled) and register it as `name`, with `tags` and `description`; returns the version. `example` (made-up
    inputs, never data: MLflow stores it and runs the model on it once, a check that it serves) is the model's
    input example."""
    mlflow.set_tracking_uri(uri)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "text"), ColSpec("string", "text_pair", required=False)]),
        outputs=Schema([ColSpec("string", "label", required=False), ColSpec("double", "score")]))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(SERVING_CODE), artifacts={"model": str(folder)},
                                       signature=signature, input_example=pd.DataFrame(example),
                                       pip_requirements=pip_requirements)
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client(uri).update_model_version(name, version.version, description=description)
    return str(version.version)


def promote(*, uri: str, name: str, version: str, description: str) -> str:
    """Point the alias `champion` of registered model `name` at `version`, and say so in the model's description."""
    mlflow_client = client(uri)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    mlflow_client.update_registered_model(name, description=f"@{CHAMPION} (version {version}): {description}")
    return version


def registered_version(*, uri: str, name: str, tags: dict) -> str | None:
    """The version of registered model `name` in the store at `uri` whose tags are `tags` (the same model with the
    same guarantee), or None."""
    wanted = {k: str(v) for k, v in tags.items()}
    try:
        versions = client(uri).search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:  # no such registered model yet
        return None
    found = [v for v in versions if all(v.tags.get(k) == value for k, value in wanted.items())]
    return str(max(int(v.version) for v in found)) if found else None


def guarantee_text(*, epsilon: float, delta: float, accountant: str, noise: str) -> str:
    """What a private model's guarantee is, in words (a registered model's description)."""
    unit = "Unit of privacy: one training example (add/remove)."
    if noise == "seeded":
        return (f"NO differential-privacy guarantee: its noise was seeded from the config (privacy.reproducible_noise, "
                f"a test mode); with secret noise the same settings give epsilon = {epsilon:.4f} at delta = "
                f"{delta:.3g}. {unit}")
    return (f"A differentially private release: ({epsilon:.4f}, {delta:.3g})-DP, i.e. epsilon = {epsilon:.4f} at "
            f"delta = {delta:.3g} ({accountant.upper()} accountant, Poisson sampling, {noise} noise). {unit}")


def guarantee_tags(*, epsilon: float, delta: float, accountant: str, noise: str) -> dict[str, str]:
    """What a private model's epsilon means, as MLflow tags. Seeded noise (the test mode) gets no epsilon tag: the
    model has no guarantee, and says so."""
    tags = {"delta": f"{delta:.3g}", "accountant": accountant, "sampling": "poisson", "unit_of_privacy": "example",
            "noise": noise}
    if noise == "seeded":
        return tags | {"dp_guarantee": "none: noise seeded from the config (reproducible_noise test mode)"}
    return tags | {"epsilon": f"{epsilon:.4f}", "dp_guarantee": f"({epsilon:.4f}, {delta:.3g})-DP"}


def fetch_results(*, uri: str, run_id: str, name: str = "results.md") -> str:
    """The text of a study run's results artifact (`results/<name>`); LookupError naming the run if it has none."""
    mlflow_client = client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise LookupError(f"no run {run_id!r} at {uri}") from err
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow_client.download_artifacts(run.info.run_id, f"results/{name}", tmp)
        except (mlflow.exceptions.MlflowException, OSError) as err:
            raise LookupError(f"run {run_id!r} ({run.info.run_name}) has no results table: is it a finished "
                              f"study run?") from err
        return Path(path).read_text()


def _log_dict(mlflow_client: MlflowClient, run_id: str, data, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        mlflow_client.log_artifact(run_id, str(path))


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
