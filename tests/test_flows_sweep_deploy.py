"""End to end: the `sweep` deployment of flows/prefect.yaml, triggered through the API of a real `prefect server`,
runs its grid cells as flow runs of the `study` deployment on two `process` workers of the dpcompress pool; both
workers run cells, every flow run completes, the sweep's table reaches its MLflow run, and a rerun trains nothing."""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import pytest
from test_flows_deploy import GLUE, ROOT, Processes, _run_cli, _start_server, _wait_healthy, tiny_study

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")]
SWEEP_TIMEOUT_S = 420
GRID = {"privacy.epsilon": [1, 2, 4]}


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


def _base_study(tmp_path: Path, mlflow_uri: str) -> Path:
    """The tiny teacher-only study, its stage outputs and ledger in a folder every worker reaches."""
    return tiny_study(tmp_path, name="tiny", output_dir=tmp_path / "shared",
                      tracking={"uri": mlflow_uri, "experiment": "sweep-e2e"})


def _run_sweep(client, deployment_id, config: Path, processes: Processes):
    """Start the sweep's flow run and wait until it and every cell it started are final; (sweep run, cell runs)."""
    flow_run = client.create_flow_run_from_deployment(deployment_id, parameters={
        "config_path": str(config), "grid": GRID, "glue_dir": str(GLUE)})
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run.id)
        if run.state is not None and run.state.is_final():
            break
        for name in ("worker-1", "worker-2"):
            assert processes.started[name].poll() is None, f"{name} exited" + processes.logs()
        time.sleep(2)
    else:
        pytest.fail(f"sweep not finished after {SWEEP_TIMEOUT_S}s" + processes.logs())
    assert run.state.is_completed(), f"{run.state_name}: {run.state.message}" + processes.logs()
    cells = [r for r in client.read_flow_runs() if r.parent_task_run_id and r.id != run.id
             and r.created >= run.created]
    return run, cells


def test_sweep_deployment_runs_cells_on_two_workers_and_reruns_from_cache(tmp_path, processes, mlflow_server):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from privacy.dataset_ledger import DatasetLedger

    api_url, env = _start_server(processes, tmp_path)
    config = _base_study(tmp_path, mlflow_server)  # while the server starts
    _wait_healthy(processes, api_url)
    _run_cli(processes, "pool", ["work-pool", "create", "dpcompress", "--type", "process"], env)
    worker_env = {**env, "DPCOMPRESS_WORKDIR": str(ROOT), "DPCOMPRESS_HOME": str(tmp_path / "shared" / "owner"),
                  "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("worker-1", "worker-2"):  # at most 2 runs each: the sweep's own run and a cell fit on one worker
        processes.start(name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", "dpcompress",
                               "--type", "process", "--name", name, "--limit", "2"], worker_env)
    _run_cli(processes, "deploy", ["deploy", "--prefect-file", "flows/prefect.yaml", "--all"], env)

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("dpcompress-sweep/sweep")
        began = time.monotonic()
        _, cells = _run_sweep(client, deployment.id, config, processes)
        print(f"sweep of {len(GRID['privacy.epsilon'])} cells: {time.monotonic() - began:.0f}s to COMPLETED")
        assert len(cells) == 3 and all(c.state.is_completed() for c in cells), [c.state_name for c in cells]
        assert {c.deployment_id for c in cells} == {client.read_deployment_by_name("dpcompress-study/study").id}
        ran_on = {name: {str(c.id) for c in cells if f"submitting flow run '{c.id}'" in processes.log(name, 10**6)}
                  for name in ("worker-1", "worker-2")}
        assert all(ran_on.values()), f"each worker runs cells: {ran_on}" + processes.logs()
        assert set().union(*ran_on.values()) == {str(c.id) for c in cells}

        results = tmp_path / "shared" / "tiny-sweep" / "results"
        with open(results / "cells.csv") as f:
            timings = list(csv.DictReader(f))
        print("cells (wall_s, run_s, overhead_s, pickup_s):",
              [(t["wall_s"], t["run_s"], t["overhead_s"], t["pickup_s"]) for t in timings])
        assert [t["state"] for t in timings] == ["COMPLETED"] * 3
        with open(results / "sweep.csv") as f:
            table = list(csv.DictReader(f))
        assert [(r["privacy.epsilon"], r["stage"]) for r in table] == [("1", "teacher"), ("2", "teacher"),
                                                                       ("4", "teacher")]
        assert [float(r["epsilon"]) for r in table] == pytest.approx([1, 2, 4], rel=0.02)
        mlflow = MlflowClient(mlflow_server)
        (parent,) = mlflow.search_runs([mlflow.get_experiment_by_name("sweep-e2e").experiment_id],
                                       filter_string="tags.`dpcompress.kind` = 'sweep'")
        logged = {a.path for a in mlflow.list_artifacts(parent.info.run_id, "results")}
        assert {"results/sweep.csv", "results/metric_vs_epsilon.png", "results/metric_vs_size.png",
                "results/cells.csv"} <= logged

        with DatasetLedger(tmp_path / "shared" / "ledger.db", create=False) as ledger:
            spent = ledger.history()
        assert len(spent) == 3  # one teacher per cell
        stages = sorted(p.name for p in (tmp_path / "shared").glob("*/stages/*"))

        began = time.monotonic()
        _, again = _run_sweep(client, deployment.id, config, processes)
        print(f"rerun: {time.monotonic() - began:.0f}s to COMPLETED")
        with open(results / "cells.csv") as f:
            print("rerun cells (wall_s, run_s, overhead_s, pickup_s):",
                  [(t["wall_s"], t["run_s"], t["overhead_s"], t["pickup_s"]) for t in csv.DictReader(f)])
        assert len(again) == 3 and all(c.state.is_completed() for c in again)
        with DatasetLedger(tmp_path / "shared" / "ledger.db", create=False) as ledger:
            assert len(ledger.history()) == 3, "a rerun of a finished sweep trains nothing, spends nothing"
        assert sorted(p.name for p in (tmp_path / "shared").glob("*/stages/*")) == stages
